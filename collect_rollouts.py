"""Stage 1: drive CarRacing-v3 with a random policy and save the episodes.

Each rollout is one compressed .npz under --out-dir, named by its track seed
(rollout i uses seed --seed + i), holding 64x64 uint8 frames, actions,
rewards and done flags (schema in wm/rollouts.py). The same seed gives the
same file. Files are written atomically, so a rerun skips finished rollouts
and redoes any partial or unreadable one; Ctrl-C leaves no half-written file.
Workers run the pixel-identical fast environment (wm/env.py).

--action-repeat k holds each action for k frames: a rollout keeps one row per
action (the frame seen before it, the rewards of its k frames summed), about
1000 / k rows, and records k. A folder holds one k: collecting into a folder
of another k is refused.

usage: python collect_rollouts.py --rollouts 200 --workers 2 --out-dir data/rollouts
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from wm.cli import fail, run_main
from wm.env import MAX_EPISODE_STEPS, make_env, step_repeat
from wm.frames import preprocess
from wm.policies import POLICIES
from wm.rollouts import (action_repeats, is_complete, remove_stale_temporaries, rollout_path,
                         write_rollout)


@dataclass
class Config:
    rollouts: int = 200  # episodes to collect (paper: 10,000; 200 gave ~175K frames here)
    max_steps: int = MAX_EPISODE_STEPS  # frames per episode at most (the environment's limit)
    workers: int = os.cpu_count() or 1  # parallel processes (default: all cores)
    out_dir: str = "data/rollouts"  # where the .npz files go
    seed: int = 0  # rollout i drives track seed seed + i
    policy: str = "brownian"  # brownian (smoothed random walk) or uniform (independent actions)
    action_repeat: int = 1  # frames each action is held; M and C then work at this rate (the paper: 1)


def collect_one(seed: int, max_steps: int, policy: str, action_repeat: int = 1) -> dict[str, np.ndarray]:
    """One episode on track `seed`; observation t is the frame seen before
    action t, which is held for `action_repeat` frames."""
    env = make_env(fast=True, max_steps=max_steps)
    act = POLICIES[policy](np.random.default_rng(seed))
    obs, _ = env.reset(seed=seed)
    frames, actions, rewards, terms, truncs = [], [], [], [], []
    done = False
    while not done:
        a = act()
        frames.append(preprocess(obs))
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
    return data


def _worker(job: tuple[int, int, str, str, int]) -> tuple[int, int]:
    seed, max_steps, policy, out_dir, action_repeat = job
    data = collect_one(seed, max_steps, policy, action_repeat)
    write_rollout(rollout_path(out_dir, seed), **data)
    return seed, len(data["actions"])


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group; the main process alone handles
    # it and terminates the workers, so they print no tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_config(cfg: Config) -> Path:
    if cfg.rollouts < 1:
        raise fail(f"--rollouts must be at least 1, got {cfg.rollouts}")
    if cfg.max_steps < 1:
        raise fail(f"--max-steps must be at least 1, got {cfg.max_steps}")
    if cfg.action_repeat < 1:
        raise fail(f"--action-repeat must be at least 1, got {cfg.action_repeat}")
    if cfg.workers < 1:
        raise fail(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.seed < 0:
        raise fail(f"--seed must be non-negative, got {cfg.seed}")
    if cfg.policy not in POLICIES:
        raise fail(f"--policy must be one of {', '.join(POLICIES)}, got {cfg.policy!r}")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise fail(f"--out-dir {out} is a file, not a folder; pass another path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise fail(f"cannot write to --out-dir {out} ({e.strerror or e}); pass a writable folder")
    return out


def check_action_repeat(out: Path, action_repeat: int) -> None:
    """Refuse a folder that already holds rollouts of another k: reusing them
    would mix rates, and redoing them would destroy another run's data."""
    other = {k: files for k, files in action_repeats(sorted(out.glob("rollout_*.npz"))).items()
             if k != action_repeat}
    if other:
        k, files = min(other.items())
        raise fail(f"{out} holds {len(files)} rollouts collected with --action-repeat {k} (e.g. "
                   f"{files[0].name}); collect --action-repeat {action_repeat} into another --out-dir, "
                   f"or delete those files")


def main(cfg: Config) -> None:
    out = check_config(cfg)
    remove_stale_temporaries(out)
    seeds = range(cfg.seed, cfg.seed + cfg.rollouts)
    check_action_repeat(out, cfg.action_repeat)
    todo = [s for s in seeds if not is_complete(rollout_path(out, s))]
    if len(todo) < cfg.rollouts:
        print(f"{cfg.rollouts - len(todo)} of {cfg.rollouts} rollouts already in {out}; "
              f"collecting the other {len(todo)}")
    jobs = [(s, cfg.max_steps, cfg.policy, str(out), cfg.action_repeat) for s in todo]
    if not jobs:
        return
    start, frames = time.time(), 0
    bar = tqdm(total=len(jobs), unit="rollout", desc="collect")
    pool = mp.get_context("spawn").Pool(min(cfg.workers, max(len(jobs), 1)), initializer=_ignore_sigint)
    try:
        # imap_unordered: results stream back one rollout at a time, so memory
        # does not grow with the number of rollouts.
        for _, steps in pool.imap_unordered(_worker, jobs):
            frames += steps
            bar.update(1)
            bar.set_postfix(fps=f"{frames / (time.time() - start):.0f}")
        pool.close()
    except BaseException:
        pool.terminate()
        remove_stale_temporaries(out)
        raise
    finally:
        pool.join()
        bar.close()
    seconds = time.time() - start
    files = [rollout_path(out, s) for s in seeds]
    mb = sum(f.stat().st_size for f in files if f.exists()) / 2**20
    held = f" (each held {cfg.action_repeat} game frames)" if cfg.action_repeat != 1 else ""
    print(f"rollouts {cfg.rollouts}  new {len(jobs)}  frames {frames}{held}  "
          f"{seconds:.1f} s  {mb:.1f} MB on disk in {out}")


if __name__ == "__main__":
    run_main(main, Config)
