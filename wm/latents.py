"""The latent data set, and loading a matched (V, M) pair.

Every rollout is encoded by V once, into one file per rollout with the same
name under the latent folder (data/latents/rollout_0000042.npz beside
data/rollouts/rollout_0000042.npz). Schema (T = number of steps):

    mu, logvar       float32 (T, Z)  V's posterior for each frame
    actions          float32 (T, 3)  copied from the rollout
    rewards          float32 (T,)
    terminated       bool    (T,)
    truncated        bool    (T,)
    vae_fingerprint  str             the "fingerprint" of the vae.pt that encoded it
    source_bytes     int             size of the rollout file it was made from

A file is reused while both the fingerprint and the source size match; any
other file (made by another V, from a re-collected rollout, truncated by a
kill) is encoded again, so new rollouts cost only their own encoding.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from wm.checkpoint import load_checkpoint
from wm.cli import fail
from wm.frames import to_model_input
from wm.rollouts import BadRollout, load_arrays, read_rollout, write_rollout

LATENT_KEYS = ("mu", "logvar", "actions", "rewards", "terminated", "truncated",
               "vae_fingerprint", "source_bytes")


class BadLatents(ValueError):
    pass


def latent_path(latent_dir: str | os.PathLike, rollout: str | os.PathLike) -> Path:
    return Path(latent_dir) / Path(rollout).name


def read_latents(path: str | os.PathLike, vae_fingerprint: str | None = None,
                 source_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Load one latent file; raise BadLatents if it is unreadable, of the
    wrong schema, or (when given) made by another V or from another rollout."""
    path = Path(path)
    data = load_arrays(path, LATENT_KEYS, BadLatents, "latent file")
    mu, T = data["mu"], len(data["mu"])
    if mu.ndim != 2 or data["logvar"].shape != mu.shape or mu.dtype != np.float32:
        raise BadLatents(f"{path}: mu/logvar are {mu.shape} {mu.dtype}, expected (T, Z) float32")
    if data["actions"].shape != (T, 3) or any(len(data[k]) != T for k in LATENT_KEYS[3:6]):
        raise BadLatents(f"{path}: arrays of different lengths")
    if vae_fingerprint is not None and str(data["vae_fingerprint"]) != vae_fingerprint:
        raise BadLatents(f"{path}: encoded by another V ({data['vae_fingerprint']})")
    if source_bytes is not None and int(data["source_bytes"]) != source_bytes:
        raise BadLatents(f"{path}: made from another version of its rollout")
    return data


@torch.no_grad()
def encode_frames(vae, frames: np.ndarray, device: torch.device | str,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(T, 64, 64, 3) uint8 frames -> V's mu and logvar, each (T, Z) float32."""
    mus, logvars = [], []
    for i in range(0, len(frames), batch_size):
        mu, logvar = vae.encode(to_model_input(frames[i:i + batch_size], device))  # (b, Z)
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


def encode_rollouts(rollout_files: list[Path], latent_dir: str | os.PathLike, vae,
                    vae_fingerprint: str, device: torch.device | str = "cpu",
                    batch_size: int = 256, progress: bool = True) -> list[tuple[Path, dict]]:
    """Bring the latent folder up to date with `rollout_files` and V, and load it.

    Returns (rollout path, latent arrays) for every readable rollout, in order.
    Up-to-date files are read back; the others are encoded with V, in batches
    of `batch_size` frames, and written atomically. Unreadable rollouts are
    skipped with a warning, as in the other stages.
    """
    latent_dir = Path(latent_dir)
    latent_dir.mkdir(parents=True, exist_ok=True)
    loaded: dict[Path, dict] = {}
    stale = []
    for rollout in rollout_files:
        try:
            loaded[rollout] = read_latents(latent_path(latent_dir, rollout), vae_fingerprint,
                                           rollout.stat().st_size)
        except BadLatents:
            stale.append(rollout)
    if stale:
        was_training = vae.training
        vae.eval()
        for rollout in tqdm(stale, desc="encoding rollouts", unit="rollout", disable=not progress):
            try:
                data = read_rollout(rollout)
            except BadRollout as e:
                warnings.warn(f"skipping {e}", stacklevel=2)
                continue
            mu, logvar = encode_frames(vae, data["observations"], device, batch_size)
            latents = {"mu": mu, "logvar": logvar,
                       **{k: data[k] for k in ("actions", "rewards", "terminated", "truncated")},
                       "vae_fingerprint": np.array(vae_fingerprint),
                       "source_bytes": np.array(rollout.stat().st_size, dtype=np.int64)}
            write_rollout(latent_path(latent_dir, rollout), **latents)  # the same atomic npz writer
            loaded[rollout] = latents
        vae.train(was_training)
    if progress:
        print(f"latents: {len(rollout_files) - len(stale)} reused, {len(stale)} encoded "
              f"in {latent_dir} (V {vae_fingerprint})")
    return [(r, loaded[r]) for r in rollout_files if r in loaded]


def check_latent_size(latents: list[tuple[Path, dict]], latent_size: int) -> None:
    """A clear error for latents of another size than the model that will read them."""
    for path, data in latents:
        if data["mu"].shape[1] != latent_size:
            raise fail(f"latents for {path.name} have {data['mu'].shape[1]} dimensions but the "
                       f"model expects {latent_size}; they come from another V: delete the "
                       f"latent folder and rerun train_mdnrnn.py to re-encode")


class WorldModel(NamedTuple):
    """V and M, frozen, in eval mode, on one device, known to belong together."""
    vae: torch.nn.Module
    mdnrnn: torch.nn.Module
    vae_fingerprint: str
    mdnrnn_fingerprint: str


def check_pair(vae_ckpt: dict, mdnrnn_ckpt: dict, vae_name: str = "vae.pt",
               mdnrnn_name: str = "mdnrnn.pt") -> None:
    """Raise a one-line error unless M was trained on exactly this V."""
    trained_on = mdnrnn_ckpt.get("vae_fingerprint")
    if trained_on != vae_ckpt.get("fingerprint"):
        raise fail(f"{mdnrnn_name} was trained on another V (vae fingerprint {trained_on}) than "
                   f"{vae_name} ({vae_ckpt.get('fingerprint')}); rerun train_mdnrnn.py on this V")
    z_v = vae_ckpt["model_args"]["latent_size"]
    z_m = mdnrnn_ckpt["model_args"]["latent_size"]
    if z_v != z_m:
        raise fail(f"{mdnrnn_name} expects latents of size {z_m}, {vae_name} makes {z_v}; "
                   f"rerun train_mdnrnn.py on this V")


def load_world_model(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                     vae_name: str = "vae.pt", mdnrnn_name: str = "mdnrnn.pt") -> WorldModel:
    """Load vae.pt and mdnrnn.pt from `ckpt_dir` as a matched pair, or fail with
    one line naming the script to run. The models are frozen (no gradients):
    C never trains them."""
    from models import MDNRNN, ConvVAE  # here, so that wm does not import models at import time

    ckpt_dir = Path(ckpt_dir)
    vae_ckpt = load_checkpoint(ckpt_dir / vae_name, kind="vae")
    m_ckpt = load_checkpoint(ckpt_dir / mdnrnn_name, kind="mdnrnn")
    check_pair(vae_ckpt, m_ckpt, str(ckpt_dir / vae_name), str(ckpt_dir / mdnrnn_name))
    vae = ConvVAE.from_checkpoint(vae_ckpt).to(device).eval().requires_grad_(False)
    mdnrnn = MDNRNN.from_checkpoint(m_ckpt).to(device).eval().requires_grad_(False)
    return WorldModel(vae, mdnrnn, vae_ckpt["fingerprint"], m_ckpt["fingerprint"])
