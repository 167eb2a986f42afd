"""Stage 1: drive CarRacing-v3 with a random policy (or a scripted driver,
--policy pursuit) and save the episodes.

Each rollout is one compressed .npz under --out-dir, named by its track seed
(rollout i uses seed --seed + i), holding 64x64 uint8 frames, actions,
rewards and done flags (schema in wm/rollouts.py). The same seed gives the
same file. Files are written atomically, so a rerun skips finished rollouts
and redoes any partial or unreadable one; Ctrl-C leaves no half-written file.
Workers run the pixel-identical fast environment (wm/env.py).

Collection has tracks of its own, 10,000-99,999 (wm/env.py; --seed defaults
to 10,000): V and M learn from these rollouts, and dreams start from their
first frames, which show the whole track, so none may be a track that
evaluate.py (0-9,999) or C's held-out score (100,000 on) drives. A one-line
warning says when --out-dir would hold rollouts of such tracks.

--action-repeat k holds each action for k frames: a rollout keeps one row per
action (the frame seen before it, the rewards of its k frames summed), about
1000 / k rows, and records k. A folder holds one k: collecting into a folder
of another k is refused.

--backend ray collects on the actors of a Ray cluster (docs/scaling.md);
each actor writes its rollouts into --out-dir, which must then be a folder
that every machine of the cluster sees.

usage: python collect_rollouts.py --rollouts 200 --workers 2 --out-dir data/rollouts
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wm.cli import AT_LEAST_1, NON_NEGATIVE, fail, run_main
from wm.env import COLLECT_SEED, EVAL_SEED, HELD_OUT_SEED, MAX_EPISODE_STEPS, TRAIN_SEED, make_env, step_repeat
from wm.files import locked, writable_folder
from wm.frames import VIEWS, preprocess
from wm.policies import POLICIES, ControllerPolicy
from wm.pool import WorkerError, check_backend, make_pool
from wm.rollouts import (FLAGS, by_setting, is_complete, remove_stale_temporaries, rollout_path,
                         rollout_seed, write_rollout)


@dataclass
class Config:
    rollouts: int = 300  # episodes to collect (paper: 10,000)
    max_steps: int = MAX_EPISODE_STEPS  # frames per episode at most (the environment's limit)
    workers: int = os.cpu_count() or 1  # parallel processes, or Ray actors with --backend ray (default: all cores)
    out_dir: str = "data/rollouts"  # where the .npz files go
    seed: int = COLLECT_SEED  # rollout i drives track seed seed + i; collection's own tracks are 10,000-99,999
    policy: str = "brownian"  # brownian (smoothed random walk), uniform (independent actions), pursuit (follows the road at a random speed) or controller (a trained C, with --noise)
    ckpt_dir: str = ""  # --policy controller: the folder whose controller.pt, vae.pt and mdnrnn.pt drive
    noise: float = 0.1  # --policy controller: std of the Gaussian noise added to each of C's actions (lucid-dream-racer: 0.1)
    action_repeat: int = 2  # frames each action is held; M and C then work at this rate (the paper: 1)
    view: str = "full"  # what of the frame is kept (wm/frames.py): road (the paper's crop) or full (with the dashboard); V learns this view
    backend: str = "local"  # where the workers run: local = processes here, ray = actors on a Ray cluster
    ray_address: str = ""  # --backend ray: empty joins the Ray running here or starts one, auto joins a running cluster, or HOST:PORT

    # The range of each number option, checked in one line before main runs.
    RANGES = {"rollouts": AT_LEAST_1, "max_steps": AT_LEAST_1, "workers": AT_LEAST_1, "seed": NON_NEGATIVE,
              "noise": NON_NEGATIVE}


def collect_one(seed: int, max_steps: int, policy: str, action_repeat: int = 1,
                view: str = "road", driver=None, noise: float = 0.0) -> dict[str, np.ndarray]:
    """One episode on track `seed`; observation t is the frame seen before
    action t, which is held for `action_repeat` frames. `driver` is the agent
    (wm.agent.Agent) of --policy controller."""
    env = make_env(fast=True, max_steps=max_steps)
    rng = np.random.default_rng(seed)
    act = ControllerPolicy(rng, driver, noise) if policy == "controller" else POLICIES[policy](rng)
    obs, _ = env.reset(seed=seed)
    frames, actions, rewards, terms, truncs = [], [], [], [], []
    done = False
    while not done:
        a = act(env, obs)
        frames.append(preprocess(obs, view))
        obs, r, term, trunc, _ = step_repeat(env, a, action_repeat)
        actions.append(a)
        rewards.append(r)
        terms.append(term)
        truncs.append(trunc)
        done = term or trunc
    env.close()
    data = {
        "observations": np.stack(frames),
        "actions": np.asarray(actions, dtype=np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "terminated": np.asarray(terms, dtype=bool),
        "truncated": np.asarray(truncs, dtype=bool),
    }
    if action_repeat != 1:  # a file of k = 1 stays what it was before the flag existed
        data["action_repeat"] = np.array(action_repeat, dtype=np.int64)
    if view != "road":  # likewise, a file of the paper's view
        data["view"] = np.array(view)
    data["policy"], data["max_steps"] = np.array(policy), np.array(max_steps, dtype=np.int64)
    return data


class RolloutWriter:
    """A pool worker (wm.pool): a task is a track seed, whose rollout it
    collects and writes to `out_dir`; it returns the rollout's rows, so that
    results stream back one small number at a time, whatever the rollouts."""

    def __init__(self, out_dir: str, max_steps: int, policy: str, action_repeat: int, view: str,
                 ckpt_dir: str, noise: float):
        self.out_dir, self.max_steps, self.policy = out_dir, max_steps, policy
        self.action_repeat, self.view, self.noise = action_repeat, view, noise
        self.driver = None
        if policy == "controller":  # built once per worker
            from wm.agent import load_agent

            self.driver = load_agent(ckpt_dir)[0]

    def __call__(self, seed: int) -> int:
        data = collect_one(seed, self.max_steps, self.policy, self.action_repeat, self.view,
                           self.driver, self.noise)
        write_rollout(rollout_path(self.out_dir, seed), **data)
        return len(data["actions"])


def check_config(cfg: Config) -> Path:
    if cfg.action_repeat < 1:
        raise fail(f"--action-repeat must be at least 1, got {cfg.action_repeat}")
    if cfg.policy not in (*POLICIES, "controller"):
        raise fail(f"--policy must be one of {', '.join(POLICIES)}, controller, got {cfg.policy!r}")
    if cfg.policy == "controller":
        from wm.agent import load_agent  # here, so that random collection never imports torch

        if not cfg.ckpt_dir:
            raise fail("--policy controller drives with a trained C: give its folder as --ckpt-dir")
        k = load_agent(cfg.ckpt_dir)[1]  # a missing or mismatched V, M or C is refused here, once
        if k != cfg.action_repeat:
            raise fail(f"{cfg.ckpt_dir}/controller.pt holds each action {k} frames; collect with "
                       f"--action-repeat {k}")
    if cfg.view not in VIEWS:
        raise fail(f"--view must be one of {', '.join(VIEWS)}, got {cfg.view!r}")
    check_backend(cfg.backend, cfg.ray_address)
    return writable_folder(cfg.out_dir, "--out-dir")


def other_setting(files: list[Path], key: str, asked) -> tuple | None:
    """(a value, its files) of the `files` recorded with another `key` than
    `asked`, or None; a file too old to say (None) is taken as it is."""
    other = {v: found for v, found in by_setting(files, key).items() if v not in (asked, None)}
    return min(other.items()) if other else None  # one key's values share a type


def check_folder_settings(out: Path, cfg: Config) -> None:
    """Refuse a folder that already holds rollouts of another k or view:
    reusing them would mix kinds, and redoing them would destroy another
    run's data."""
    files = sorted(out.glob("rollout_*.npz"))
    for key in ("action_repeat", "view"):
        asked = getattr(cfg, key)
        if other := other_setting(files, key, asked):
            v, found = other
            raise fail(f"{out} holds {len(found)} rollouts collected with {FLAGS[key]} {v} (e.g. "
                       f"{found[0].name}); collect {FLAGS[key]} {asked} into another --out-dir, "
                       f"or delete those files")


def check_kept_rollouts(out: Path, cfg: Config, seeds: list[int]) -> None:
    """Refuse to count as collected a rollout of the asked tracks that was
    made with another --policy or --max-steps (a file too old to say is
    taken as it is)."""
    files = [rollout_path(out, s) for s in seeds]
    for key in ("policy", "max_steps"):
        asked = getattr(cfg, key)
        if other := other_setting(files, key, asked):
            v, found = other
            raise fail(f"{out} already holds {len(found)} of these tracks' rollouts collected with "
                       f"{FLAGS[key]} {v} (e.g. {found[0].name}); collect {FLAGS[key]} {asked} with another "
                       f"--seed or --out-dir, or delete those files")


def warn_on_scored_tracks(out: Path, seeds: range) -> None:
    """One line on stderr when `out` would hold rollouts of tracks that
    evaluate.py or C's held-out score drives: V and M learn from every
    rollout in the folder, so they would be scored on tracks they saw."""
    tracks = set(seeds) | {rollout_seed(f) for f in out.glob("rollout_*.npz")} - {None}
    scored = sorted(t for t in tracks if EVAL_SEED <= t < COLLECT_SEED or HELD_OUT_SEED <= t < TRAIN_SEED)
    if scored:
        rollouts = f"{len(scored)} rollout{'s' * (len(scored) > 1)}"
        print(f"warning: {out} would hold {rollouts} of tracks that are scored (e.g. seed {scored[0]}: "
              f"evaluate.py scores tracks {EVAL_SEED:,}-{COLLECT_SEED - 1:,}, C's held-out score "
              f"{HELD_OUT_SEED:,}-{TRAIN_SEED - 1:,}), "
              f"and V and M learn from every rollout there; collect with --seed {COLLECT_SEED} (the "
              f"default) into a folder without them", file=sys.stderr)


@locked("out_dir", "--out-dir")  # one run at a time writes there
def main(cfg: Config) -> None:
    out = check_config(cfg)
    remove_stale_temporaries(out)
    seeds = range(cfg.seed, cfg.seed + cfg.rollouts)
    check_folder_settings(out, cfg)
    warn_on_scored_tracks(out, seeds)
    todo = [s for s in seeds if not is_complete(rollout_path(out, s))]
    check_kept_rollouts(out, cfg, [s for s in seeds if s not in todo])
    if len(todo) < cfg.rollouts:
        print(f"{cfg.rollouts - len(todo)} of {cfg.rollouts} rollouts already in {out}; "
              f"collecting the other {len(todo)}")
    if not todo:
        return
    start, frames = time.time(), 0

    def written(_: int, steps: int) -> None:
        nonlocal frames
        frames += steps
        bar.update(1)
        bar.set_postfix(fps=f"{frames / (time.time() - start):.0f}")

    try:
        with (make_pool(cfg.backend, min(cfg.workers, len(todo)), RolloutWriter, str(out), cfg.max_steps,
                        cfg.policy, cfg.action_repeat, cfg.view, cfg.ckpt_dir, cfg.noise,
                        ray_address=cfg.ray_address) as pool,
              tqdm(total=len(todo), unit="rollout", desc="collect") as bar):
            pool.map([(s,) for s in todo], on_result=written)
    except WorkerError as e:
        raise fail(str(e)) from None
    finally:
        # The workers are stopped by now: a Ctrl-C or a failure leaves only
        # the temporary files of the rollouts they were writing, never a rollout.
        remove_stale_temporaries(out)
    missing = [s for s in todo if not rollout_path(out, s).exists()]
    if missing:  # written by actors on other machines, into folders of their own
        raise fail(f"{len(missing)} of the rollouts are not in {out} on this machine (e.g. "
                   f"{rollout_path(out, missing[0]).name}); on a Ray cluster --out-dir must be a folder "
                   f"that every machine shares")
    seconds = time.time() - start
    files = [rollout_path(out, s) for s in seeds]
    mb = sum(f.stat().st_size for f in files if f.exists()) / 2**20
    held = f" (each held {cfg.action_repeat} game frames)" if cfg.action_repeat != 1 else ""
    print(f"rollouts {cfg.rollouts}  new {len(todo)}  frames {frames}{held}  "
          f"{seconds:.1f} s  {mb:.1f} MB on disk in {out}")


if __name__ == "__main__":
    run_main(main, Config)
