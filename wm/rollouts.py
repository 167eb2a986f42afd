"""Rollout files: one compressed .npz per episode, named by its seed.

Schema (T = number of steps):
    observations  uint8   (T, 64, 64, 3)  frame the policy saw before action t
    actions       float32 (T, 3)          steer, gas, brake
    rewards       float32 (T,)            reward for action t
    terminated    bool    (T,)
    truncated     bool    (T,)
    action_repeat int64   ()              frames each action was held, k (the reward
                                          sums all k); only when k > 1: a file
                                          without it, old or new, has k = 1
    view          str     ()              what of the game's frame the frames show
                                          (wm/frames.py); only when "full": a file
                                          without it has the paper's "road"
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np

from wm.cli import fail
from wm.files import alive, temporary_path, write_atomically
from wm.frames import FRAME_SIZE

KEYS = ("observations", "actions", "rewards", "terminated", "truncated")


def rollout_path(out_dir: str | os.PathLike, seed: int) -> Path:
    return Path(out_dir) / f"rollout_{seed:07d}.npz"


def rollout_seed(path: str | os.PathLike) -> int | None:
    """The track seed in a rollout's file name (rollout_path's inverse), or
    None for a name that holds none."""
    match = re.fullmatch(r"rollout_(\d+)\.npz", Path(path).name)
    return int(match[1]) if match else None


def track_of(path: str | os.PathLike) -> int | str:
    """The track a rollout drives: its seed, so that the same track collected
    into another folder (another --action-repeat) matches; the file name for
    a name that holds no seed."""
    seed = rollout_seed(path)
    return Path(path).name if seed is None else seed


def write_rollout(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write atomically: a kill leaves either the whole file or none."""
    write_atomically(path, lambda tmp: np.savez_compressed(tmp, **arrays))


class BadRollout(ValueError):
    pass


# What reading a truncated, corrupt or foreign .npz raises.
NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def load_arrays(path: str | os.PathLike, keys, error: type[Exception] = BadRollout,
                what: str = "rollout") -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz, or `error` naming the file as an
    unreadable `what` (rollout files here, latent files in wm/latents.py)."""
    try:
        with np.load(path) as f:
            return {k: f[k] for k in keys}
    except NPZ_ERRORS as e:
        raise error(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None


def read_rollout(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load and check one rollout; raise BadRollout naming the file if it is
    truncated, unreadable or not of the schema above."""
    path = Path(path)
    data = load_arrays(path, KEYS)
    obs = data["observations"]
    T = len(obs)
    if obs.dtype != np.uint8 or obs.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3):
        raise BadRollout(f"{path}: observations are {obs.shape} {obs.dtype}, "
                         f"expected (T, {FRAME_SIZE}, {FRAME_SIZE}, 3) uint8")
    if data["actions"].shape != (T, 3) or any(len(data[k]) != T for k in KEYS[2:]):
        raise BadRollout(f"{path}: arrays of different lengths")
    if T == 0:  # no episode has none: a file made by something else
        raise BadRollout(f"{path}: holds no steps")
    return data


# Settings a rollout records beside its arrays, and the value a file without
# one has: k and the view are recorded only when not their default (files from
# before they existed); the policy and the time limit always (older files: None,
# not known).
SETTINGS = {"action_repeat": 1, "view": "road", "policy": None, "max_steps": None}
FLAGS = {"action_repeat": "--action-repeat", "view": "--view", "policy": "--policy",
         "max_steps": "--max-steps"}  # collect_rollouts.py's


def read_setting(path: str | os.PathLike, key: str) -> int | str:
    """The `key` of SETTINGS a rollout was collected with; only that array is
    decompressed. BadRollout if the file is unreadable."""
    try:
        with np.load(path) as f:
            return f[key].item() if key in f.files else SETTINGS[key]
    except NPZ_ERRORS as e:
        raise BadRollout(f"{path}: unreadable rollout ({type(e).__name__}: {e})") from None


def game_frames(paths) -> int:
    """The real game frames of these rollouts: rows times the frames each
    action was held."""
    return sum(len(load_arrays(p, ["actions"])["actions"]) * read_setting(p, "action_repeat") for p in paths)


def by_setting(files: list[Path], key: str) -> dict[int | str, list[Path]]:
    """{value: the readable rollouts of `files` collected with that `key`}."""
    found: dict = {}
    for path in files:
        try:
            found.setdefault(read_setting(path, key), []).append(path)
        except BadRollout:
            pass  # the stages redo or skip unreadable files themselves
    return found


def folder_setting(data_dir: str | os.PathLike, files: list[Path], key: str, reader: str) -> int | str:
    """The `key` every rollout in the folder was collected with (its default
    when none is readable: the stage then skips them all); one line when they
    differ, since `reader` learns from one kind."""
    found = by_setting(files, key)
    if len(found) > 1:
        counts = ", ".join(f"{len(f)} with {FLAGS[key]} {v}" for v, f in sorted(found.items()))
        raise fail(f"{data_dir} mixes rollouts of different {FLAGS[key]} ({counts}); {reader} learns "
                   f"from one kind: move one kind to another folder and pass it as --data-dir")
    return next(iter(found), SETTINGS[key])


def array_headers(path: str | os.PathLike, keys=KEYS) -> dict[str, tuple[tuple, np.dtype]]:
    """{key: (shape, dtype)} of arrays in an .npz, read from the .npy headers
    alone, without decompressing the data; BadRollout if the file is
    truncated, unreadable or lacks a key."""
    try:
        with zipfile.ZipFile(path) as z:
            headers = {}
            for key in keys:
                with z.open(f"{key}.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                    headers[key] = (shape, dtype)
            return headers
    except NPZ_ERRORS as e:
        raise BadRollout(f"{path}: unreadable rollout ({type(e).__name__}: {e})") from None


def is_complete(path: str | os.PathLike) -> bool:
    """A cheap check that a rollout file is whole: its zip directory opens,
    every array is there, and their headers agree on the shapes. It reads
    headers only, so checking 10,000 files takes seconds, not minutes;
    `read_rollout` still checks the data itself when it is used."""
    try:
        shapes = array_headers(path)
    except BadRollout:
        return False
    obs_shape, obs_dtype = shapes["observations"]
    T = obs_shape[0]
    return (obs_dtype == np.uint8 and obs_shape[1:] == (FRAME_SIZE, FRAME_SIZE, 3)
            and shapes["actions"][0] == (T, 3)
            and all(shapes[k][0] == (T,) for k in KEYS[2:]))


def remove_stale_temporaries(out_dir: str | os.PathLike) -> None:
    """Temporary files left by a writer that was killed mid-write; those of
    a live process are left alone (the rule of wm/files.py)."""
    for tmp in Path(out_dir).glob(temporary_path(Path("rollout_*.npz"), "*").name):
        pid = tmp.name.split(".")[-3]  # .rollout_0010000.<pid>.tmp.npz
        if not (pid.isdigit() and alive(int(pid))):
            tmp.unlink(missing_ok=True)


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

