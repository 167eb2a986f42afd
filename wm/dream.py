"""The dream: M as the environment, for a whole CMA-ES population at once.

A dream episode starts, like a real one, from the first frame of an episode
(V's mean for the first frame of a rollout in the latent data set) with M's
memory at zero; or, with a start step s > 0, from a later point of a real
rollout (step s, s + 10, ...), with M's memory warmed up on that rollout's
real z's and actions before it, so that the dream begins where M knows
where it is. Each step C reads [z, h] and acts, M's one-step cell
advances (h, c), the next z is sampled from M's mixture at temperature tau,
and M's heads give the reward and whether the episode ends (a Bernoulli draw
from the done head). An episode runs until done or `max_steps` frames; the
step that ends it still counts, as in the real game (leaving the field costs
-100 on that step), and nothing after it does. An M that learned every k-th
frame (rollouts collected with an action repeat k) makes one dream step k
frames, so a dream runs ceil(max_steps / k) steps, the agent steps of a real
episode of max_steps frames.

Every (member, rollout) pair is one row of one batch: C's weights for all
members are a (P, n_params) matrix applied with one batched matmul, and M
steps all P * R rows in one call, so a generation is at most that many batched
steps and no Python loop over members. Finished rows keep being computed
(the batch stays rectangular) but stop counting.

Members are ranked on equal terms, as on the real tracks: rollout r starts
from the same frame and draws the same random numbers (the mixture's noise
and the done draw) for every member. So a member's result does not depend on
which other members share the batch, which is what the tests check.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from models.controller import Controller
from models.mdnrnn import MDNRNN, MDNOutput
from wm.cli import fail
from wm.latents import BadLatents, WorldModel, load_world_model, read_latents


class DreamResult(NamedTuple):
    returns: torch.Tensor  # (P, R) sum of M's rewards until done or the time limit
    lengths: torch.Tensor  # (P, R) steps that counted
    zs: torch.Tensor | None  # (T + 1, P, R, Z) the dreamed z's from the start, when recorded
    actions: torch.Tensor | None = None  # (T, P, R, 3) C's action at each dream step, when recorded
    gas: torch.Tensor | None = None  # (P, R) C's gas summed over the frames that counted (k per dream step)


def check_dream_heads(mdnrnn: MDNRNN, path: str | os.PathLike = "mdnrnn.pt") -> None:
    """A one-line error unless M predicts both the reward and the episode's end."""
    missing = [name for name, on in (("reward", mdnrnn.cfg.predict_reward),
                                     ("done", mdnrnn.cfg.predict_done)) if not on]
    if missing:
        raise fail(f"{path} has no {' and no '.join(missing)} head, which a dream needs; retrain "
                   f"M with train_mdnrnn.py --reward-weight 1 --done-weight 1 (a weight of 0 "
                   f"removes the head)")


START_EVERY = 10  # with a start step s > 0, a rollout gives starts at steps s, s + 10, ...


class StartStates(NamedTuple):
    z: torch.Tensor  # (N, Z) V's mean at each start
    h: torch.Tensor | None = None  # (N, H) M's memory there, warmed up on the real steps before it
    c: torch.Tensor | None = None  # (N, H) the LSTM's cell state; None, with h: zeros (a first frame)


def load_start_states(latent_dir: str | os.PathLike, vae_fingerprint: str, mdnrnn: MDNRNN | None = None,
                      start_step: int = 0) -> StartStates:
    """The start states of dreams from the rollouts in `latent_dir`.

    start_step 0: V's mean for the first frame of every rollout, M's memory
    at zero. start_step s > 0: every 10th step from s of each rollout long
    enough, with M's (h, c) after stepping `mdnrnn` through the real z's
    (V's means) and actions before it, as the agent's M would have it there.

    Unreadable files are skipped with a warning; files encoded by another V
    are an error (their z means something else to M).

    A first frame shows the whole track before the view zooms in, so these
    must be no track that C is scored on: they are collection's (wm/env.py),
    which neither evaluate.py nor C's held-out score drives. M's held-out
    rollouts are among them, and may be: they are held out to measure V's
    and M's losses on tracks those never learned from, which C's dreaming
    does not touch (V and M stay frozen).
    """
    latent_dir = Path(latent_dir)
    files = sorted(latent_dir.glob("*.npz"))
    if not files:
        raise fail(f"no latent files in {latent_dir}; run train_mdnrnn.py (it encodes the "
                   f"rollouts there) or point --latent-dir at its --latent-dir")
    rollouts, other_v = [], 0
    for path in files:
        try:
            data = read_latents(path)
        except BadLatents as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        if str(data["vae_fingerprint"]) != vae_fingerprint:
            other_v += 1
        elif len(data["mu"]) > start_step:
            rollouts.append((data["mu"], data["actions"]))
    if other_v:
        raise fail(f"{other_v} of {len(files)} latent files in {latent_dir} were encoded by "
                   f"another V than vae.pt ({vae_fingerprint}); rerun train_mdnrnn.py with this "
                   f"--latent-dir to re-encode them")
    if not rollouts:
        longer = f" longer than {start_step} steps" if start_step else ""
        raise fail(f"no readable latent files{longer} in {latent_dir}; rerun train_mdnrnn.py"
                   + (", or pass a smaller --dream-start" if start_step else ""))
    if start_step == 0:
        return StartStates(torch.as_tensor(np.stack([mu[0] for mu, _ in rollouts])))
    return warm_starts(mdnrnn, rollouts, start_step)


@torch.no_grad()
def warm_starts(mdnrnn: MDNRNN, rollouts: list[tuple[np.ndarray, np.ndarray]], start_step: int) -> StartStates:
    """M stepped through each rollout's real (z, action) pairs, all rollouts
    in one batch (padded to the longest), on M's device; the state before
    reading step t is kept at t = start_step, start_step + 10, ... ->
    StartStates of every such (rollout, step)."""
    dev = mdnrnn.mdn.weight.device
    mus, acts = (pad_sequence([torch.as_tensor(r[i]) for r in rollouts], batch_first=True).to(dev)
                 for i in (0, 1))  # (N, T, Z), (N, T, 3)
    lengths = torch.as_tensor([len(mu) for mu, _ in rollouts], device=dev)
    state = mdnrnn.initial_state(len(rollouts), dev)
    zs, hs, cs = [], [], []
    for t in range(mus.shape[1]):
        if t >= start_step and (t - start_step) % START_EVERY == 0:
            there = lengths > t
            zs.append(mus[there, t])
            hs.append(state[0][there])
            cs.append(state[1][there])
        _, state = mdnrnn.step(mus[:, t], acts[:, t], state)
    return StartStates(torch.cat(zs), torch.cat(hs), torch.cat(cs))


class Replay(NamedTuple):
    frames: np.ndarray  # (T, 64, 64, 3) the frame seen before each action played, in V's view
    after: np.ndarray | None  # (64, 64, 3) the frame after the last one; None when the episode ended
    rewards: np.ndarray  # (T,) each action's reward, summed over its k frames
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool
    frames_stepped: int  # game frames stepped in all, those back to the start included


def replay_in_game(env, seed: int, before, actions, k: int, view: str) -> Replay:
    """Open loop in the real game from a real state: track `seed` from its
    start, the actions `before` (a real episode's own, each held k frames:
    the game is deterministic, so they lead to that episode's state again,
    stepped without rendering but the last), then `actions` until they run
    out or the episode ends."""
    from wm.env import step_repeat
    from wm.frames import preprocess

    frame, _ = env.reset(seed=int(seed))
    stepped = 0
    for i, a in enumerate(before):
        frame, _, terminated, truncated, n = step_repeat(env, a, k, render=i == len(before) - 1)
        stepped += n
        if terminated or truncated:
            raise ValueError(f"track {seed}: the episode ended after {i + 1} of the {len(before)} "
                             f"actions that lead back to the start; they are not that episode's")
    frames, rewards, terminated_at, truncated_at = [], [], [], []
    ended = False
    for a in actions:
        frames.append(preprocess(frame, view))
        frame, reward, terminated, truncated, n = step_repeat(env, a, k)
        stepped += n
        rewards.append(reward)
        terminated_at.append(terminated)
        truncated_at.append(truncated)
        if ended := terminated or truncated:
            break
    return Replay(np.stack(frames) if frames else np.zeros((0, 64, 64, 3), np.uint8), None if ended else preprocess(frame, view),
                  np.asarray(rewards, np.float32), np.asarray(terminated_at, bool),
                  np.asarray(truncated_at, bool), stepped)


def make_dream(ckpt_dir: str | os.PathLike, controller: Controller, latent_dir: str | os.PathLike,
               temperature: float = 1.0, max_steps: int = 1000, device: torch.device | str = "cpu",
               bf16: bool = False, start_step: int = 0, mdnrnn_path: str | os.PathLike = "",
               gas_cost: float = 0.0) -> tuple["Dream", WorldModel]:
    """The dream of the V and M in `ckpt_dir` (or of the M at `mdnrnn_path`,
    trained with that V), starting from the latents in `latent_dir` (at
    `start_step`, see load_start_states), for controllers shaped like
    `controller` -> (dream, world)."""
    world = load_dream_world(ckpt_dir, device, mdnrnn_path)
    starts = load_start_states(latent_dir, world.vae_fingerprint, world.mdnrnn, start_step)
    return Dream(world.mdnrnn, controller, starts, temperature, max_steps, device, bf16, gas_cost), world


def load_dream_world(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                     mdnrnn_path: str | os.PathLike = "") -> WorldModel:
    """The V in `ckpt_dir` and its M (or the M at `mdnrnn_path`, trained with
    that V), which must have the reward and done heads a dream needs."""
    m_name = str(Path(mdnrnn_path).resolve()) if mdnrnn_path else "mdnrnn.pt"  # an absolute name is itself
    world = load_world_model(ckpt_dir, device, mdnrnn_name=m_name)
    check_dream_heads(world.mdnrnn, Path(ckpt_dir) / m_name)
    return world


def noise_seed(seeds: list[int]) -> int:
    """One seed for a generation's dream noise, from its rollout seeds."""
    return int(np.random.default_rng([int(s) for s in seeds]).integers(2**62))


class Dream:
    """M as a batched environment for a population of controllers.

    `controller` gives C's structure (its own weights are not used); `starts`
    are the start states to draw from: StartStates, or an (N, Z) tensor of
    first frames (M's memory at zero); `max_steps` is in frames. `bf16`
    runs the matrix products in bfloat16 (autocast; M's memory stays float32):
    about 3x faster on a CPU with bf16 instructions, at about 3 significant
    digits in M's outputs. `gas_cost` is taken from a member's fitness (not
    from its dreamed return) for each frame of full gas: M dreams more speed
    than the game's grip allows, and C learns to press the gas it dreams
    (python -m tools.dream_rank shows the dreamed gas of a run's Cs against
    their held-out scores).
    """

    def __init__(self, mdnrnn: MDNRNN, controller: Controller, starts: StartStates | torch.Tensor,
                 temperature: float = 1.0, max_steps: int = 1000,
                 device: torch.device | str = "cpu", bf16: bool = False, gas_cost: float = 0.0):
        if not temperature > 0:
            raise ValueError(f"the dream's temperature must be positive, got {temperature}")
        check_dream_heads(mdnrnn)
        self.device = torch.device(device)
        self.mdnrnn = mdnrnn.to(self.device).eval().requires_grad_(False)
        self.controller = copy.deepcopy(controller).to(self.device)  # for its structure only
        starts = starts if isinstance(starts, StartStates) else StartStates(starts)
        self.starts = StartStates(*(None if x is None else x.to(self.device, torch.float32) for x in starts))
        self.temperature = temperature
        self.action_repeat = mdnrnn.cfg.action_repeat  # frames per dream step
        self.max_frames = max_steps
        self.max_dream_steps = -(-max_steps // self.action_repeat)  # the last one may be cut short
        self.bf16 = bf16
        self.gas_cost = gas_cost

    def start_indices(self, seeds: list[int]) -> list[int]:
        """Rollout r starts from the start state its seed picks."""
        return [int(np.random.default_rng(int(s)).integers(len(self.starts.z))) for s in seeds]

    def run(self, params, seeds: list[int], z0: torch.Tensor | StartStates | None = None,
            record: bool = False) -> DreamResult:
        """Dream R = len(seeds) episodes for each of P controllers.

        params: (P, n_params) C's flat weights, one row per member (array or tensor).
        seeds: one per rollout; they pick the start states and the noise.
        z0: R start states to use instead of the drawn ones: (R, Z) z's, M's
            memory at zero, or StartStates with M's memory.
        """
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return self._run(params, seeds, z0, record)

    def _run(self, params, seeds, z0, record) -> DreamResult:
        m, dev = self.mdnrnn, self.device
        params = torch.as_tensor(np.asarray(params) if not torch.is_tensor(params) else params,
                                 dtype=torch.float32, device=dev)
        P, R = params.shape[0], len(seeds)
        Z, H, K = m.cfg.latent_size, m.cfg.hidden_size, m.cfg.n_gaussians
        state = m.initial_state(P * R, dev)  # (h, c), each (P * R, H)
        if z0 is None:
            idx = self.start_indices(seeds)
            starts = StartStates(*(None if x is None else x[idx] for x in self.starts))  # R of them
        else:
            starts = z0 if isinstance(z0, StartStates) else StartStates(z0)
        if starts.h is not None:  # warmed up on real steps: every member from the same (h, c)
            state = tuple(x.to(dev, torch.float32).expand(P, R, H).reshape(P * R, H) for x in starts[1:])
        z = starts.z.to(dev, torch.float32).expand(P, R, Z)  # (P, R, Z)
        g = torch.Generator(device=dev).manual_seed(noise_seed(seeds))
        returns = torch.zeros(P, R, device=dev)
        lengths = torch.zeros(P, R, dtype=torch.long, device=dev)
        gas = torch.zeros(P, R, device=dev)
        alive = torch.ones(P, R, dtype=torch.bool, device=dev)
        zs, actions = ([z], []) if record else (None, None)
        for _ in range(self.max_dream_steps):
            a = self.controller.forward_population(params, z, state[0].view(P, R, H))  # (P, R, A)
            if record:
                actions.append(a.float())
            out, state = m.step(z.reshape(P * R, Z), a.reshape(P * R, -1), state)
            out = MDNOutput(*(x.unflatten(0, (P, R)) for x in out))  # (P, R, ...)
            # One draw per rollout, shared by every member (see the docstring).
            u = torch.rand(R, Z, K, generator=g, device=dev)
            eps = torch.randn(R, Z, generator=g, device=dev)
            u_done = torch.rand(R, generator=g, device=dev)
            returns += torch.where(alive, out.reward, 0.0)
            gas += torch.where(alive, a[..., 1].float(), 0.0)
            lengths += alive
            alive &= u_done >= torch.sigmoid(out.done_logit)
            z = m.sample_next_z(out, self.temperature, noise=(u, eps)).float()  # (P, R, Z)
            if record:
                zs.append(z)
            if not alive.any():
                break
        gas *= self.action_repeat
        if not record:
            return DreamResult(returns, lengths, None, gas=gas)
        return DreamResult(returns, lengths, torch.stack(zs), torch.stack(actions), gas)

    def __call__(self, solutions: list[np.ndarray], seeds: list[int]) -> tuple[np.ndarray, int]:
        """The fitness interface of train_controller.py: -> (mean dreamed
        reward per member (P,), less `gas_cost` per frame of full gas; frames
        dreamed that counted: k per dream step, as the real game counts its
        frames)."""
        result = self.run(np.stack(solutions), seeds)
        frames = (result.lengths * self.action_repeat).clamp(max=self.max_frames)
        fitness = result.returns.mean(1) - self.gas_cost * result.gas.mean(1)
        return fitness.cpu().numpy().astype(np.float64), int(frames.sum())


class DreamEnsemble:
    """Several Ms' dreams as one fitness: every rollout is dreamed in each M,
    from the same start and noise seeds, C reading that M's own h, and a
    member's fitness is the mean over the Ms. A flaw of one M that C learns
    to exploit pays 1/len(dreams) of what it pays in that M alone; what all
    the Ms agree on pays in full."""

    def __init__(self, dreams: list[Dream]):
        self.dreams = dreams

    def __call__(self, solutions: list[np.ndarray], seeds: list[int]) -> tuple[np.ndarray, int]:
        results = [dream(solutions, seeds) for dream in self.dreams]
        return np.mean([rewards for rewards, _ in results], axis=0), sum(frames for _, frames in results)


@torch.no_grad()
def save_dream_strip(vae, mdnrnn: MDNRNN, controller: Controller, png: str | os.PathLike,
                     seed: int, temperature: float = 1.0, max_steps: int = 1000,
                     n_frames: int = 12) -> dict:
    """One episode of `controller` in the real game beside its dream from the
    same first frame, as a PNG strip: real frames (as V sees them), V's
    reconstructions of them, and M's dream decoded by V, at the same agent
    steps (M's action repeat frames each; `max_steps` is in frames). Returns
    the real score and the dreamed return."""
    from wm.agent import Agent, run_episode
    from wm.env import make_env
    from wm.frames import preprocess, to_image, to_model_input
    from wm.metrics import image_grid

    device = next(vae.parameters()).device
    controller = copy.deepcopy(controller)  # the agent moves it to V's device
    agent = Agent(vae, controller, mdnrnn if controller.uses_memory else None, device)
    frames, first_z = [], []

    def on_step(frame, agent, score):
        frames.append(preprocess(frame, vae.cfg.view))
        if not first_z:
            first_z.append(agent.z)

    env = make_env(fast=True, max_steps=max_steps)
    try:
        score, real_frames = run_episode(env, agent, seed, on_step, mdnrnn.cfg.action_repeat)
    finally:
        env.close()
    steps = len(frames)  # agent steps, as the dream counts them
    dream = Dream(mdnrnn, controller, first_z[0], temperature, max_steps, device)
    result = dream.run(controller.get_flat()[None], [seed], z0=first_z[0], record=True)
    length = int(result.lengths[0, 0])
    # The same steps in every row, spread over the longer episode; an episode
    # that has ended shows grey.
    at = np.unique(np.linspace(0, max(steps, length) - 1, n_frames).round().astype(int))
    grey = np.full((64, 64, 3), 128, np.uint8)
    real = np.stack([frames[min(t, steps - 1)] for t in at])
    recon = to_image(vae.decode(vae.encode(to_model_input(real, device))[0]))
    dreamed = to_image(vae.decode(result.zs[np.minimum(at, length - 1), 0, 0]))
    real[at >= steps] = recon[at >= steps] = grey
    dreamed[at >= length] = grey
    dream_return = float(result.returns[0, 0])
    image_grid([real, recon, dreamed], png, labels=[f"real {score:.0f}", "V recon",
                                                    f"dream {dream_return:.0f}"])
    return {"real_score": score, "real_steps": steps, "real_frames": real_frames, "dream_return": dream_return,
            "dream_steps": length, "steps_shown": at.tolist()}


def plot_transfer(runs: dict[str, str | os.PathLike], png: str | os.PathLike) -> None:
    """The held-out score in the real game against wall-clock hours, one line
    per training run (label -> its controller_metrics.csv), so that a run in
    the dream and a run in the real game compare at equal time."""
    import matplotlib.pyplot as plt

    from wm.metrics import MetricsLog, save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, csv in runs.items():
        rows = MetricsLog(csv, step_key="generation").rows()
        hours = np.cumsum([float(r["seconds"]) for r in rows]) / 3600
        pts = [(t, float(r["held_out"])) for t, r in zip(hours, rows) if r.get("held_out") not in (None, "")]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("wall-clock hours of training")
    ax.set_ylabel("held-out score in CarRacing-v3")
    ax.set_title("C trained in M's dream vs in the real game")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, png)
