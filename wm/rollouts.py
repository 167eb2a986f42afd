"""Rollout files: one compressed .npz per episode, named by its seed.

Schema (T = number of steps):
    observations  uint8   (T, 64, 64, 3)  frame the policy saw before action t
    actions       float32 (T, 3)          steer, gas, brake
    rewards       float32 (T,)            reward for action t
    terminated    bool    (T,)
    truncated     bool    (T,)
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from wm.cli import fail
from wm.frames import FRAME_SIZE

KEYS = ("observations", "actions", "rewards", "terminated", "truncated")


def rollout_path(out_dir: str | os.PathLike, seed: int) -> Path:
    return Path(out_dir) / f"rollout_{seed:07d}.npz"


def write_rollout(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write atomically: a kill leaves either the whole file or none."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class BadRollout(ValueError):
    pass


def read_rollout(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load and check one rollout; raise BadRollout naming the file if it is
    truncated, unreadable or not of the schema above."""
    path = Path(path)
    try:
        with np.load(path) as f:
            data = {k: f[k] for k in KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise BadRollout(f"{path}: unreadable rollout ({type(e).__name__}: {e})") from None
    obs = data["observations"]
    T = len(obs)
    if obs.dtype != np.uint8 or obs.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3):
        raise BadRollout(f"{path}: observations are {obs.shape} {obs.dtype}, "
                         f"expected (T, {FRAME_SIZE}, {FRAME_SIZE}, 3) uint8")
    if data["actions"].shape != (T, 3) or any(len(data[k]) != T for k in KEYS[2:]):
        raise BadRollout(f"{path}: arrays of different lengths")
    return data


def is_complete(path: str | os.PathLike) -> bool:
    try:
        read_rollout(path)
        return True
    except BadRollout:
        return False


def list_rollouts(data_dir: str | os.PathLike) -> list[Path]:
    """The rollout files in a folder, sorted; a clear error if there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise fail(f"rollout folder {data_dir} not found; run collect_rollouts.py first "
                   f"(or pass --data-dir)")
    files = sorted(data_dir.glob("rollout_*.npz"))
    if not files:
        raise fail(f"no rollout_*.npz files in {data_dir}; run collect_rollouts.py first")
    return files


def read_rollouts_skipping_bad(files: list[Path]):
    """Yield (path, data) for each readable rollout, warning about the others."""
    for p in files:
        try:
            yield p, read_rollout(p)
        except BadRollout as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
