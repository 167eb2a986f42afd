"""How true M's dream is: dreamed against real returns, the exploit gap, and
how long the dream stays faithful.

A C trained in the dream is only as good as the dream's ranking of
controllers is the real game's. For each controller of a ladder, on
--episodes tracks (C's held-out tracks, 100,000 on), this measures:

    real      C drives the real game: its score
    dreamed   C dreams in M from that episode's first frame (V's mean z,
              M's memory at zero, as train_controller.py --mode dream
              starts), at --temperature: M's summed reward; with
              --start-step S, from step S of that episode instead, M's
              memory as the agent's there (as --dream-start starts), for
              --dream-frames
    replayed  the dream's own actions, each held M's k frames, played open
              loop in the real game on the same track for as many steps as
              the dream ran (after C's own S real actions, which bring the
              game back to the dream's start): what those actions are
              really worth

    exploit gap     dreamed - replayed: what C gained by steering M where M
                    is wrong (0 for a faithful dream)
    faithful steps  agent steps until the dream's frame (V's decoding of
                    the dreamed z) is farther from the replay's (V's decoding
                    of its mean z for the frame the same actions reached)
                    than half the mean distance between two of the replay's
                    frames, chance's distance. Frames, not z's: M samples
                    every dimension of z, also those V leaves unused (at the
                    prior, which the decoder ignores), so z's distance is
                    mostly that noise

and, across the ladder, the Spearman rank correlation of the controllers'
mean dreamed and mean real returns: 1 when the dream orders them as the
game does, about 0 when a search in it learns nothing that transfers.

The ladder: each --controllers file (a controller.pt trained with
--ckpt-dir's V and M), and its weights scaled by each of --scales (0: zero
weights, the paper's start: straight at half gas; 1: C itself), so that one
trained C gives controllers from useless to competent. The JSON counts the
real frames driven (episodes and replays).

usage: python -m tools.dream_truth --ckpt-dir checkpoints/pretrained --json docs/dream_truth.json --png docs/dream_truth.png
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.controller import Controller
from wm.agent import Agent, check_trained_with, run_episode
from wm.checkpoint import load_checkpoint
from wm.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, fail, numbers, run_main
from wm.dream import Dream, StartStates, check_dream_heads, replay_in_game
from wm.env import HELD_OUT_SEED, make_env
from wm.files import write_atomically
from wm.frames import to_model_input
from wm.latents import load_world_model


@dataclass
class Config:
    ckpt_dir: str = "checkpoints/pretrained"  # the vae.pt and mdnrnn.pt (with reward and done heads) that dream
    controllers: str = ""  # comma-separated controller.pt files trained with them (default: --ckpt-dir's own)
    scales: str = "0,0.25,0.5,0.75,1"  # each controller's weights times these: the ladder
    episodes: int = 6  # tracks per controller
    seed: int = HELD_OUT_SEED  # episode i drives track seed + i
    temperature: float = 1.0  # the dream's tau (train_controller.py --temperature)
    max_steps: int = 1000  # frames per episode at most, real and dreamed
    start_step: int = 0  # the dream starts at this agent step of C's real episode, M's memory as the agent's there (train_controller.py --dream-start; 0: the first frame, memory at zero)
    dream_frames: int = 0  # a dream's time limit in frames (train_controller.py --dream-frames; 0: --max-steps)
    json: str = ""  # write the measures here as JSON
    png: str = ""  # write their plot here

    # The range of each number option, checked in one line before main runs.
    RANGES = {"episodes": AT_LEAST_1, "seed": NON_NEGATIVE, "temperature": POSITIVE, "max_steps": AT_LEAST_1,
              "start_step": NON_NEGATIVE, "dream_frames": NON_NEGATIVE}


def load_ladder(cfg: Config, fingerprints: dict) -> tuple[Controller, dict[str, np.ndarray]]:
    """C's structure and the ladder's weights, {label: flat weights}."""
    paths = [p for p in cfg.controllers.split(",") if p] or [str(Path(cfg.ckpt_dir) / "controller.pt")]
    scales = numbers(cfg.scales, "--scales", "scale")
    ladder, controller = {}, None
    for path in paths:
        if not Path(path).is_file():
            raise fail(f"{path}: no such file; give controller.pt files trained with {cfg.ckpt_dir}'s V and M")
        ckpt = load_checkpoint(path, "controller")
        check_trained_with(ckpt, path, fingerprints)
        c = Controller.from_checkpoint(ckpt)
        if controller is not None and c.cfg != controller.cfg:
            raise fail(f"{path} is a C with {asdict(c.cfg)}, the first is {asdict(controller.cfg)}; "
                       f"a ladder is of one shape")
        controller = c
        for s in scales:
            ladder[f"{path} x{s:g}"] = s * c.get_flat()
    return controller, ladder


@torch.no_grad()
def measure(x: np.ndarray, controller: Controller, world, env, cfg: Config, seed: int) -> dict:
    """One controller (flat weights `x`) on one track: real, dreamed and
    replayed returns and the faithful steps."""
    vae, mdnrnn, k = world.vae, world.mdnrnn, world.mdnrnn.cfg.action_repeat
    controller.set_flat(x)
    agent = Agent(vae, controller, mdnrnn if controller.uses_memory else None, "cpu")
    # The agent at --start-step: its z, M's (h, c) before reading that frame,
    # and C's real actions up to there; M steps with C's actions whether or
    # not C reads h, as the dream's does.
    state, taken, start = mdnrnn.initial_state(1), [], []

    def watch(frame, agent, score):
        nonlocal state
        if len(taken) == cfg.start_step and not start:
            start.append(StartStates(agent.z, *state))
        if len(taken) < cfg.start_step:
            state = mdnrnn.step(agent.z, torch.as_tensor(agent.action), state)[1]
            taken.append(agent.action[0])

    real, real_frames = run_episode(env, agent, seed, watch, action_repeat=k)
    if not start:
        raise fail(f"C's real episode on track {seed} ended before --start-step {cfg.start_step}; "
                   f"give a smaller one")
    dream = Dream(mdnrnn, controller, start[0], cfg.temperature, cfg.dream_frames or cfg.max_steps)
    result = dream.run(x[None], [seed], record=True)
    steps = int(result.lengths[0, 0])
    actions = result.actions[:steps, 0, 0].numpy()  # (T, 3)
    dreamed_z = result.zs[:steps + 1, 0, 0]  # (T + 1, Z): z0, then the z after each step

    replay = replay_in_game(env, seed, taken, actions, k, vae.cfg.view)
    frames = replay.frames if replay.after is None else np.concatenate([replay.frames, replay.after[None]])
    real_z = vae.encode(to_model_input(frames))[0]  # (T' + 1, Z), T' <= T
    n = len(real_z)
    real_x, dreamed_x = (vae.decode(z).flatten(1) for z in (real_z, dreamed_z[:n]))  # (T' + 1, 3 * 64 * 64)
    dist = (dreamed_x - real_x).norm(dim=-1)  # (T' + 1,)
    chance = torch.cdist(real_x, real_x).sum() / max(1, n * (n - 1))  # mean over pairs of distinct steps
    beyond = torch.nonzero(dist > chance / 2)
    return {"seed": seed, "real": real, "dreamed": float(result.returns[0, 0]),
            "replayed": float(replay.rewards.astype(np.float64).sum()),
            "dream_steps": steps, "faithful_steps": int(beyond[0, 0]) if len(beyond) else n - 1,
            "distance": (dist / chance).tolist(), "real_frames": real_frames + replay.frames_stepped}


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def plot(rows: dict[str, dict], png: str) -> None:
    import matplotlib.pyplot as plt

    from wm.metrics import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, r in rows.items():
        left.scatter(r["real"], r["dreamed"], s=18)
        left.annotate(label.rsplit(" ", 1)[-1], (r["real"], r["dreamed"]), fontsize=7)
        curves = [ep["distance"] for ep in r["episodes"]]
        longest = max(len(c) for c in curves)
        mean = [np.mean([c[t] for c in curves if t < len(c)]) for t in range(longest)]
        right.plot(mean, lw=1, label=label.rsplit(" ", 1)[-1])
    lim = [min(left.get_xlim()[0], left.get_ylim()[0]), max(left.get_xlim()[1], left.get_ylim()[1])]
    left.plot(lim, lim, "k:", lw=0.8)
    left.set(xlabel="real score", ylabel="dreamed return", title="each controller, mean over tracks")
    right.axhline(0.5, color="k", ls=":", lw=0.8)
    right.set(xlabel="agent step", ylabel="|dreamed frame - real frame| / chance",
              title="the dream against the same actions replayed")
    right.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)


def main(cfg: Config) -> dict:
    t0 = time.time()
    world = load_world_model(cfg.ckpt_dir, "cpu")
    check_dream_heads(world.mdnrnn, Path(cfg.ckpt_dir) / "mdnrnn.pt")
    controller, ladder = load_ladder(cfg, {"vae_fingerprint": world.vae_fingerprint,
                                           "mdnrnn_fingerprint": world.mdnrnn_fingerprint})
    env = make_env(fast=True, max_steps=cfg.max_steps)
    rows = {}
    try:
        for label, x in ladder.items():
            episodes = [measure(x, controller, world, env, cfg, cfg.seed + i) for i in range(cfg.episodes)]
            r = {key: float(np.mean([ep[key] for ep in episodes]))
                 for key in ("real", "dreamed", "replayed", "faithful_steps")}
            r["exploit_gap"] = r["dreamed"] - r["replayed"]
            rows[label] = {**r, "episodes": episodes}
            print(f"{label}: real {r['real']:7.1f}  dreamed {r['dreamed']:7.1f}  replayed {r['replayed']:7.1f}  "
                  f"gap {r['exploit_gap']:7.1f}  faithful {r['faithful_steps']:5.1f} steps", flush=True)
    finally:
        env.close()
    rho = spearman([r["real"] for r in rows.values()], [r["dreamed"] for r in rows.values()])
    print(f"rank correlation of dreamed and real returns over {len(rows)} controllers: {rho:.2f}")
    frames = sum(ep["real_frames"] for r in rows.values() for ep in r["episodes"])
    result = {"config": asdict(cfg), "rank_correlation": rho, "seconds": round(time.time() - t0, 1),
              "real_frames": frames, "controllers": rows}
    if cfg.json:
        write_atomically(cfg.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    if cfg.png:
        plot(rows, cfg.png)
    return result


if __name__ == "__main__":
    run_main(main, Config)
