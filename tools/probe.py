"""What C can see: linear probes from V's z and M's h to the game's true state.

A linear C can only act on what is linear in its input. This drives
--episodes of C's held-out tracks (100,000 on) with a driver, records each
agent step's game frame, its action and the car's true state read from the
game itself (not from pixels):

    speed             |v| of the hull, the game's units (its speed bar reads this)
    angular_velocity  the hull's yaw rate, rad/s
    heading           the car's heading relative to the road's direction at the
                      nearest centre-line point, radians in [-pi, pi)
    offset            the car's signed distance from the road's centre line
                      (positive to the road's left), game units; the road is
                      about 13 wide

then, for each candidate folder's V and M, encodes the frames (as that V
sees them: its --view) to z and runs M over z and the actions for h, the h
that C sees at that step. A ridge regression per target is fitted on the
first tracks and scored on the last --test-episodes, as R^2 (1: the target
is a linear function of the features; 0: no better than its mean). Its
penalty is chosen by leaving one training track out at a time.

Feature sets: z, [z, h] (what C reads), and, for reference, the 112 pixels
of the dashboard as a V of the full view would see them (rows 56-63,
columns 0-13 of the 64x64 frame): what a V could learn if it kept them.

The driver is the scripted one that follows the road at a random target
speed per track (`--driver pursuit`, collect_rollouts.py's; the same frames
for every candidate, whatever its C), or a folder whose C drives.

usage: python -m tools.probe --ckpt-dirs checkpoints/pretrained --json docs/probe.json --png docs/probe.png
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from wm.agent import load_agent, load_models, run_episode
from wm.cli import AT_LEAST_1, NON_NEGATIVE, fail, run_main
from wm.env import HELD_OUT_SEED, make_env
from wm.files import write_atomically
from wm.frames import DASHBOARD_ROWS, preprocess, to_model_input
from wm.latents import load_world_model
from wm.policies import POLICIES


@dataclass
class Config:
    ckpt_dirs: str = "checkpoints/pretrained"  # comma-separated folders of vae.pt and mdnrnn.pt to probe (vae.pt alone: z only)
    driver: str = "pursuit"  # pursuit (the scripted driver, the same frames for every candidate) or a folder whose controller.pt drives
    episodes: int = 12  # held-out tracks driven, training and test together
    test_episodes: int = 4  # the last tracks, on which R^2 is scored
    seed: int = HELD_OUT_SEED  # episode i drives track seed + i (C's held-out tracks by default)
    max_steps: int = 1000  # frames per episode at most (the environment's limit)
    action_repeat: int = 2  # frames each action is held with --driver pursuit (a C's own otherwise); every M must have learned this rate
    json: str = ""  # write the R^2 table here as JSON
    png: str = ""  # write a bar chart of it here

    # The range of each number option, checked in one line before main runs.
    RANGES = {"episodes": AT_LEAST_1, "seed": NON_NEGATIVE, "max_steps": AT_LEAST_1}


TARGETS = ("speed", "angular_velocity", "heading", "offset")
# The dashboard as a V of the full view sees it (rows 56-63 of the 64x64
# frame); the speed bar and the four wheel bars are in its left columns.
DASHBOARD = (DASHBOARD_ROWS, slice(0, 14))
ALPHAS = 10.0 ** np.arange(-2, 5)  # ridge penalties tried, on standardized features


def true_state(game) -> np.ndarray:
    """(4,) the TARGETS, read from the game's car and track."""
    hull = game.car.hull
    pos = np.array(hull.position)
    xy = np.array([t[2:4] for t in game.track])  # the centre line, in driving order
    i = int(np.argmin(((xy - pos) ** 2).sum(1)))
    road = xy[(i + 1) % len(xy)] - xy[i]
    road /= np.linalg.norm(road)
    forward = np.array([-math.sin(hull.angle), math.cos(hull.angle)])  # car_racing.py's convention
    heading = math.atan2(road[0] * forward[1] - road[1] * forward[0], road @ forward)
    rel = pos - xy[i]
    offset = road[0] * rel[1] - road[1] * rel[0]
    return np.array([np.hypot(*hull.linearVelocity), hull.angularVelocity, heading, offset])


class ScriptedAgent:
    """A collection policy (wm/policies.py) in the agent loop's shape: it
    reads the car and the track from `env`, so one episode at a time."""

    def __init__(self, policy: str, env):
        self.policy, self.env = POLICIES[policy], env

    def reset(self, seeds, params=None) -> None:
        self.act_of = self.policy(np.random.default_rng(int(seeds[0])))

    def act(self, frames: np.ndarray) -> np.ndarray:
        self.action = self.act_of(self.env)[None]  # (1, 3)
        return self.action


def driving_agent(cfg: Config, env):
    """The driver and its action repeat."""
    if cfg.driver in POLICIES:
        return ScriptedAgent(cfg.driver, env), cfg.action_repeat
    return load_agent(cfg.driver)


def drive(cfg: Config, env, agent, action_repeat: int) -> list[dict]:
    """Each episode's frames (T, 96, 96, 3), actions (T, 3) and true states
    (T, 4), one row per agent step."""
    episodes = []
    for i in range(cfg.episodes):
        rows = {"frames": [], "actions": [], "truth": []}

        def record(frame, agent, score):
            rows["frames"].append(frame)
            rows["actions"].append(agent.action[0])
            rows["truth"].append(true_state(env.unwrapped))

        score, frames = run_episode(env, agent, cfg.seed + i, record, action_repeat=action_repeat)
        print(f"track {cfg.seed + i}: {frames} frames, score {score:.1f}")
        episodes.append({key: np.stack(v) for key, v in rows.items()})
    return episodes


def load_candidate(ckpt_dir: str, action_repeat: int) -> tuple:
    """A folder's V and M (None when it has no mdnrnn.pt: z alone is probed);
    M must have learned the driver's rate."""
    if not (Path(ckpt_dir) / "mdnrnn.pt").is_file():
        return load_models(ckpt_dir, with_m=False)[:2]
    wm = load_world_model(ckpt_dir)
    if wm.mdnrnn.cfg.action_repeat != action_repeat:
        raise fail(f"{ckpt_dir}/mdnrnn.pt learned each action held {wm.mdnrnn.cfg.action_repeat} frames, "
                   f"the driver holds {action_repeat}; pass --action-repeat {wm.mdnrnn.cfg.action_repeat} "
                   f"(with --driver pursuit), or probe it apart")
    return wm.vae, wm.mdnrnn


@torch.no_grad()
def features(vae, mdnrnn, episodes: list[dict]) -> list[dict[str, np.ndarray]]:
    """Per episode, {"z": (T, Z), "zh": (T, Z + H)} from a V and M ("z" alone without M)."""
    out = []
    for ep in episodes:
        x = to_model_input(np.stack([preprocess(f, vae.cfg.view) for f in ep["frames"]]))
        z = torch.cat([vae.encode(x[i:i + 256])[0] for i in range(0, len(x), 256)])  # (T, Z)
        if mdnrnn is None:
            out.append({"z": z.numpy()})
            continue
        a = torch.as_tensor(ep["actions"], dtype=torch.float32)
        hs, _ = mdnrnn.rnn(torch.cat([z, a], dim=-1)[None])  # (1, T, H): h after step t
        h = torch.cat([torch.zeros_like(hs[0, :1]), hs[0, :-1]])  # (T, H): the h C sees at step t
        out.append({"z": z.numpy(), "zh": torch.cat([z, h], dim=-1).numpy()})
    return out


def dashboard_pixels(episodes: list[dict]) -> list[dict[str, np.ndarray]]:
    return [{"dashboard": np.stack([preprocess(f, "full")[DASHBOARD].reshape(-1) for f in ep["frames"]])
             .astype(np.float32)} for ep in episodes]


def ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge regression on standardized x -> a function of new x."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    y_mean = y.mean(0)
    w = np.linalg.solve(xs.T @ xs + alpha * np.eye(x.shape[1]), xs.T @ (y - y_mean))
    return lambda new: (new - mean) / std @ w + y_mean


def r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def probe(xs: list[np.ndarray], ys: list[np.ndarray], n_test: int) -> dict[str, float]:
    """R^2 per target on the last `n_test` episodes, each target's penalty
    chosen by leaving one training episode out at a time."""
    train_x, train_y = xs[:-n_test], ys[:-n_test]
    cv = np.zeros((len(ALPHAS), len(TARGETS)))
    for j, alpha in enumerate(ALPHAS):
        for i in range(len(train_x)):
            rest = [e for e in range(len(train_x)) if e != i]
            fit = ridge(np.concatenate([train_x[e] for e in rest]), np.concatenate([train_y[e] for e in rest]),
                        alpha)
            cv[j] += ((train_y[i] - fit(train_x[i])) ** 2).sum(0)
    test_x, test_y = np.concatenate(xs[-n_test:]), np.concatenate(ys[-n_test:])
    scores = {}
    for t, target in enumerate(TARGETS):
        fit = ridge(np.concatenate(train_x), np.concatenate(train_y), ALPHAS[cv[:, t].argmin()])
        scores[target] = round(float(r2(test_y[:, t], fit(test_x)[:, t])), 4)
    return scores


def markdown(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """The R² table as markdown, one row per candidate and feature set, as
    docs/probe.md holds it."""
    rows = ["| features | " + " | ".join(t.replace("_", " ") for t in TARGETS) + " |",
            "|---|" + "---:|" * len(TARGETS)]
    for name, sets in table.items():
        for feat, scores in sets.items():
            rows.append(f"| {name}: {feat} | " + " | ".join(f"{scores[t]:.3f}" for t in TARGETS) + " |")
    return "\n".join(rows)


def plot(table: dict[str, dict[str, dict[str, float]]], png: str) -> None:
    import matplotlib.pyplot as plt

    from wm.metrics import save_figure  # it also sets matplotlib's file-only backend

    bars = [(f"{name}: {feat}", scores) for name, sets in table.items() for feat, scores in sets.items()]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(bars)
    for i, (label, scores) in enumerate(bars):
        ax.bar(np.arange(len(TARGETS)) + (i - (len(bars) - 1) / 2) * width,
               [max(scores[t], 0) for t in TARGETS], width, label=label)
    ax.set_xticks(range(len(TARGETS)), TARGETS)
    ax.set_ylim(0, 1)
    ax.set_ylabel("R^2 on held-out tracks")
    ax.set_title("What a linear C can read off its input")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, png)


def main(cfg: Config) -> dict:
    if not 1 <= cfg.test_episodes < cfg.episodes - 1:
        raise fail(f"--test-episodes must leave at least 2 training tracks of --episodes {cfg.episodes}, "
                   f"got {cfg.test_episodes}")
    dirs = [d for d in cfg.ckpt_dirs.split(",") if d]
    if not dirs:
        raise fail("--ckpt-dirs names no folder")
    t0 = time.time()
    env = make_env(fast=True, max_steps=cfg.max_steps)
    agent, k = driving_agent(cfg, env)
    candidates = {d: load_candidate(d, k) for d in dirs}  # refused before any driving
    episodes = drive(cfg, env, agent, k)
    env.close()
    truth = [ep["truth"] for ep in episodes]
    table = {"frame": {"dashboard": probe([f["dashboard"] for f in dashboard_pixels(episodes)], truth,
                                          cfg.test_episodes)}}
    for d, (vae, mdnrnn) in candidates.items():
        feats = features(vae, mdnrnn, episodes)
        table[d] = {name: probe([f[name] for f in feats], truth, cfg.test_episodes) for name in feats[0]}
    print(f"R^2 on tracks {cfg.seed + cfg.episodes - cfg.test_episodes}-{cfg.seed + cfg.episodes - 1} "
          f"(ridge fitted on the {cfg.episodes - cfg.test_episodes} before), driver {cfg.driver}, "
          f"{sum(len(t) for t in truth)} steps:")
    print(markdown(table))
    result = {"config": asdict(cfg), "action_repeat": k, "steps": sum(len(t) for t in truth),
              "seconds": round(time.time() - t0, 1), "r2": table}
    if cfg.json:
        write_atomically(cfg.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    if cfg.png:
        plot(table, cfg.png)
    return result


if __name__ == "__main__":
    run_main(main, Config)
