"""The agent loop, in one place: training, evaluation, the benchmark and the
video all drive the car through `run_episodes` and `Agent.act`.

One step, as in the paper:

    frame -> preprocess -> V's mu = z -> C's action from [z, h] -> env.step
                                      \\-> M's cell updates h with (z, action)

z is V's mean, not a sample: C should not see the encoder's noise. With an
action repeat k (the paper: 1) each action is held for k frames and the agent
sees every k-th frame (`wm.env.step_repeat`); M must have learned that rate.

The loop drives K episodes in lockstep, each in its own environment, so that
V, M and C run once per time step on a batch of K rows: V's encoder, most of
what the networks add to a step, costs far less a frame on a batch than on
one frame (`python -m bench.speed agent --batch-size 1` against the default 16; the
README's figures). An episode that ends drops out of the batch and the rest
go on; `run_episode` is the case K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from models.controller import Controller, ControllerConfig
from models.mdnrnn import MDNRNN
from models.vae import ConvVAE
from wm.checkpoint import load_checkpoint
from wm.cli import fail
from wm.env import make_env, step_repeat
from wm.frames import preprocess, to_model_input
from wm.latents import load_world_model
from wm.policies import UniformPolicy


class Agent:
    """V, M and C together, for K episodes at once: sees K frames, returns K
    actions, remembers in h (one row per episode). Each row may drive with its
    own C weights (`reset(params=...)`: a CMA-ES member per row).

    M may be left out when C reads z alone (the paper's "V only" ablation).
    """

    def __init__(self, vae: ConvVAE, controller: Controller, mdnrnn: MDNRNN | None = None,
                 device: torch.device | str = "cpu"):
        if controller.uses_memory and mdnrnn is None:
            raise ValueError("a controller reading [z, h] needs M")
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.controller = controller.to(self.device).eval()
        self.mdnrnn = mdnrnn.to(self.device).eval() if mdnrnn is not None else None
        # oneDNN's convolutions run 5-25% faster on channels-last images on a
        # CPU, with the same numbers; the decoder (videos only) is left as is.
        self.vae.enc.to(memory_format=torch.channels_last)
        self.reset([0])

    def reset(self, seeds: Sequence[int], params: np.ndarray | None = None) -> None:
        """Start len(seeds) episodes; row i drives with C weights `params[i]`
        ((K, n_params) flat vectors), or all rows with C's own when None."""
        n = len(seeds)
        if params is None:
            params = np.repeat(self.controller.get_flat()[None], n, axis=0)
        params = torch.tensor(np.asarray(params), dtype=torch.float32, device=self.device)  # a copy: Ray hands read-only arrays
        if params.shape != (n, self.controller.n_params):
            raise ValueError(f"expected ({n}, {self.controller.n_params}) C weights for {n} episodes, "
                             f"got {tuple(params.shape)}")
        self.params = params  # (K, n_params)
        self.state = self.mdnrnn.initial_state(n, self.device) if self.mdnrnn is not None else None
        self.z = None  # (K, Z) V's code for the last frames seen
        self.prediction = None  # M's MDNOutput for the coming frames' z
        self.predicted = None  # M's prediction for the last frames seen (None at the start)

    @torch.inference_mode()
    def act(self, frames: np.ndarray) -> np.ndarray:
        """(K, 96, 96, 3) uint8 environment frames -> actions (K, 3) float32."""
        x = to_model_input(np.stack([preprocess(f, self.vae.cfg.view) for f in frames]), self.device)  # (K, 3, 64, 64)
        z, _ = self.vae.encode(x.contiguous(memory_format=torch.channels_last))  # (K, Z)
        h = self.state[0][:, None] if self.state is not None else None  # (K, 1, H)
        # One C per row; a batched product of 1-row products, so that each
        # row's action does not depend on which other rows share the batch.
        action = self.controller.forward_population(self.params, z[:, None], h)[:, 0]  # (K, 3)
        self.z, self.predicted = z, self.prediction
        if self.mdnrnn is not None:
            self.prediction, self.state = self.mdnrnn.step(z, action, self.state)
        self.action = action.float().cpu().numpy()  # (K, 3), for a caller's on_step
        return self.action

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with only these rows of the batch (the episodes still running)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.params = self.params[idx]
        if self.state is not None:
            self.state = (self.state[0][idx], self.state[1][idx])
        self.z = self.z[idx] if self.z is not None else None
        self.prediction, self.predicted = (
            type(p)(*(f[idx] if f is not None else None for f in p)) if p is not None else None
            for p in (self.prediction, self.predicted))


class RandomAgent:
    """The baseline: independent uniform random actions, seeded per episode."""

    def __init__(self):
        self.reset([0])

    def reset(self, seeds: Sequence[int], params: None = None) -> None:
        self.policies = [UniformPolicy(np.random.default_rng(int(s))) for s in seeds]

    def act(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([policy() for policy in self.policies])  # (K, 3)

    def keep(self, rows: Sequence[int]) -> None:
        self.policies = [self.policies[i] for i in rows]


def run_episodes(envs: Sequence, agent, seeds: Sequence[int], params: np.ndarray | None = None,
                 on_step: Callable[[list, object, list], None] | None = None,
                 patience: int = 0, action_repeat: int = 1) -> list[tuple[float, int]]:
    """Drive K = len(seeds) episodes in lockstep, episode i on the track of
    seeds[i] in envs[i] with C weights params[i] (or C's own when None), each
    until it ends or its env's time limit; returns [(total reward, steps)]
    per episode, steps counting frames (environment steps), so that budgets
    compare across action repeats. An episode that ends leaves the batch, the
    others go on. Each action is held for `action_repeat` frames.
    `on_step(frames, agent, scores)` sees the running episodes' frames and
    scores after their actions are chosen, before they are taken (videos).

    `patience` > 0 (training only) ends an episode after that many frames in
    a row without a positive reward, and charges it the game's -0.1 for each
    of the frames left up to its env's time limit, so its total stays on the game's
    scale (a car that stopped finding new tiles would only have lost those).
    A held action that finds a tile has a positive sum (a tile pays about 3),
    so idle frames are counted whole agent steps at a time."""
    envs = list(envs)[:len(seeds)]
    if len(envs) < len(seeds):
        raise ValueError(f"{len(seeds)} episodes need {len(seeds)} environments, got {len(envs)}")
    frames = [env.reset(seed=int(seed))[0] for env, seed in zip(envs, seeds)]
    agent.reset(seeds, params)
    totals, steps = [0.0] * len(seeds), [0] * len(seeds)
    running = list(range(len(seeds)))  # episode of each row of the agent's batch
    idle = [0] * len(seeds)  # frames since the last positive reward
    while running:
        actions = agent.act(np.stack([frames[i] for i in running]))  # (k, 3)
        if on_step is not None:
            on_step([frames[i] for i in running], agent, [totals[i] for i in running])
        go_on = []
        for row, (i, action) in enumerate(zip(running, actions)):
            frames[i], reward, terminated, truncated, n = step_repeat(envs[i], action, action_repeat)
            totals[i] += float(reward)
            steps[i] += n
            idle[i] = 0 if reward > 0 else idle[i] + n
            if patience and idle[i] >= patience and not (terminated or truncated):
                totals[i] -= 0.1 * max(0, envs[i].spec.max_episode_steps - steps[i])
                terminated = True
            if not (terminated or truncated):
                go_on.append(row)
        if len(go_on) < len(running):
            running = [running[row] for row in go_on]
            if running:
                agent.keep(go_on)
    return list(zip(totals, steps))


def run_episode(env, agent, seed: int,
                on_step: Callable[[np.ndarray, object, float], None] | None = None,
                action_repeat: int = 1) -> tuple[float, int]:
    """One episode, with C's own weights: `run_episodes` for K = 1;
    `on_step(frame, agent, score)` (for videos)."""
    step = None if on_step is None else (lambda frames, agent, scores: on_step(frames[0], agent, scores[0]))
    return run_episodes([env], agent, [seed], on_step=step, action_repeat=action_repeat)[0]


def load_models(ckpt_dir: str | Path, with_m: bool, device: torch.device | str = "cpu"):
    """V, and M when `with_m`, from `ckpt_dir`, frozen -> (vae, mdnrnn or None,
    their fingerprints); an error names the script to run for a missing file."""
    if with_m:
        wm = load_world_model(ckpt_dir, device)  # checks that M was trained on this V
        return wm.vae, wm.mdnrnn, {"vae_fingerprint": wm.vae_fingerprint,
                                   "mdnrnn_fingerprint": wm.mdnrnn_fingerprint}
    ckpt = load_checkpoint(Path(ckpt_dir) / "vae.pt", kind="vae")
    vae = ConvVAE.from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    return vae, None, {"vae_fingerprint": ckpt["fingerprint"], "mdnrnn_fingerprint": None}


def check_trained_with(record: dict, path, fingerprints: dict, script: str = "train_controller.py") -> None:
    """Raise one clear line when the policy in `path` (C, or a PPO run that
    `script` made) was trained with another V or M than `fingerprints`."""
    for name in ("vae", "mdnrnn"):
        key = f"{name}_fingerprint"
        if record.get(key) != fingerprints[key]:
            raise fail(f"{path} was trained with another {name}.pt (fingerprint {record.get(key)}, "
                       f"this one is {fingerprints[key]}); retrain it with {script}, "
                       f"or bring back the {name}.pt it was trained with")


def load_agent(ckpt_dir: str | Path, device: torch.device | str = "cpu") -> tuple[Agent, int]:
    """The agent of a folder's controller.pt, V and M, checked to belong
    together, with C's trained weights; and the frames it holds each action."""
    path = Path(ckpt_dir) / "controller.pt"
    ckpt = load_checkpoint(path, kind="controller")
    controller = Controller.from_checkpoint(ckpt)
    vae, mdnrnn, fingerprints = load_models(ckpt_dir, controller.uses_memory, device)
    check_trained_with(ckpt, path, fingerprints)
    return Agent(vae, controller, mdnrnn, device), ckpt["action_repeat"]


@dataclass
class AgentSpec:
    """What a worker needs to rebuild the agent: plain values, cheap to send."""
    ckpt_dir: str | None = None  # folder of vae.pt (and mdnrnn.pt); None gives the random baseline
    controller: dict | None = None  # ControllerConfig fields
    fast: bool = True  # the fast twin (training) or the official env (evaluation)
    max_steps: int = 1000  # time limit of an episode, in frames (the paper: 1000)
    action_repeat: int = 1  # frames each action is held (the paper: 1); M's rate when C reads h
    load: Callable | None = None  # load(device) builds another policy (a PPO baseline), in place of V, M and C


def build_agent(spec: AgentSpec, device: torch.device | str = "cpu"):
    """The agent of `spec`, C's weights left at their initial values."""
    if spec.load is not None:
        return spec.load(device)
    if spec.ckpt_dir is None:
        return RandomAgent()
    controller = Controller(ControllerConfig(**spec.controller))
    vae, mdnrnn, _ = load_models(spec.ckpt_dir, controller.uses_memory, device)
    return Agent(vae, controller, mdnrnn, device)


class EpisodeRunner:
    """A pool worker's state (see wm.pool): the agent and its own environments,
    built once (one more whenever a batch is larger than any before). A task
    is a batch of K episodes run in lockstep: (C's flat parameters per
    episode (K, n_params) or None, K track seeds, patience: 0 or the early
    stop of `run_episodes`) -> K (total reward, steps)."""

    def __init__(self, spec: AgentSpec):
        self.spec = spec
        self.agent = build_agent(spec)
        self.envs = []

    def __call__(self, params: np.ndarray | None, seeds: Sequence[int],
                 patience: int = 0) -> list[tuple[float, int]]:
        while len(self.envs) < len(seeds):
            self.envs.append(make_env(fast=self.spec.fast, max_steps=self.spec.max_steps))
        return run_episodes(self.envs, self.agent, seeds, params, patience=patience,
                            action_repeat=self.spec.action_repeat)


def map_episodes(pool, tasks: Sequence[tuple[np.ndarray | None, int]], batch_size: int,
                 on_result: Callable[[int, tuple[float, int]], None] | None = None,
                 patience: int = 0) -> list[tuple[float, int]]:
    """Run episode tasks (C's flat parameters or None, track seed) on a pool of
    EpisodeRunner workers, consecutive tasks batched by up to `batch_size`
    (fewer when there are too few tasks to keep every worker busy); returns
    (total reward, steps) per task, in task order. `on_result(i, result)` is
    called for task i as its batch comes back; `patience` as in `run_episodes`."""
    size = max(1, min(batch_size, -(-len(tasks) // len(pool))))
    chunks = [tasks[i:i + size] for i in range(0, len(tasks), size)]
    batches = [(None if chunk[0][0] is None else np.stack([p for p, _ in chunk]), [s for _, s in chunk],
                patience) for chunk in chunks]

    def done(j: int, results: list) -> None:
        for k, result in enumerate(results):
            on_result(j * size + k, result)

    results = pool.map(batches, on_result=done if on_result is not None else None)
    return [r for batch in results for r in batch]
