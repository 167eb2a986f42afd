"""Compare Vs where driving looks: reconstruction error on the road and elsewhere.

For each V (a vae.pt of train_vae.py, trained with any --recon-weighting),
on frames that none of them trained on: the mean squared error per value
(colour channel in [0, 1]) on the pixels that wm/frames.py's road_mask marks
(road, kerbs, the road's edges, the car's surroundings), on the rest (grass),
and over the whole frame, and the paper's summed squared error per frame.
Frames are decoded from z = V's mean, which is what C sees.

The frames scored are those of the --data-dir rollouts on the tracks that
no V's vae.pt lists as trained on (train_rollouts): the validation rollouts
of Vs trained with the same --seed and --val-fraction on the same rollouts,
or of one V when the others trained on other tracks, or rollouts collected
on new tracks (collect_rollouts.py --seed). Writes --json (the numbers) and
--png: --show held-out frames spread evenly over them, the mask over them
(unmarked pixels dimmed), then each V's reconstruction, one row per V.

usage: python -m experiments.compare_vae --ckpts checkpoints/plain/vae.pt,checkpoints/road/vae.pt --data-dir data/rollouts --json vae_comparison.json --png vae_comparison.png
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import ConvVAE
from models.vae import squared_error_by_region
from wm.checkpoint import load_checkpoint, recorded_tracks
from wm.cli import AT_LEAST_1, NON_NEGATIVE, fail, resolve_device, run_main
from wm.files import writable_file, write_atomically
from wm.frames import to_image, to_model_input
from wm.metrics import image_grid
from wm.rollouts import track_of
from wm.vae_training import describe_weighting, frame_batches, mean_or_nan, prefetch, scan_rollouts, with_masks


@dataclass
class Config:
    ckpts: str = "checkpoints/pretrained/road_view/vae.pt"  # the Vs to compare: vae.pt files, separated by commas
    data_dir: str = "data/rollouts"  # rollouts; those on tracks no V trained on are scored
    max_rollouts: int = 0  # score only the first this many of those rollouts (0: all of them)
    batch_size: int = 250  # frames encoded at once
    show: int = 8  # held-out frames in the picture, spread evenly over them
    json: str = "vae_comparison.json"  # the numbers go here
    png: str = "vae_comparison.png"  # the picture goes here: frames, the mask, each V's reconstruction
    device: str = "auto"  # auto: CUDA when present, else CPU
    threads: int = 0  # torch CPU threads; 0: one per core

    # The range of each number option, checked in one line before main runs.
    RANGES = {"max_rollouts": NON_NEGATIVE, "batch_size": AT_LEAST_1, "show": AT_LEAST_1,
              "threads": NON_NEGATIVE}


def load_vaes(paths: list[str], device: torch.device) -> list[tuple[str, dict, ConvVAE]]:
    """(path, checkpoint, V in eval mode) for each path."""
    if not paths:
        raise fail("--ckpts names no vae.pt; pass one or more, separated by commas")
    vaes = []
    for path in paths:
        ckpt = load_checkpoint(path, kind="vae")
        vaes.append((path, ckpt, ConvVAE.from_checkpoint(ckpt).to(device).eval()))
    return vaes


def unseen_by_all(vaes: list[tuple[str, dict, ConvVAE]], data_dir: str) -> dict[Path, int]:
    """The rollouts of `data_dir` (and their frame counts) on tracks that no V
    trained on, matched by track as train_mdnrnn.py does."""
    trained = set()
    for path, ckpt, _ in vaes:
        tracks = recorded_tracks(ckpt, "train_rollouts")
        if tracks is None:
            raise fail(f"{path} does not record which rollouts V trained on (it predates that); "
                       f"retrain it with train_vae.py")
        trained |= tracks
    views = {vae.cfg.view for _, _, vae in vaes}
    if len(views) > 1:
        raise fail(f"the Vs see different views ({', '.join(sorted(views))}); compare Vs of one --view, "
                   f"on frames of that view")
    counts = {p: n for p, n in scan_rollouts(data_dir, views.pop()).items() if track_of(p) not in trained}
    if not counts:
        raise fail(f"every rollout in {data_dir} is on a track that some V trained on; point --data-dir at "
                   f"rollouts none trained on (a V's held-out ones, or collect_rollouts.py --seed with new tracks)")
    return counts


def overlay(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) frames with the pixels the mask leaves out dimmed to a third."""
    out = frames.copy()
    out[~mask] = out[~mask] // 3
    return out


@torch.no_grad()
def compare(vaes: list[tuple[str, dict, ConvVAE]], counts: dict[Path, int], cfg: Config,
            device: torch.device) -> tuple[dict, list[np.ndarray]]:
    """The numbers, and the picture's rows: frames, mask, each V's reconstruction."""
    files = sorted(counts)
    total = sum(counts.values())
    want = set(np.linspace(0, total - 1, min(cfg.show, total)).round().astype(int).tolist())
    regions = torch.zeros(len(vaes), 4, dtype=torch.float64)
    shown, masks, recons = [], [], [[] for _ in vaes]
    n, marked, bad = 0, 0, set()
    for frames, mask in prefetch(with_masks(frame_batches(files, cfg.batch_size, 1, bad),
                                            masks=True)):
        x = to_model_input(frames, device)
        keep = [i - n for i in sorted(want) if n <= i < n + len(x)]
        shown += [frames[keep].numpy()]
        masks += [mask[keep].numpy()]
        for v, (_, _, vae) in enumerate(vaes):
            recon = vae.decode(vae.encode(x)[0])  # z = mu, as C sees it
            regions[v] += squared_error_by_region(recon, x, mask).cpu()
            recons[v] += [to_image(recon[keep])]
        marked += int(mask.sum())
        n += len(x)
    if n == 0:
        raise fail(f"every held-out rollout in {cfg.data_dir} is unreadable; run collect_rollouts.py again")
    results = []
    for (path, ckpt, _), (road, n_road, rest, n_rest) in zip(vaes, regions.tolist()):
        results.append({
            "ckpt": str(path), "weighting": describe_weighting(ckpt.get("config", {})),
            "fingerprint": ckpt["fingerprint"], "epoch": ckpt.get("epoch"),
            "mse_road": mean_or_nan(road, n_road), "mse_rest": mean_or_nan(rest, n_rest),
            "mse_all": (road + rest) / (n_road + n_rest),
            "recon_per_frame": (road + rest) / n,  # the paper's summed squared error
        })
    summary = {"data_dir": cfg.data_dir, "rollouts": [f.name for f in files if f not in bad], "frames": n,
               "road_fraction": marked / (n * 64 * 64), "vaes": results}
    shown_frames, shown_masks = np.concatenate(shown), np.concatenate(masks)
    rows = [shown_frames, overlay(shown_frames, shown_masks)] + [np.concatenate(r) for r in recons]
    return summary, rows


def main(cfg: Config) -> dict:
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    writable_file(cfg.json, "--json")
    writable_file(cfg.png, "--png")
    vaes = load_vaes([p for p in cfg.ckpts.split(",") if p.strip()], device)
    counts = unseen_by_all(vaes, cfg.data_dir)
    if cfg.max_rollouts:
        counts = {p: counts[p] for p in sorted(counts)[:cfg.max_rollouts]}
    print(f"{len(vaes)} V(s) on {sum(counts.values())} frames of {len(counts)} rollouts that none trained on")
    summary, rows = compare(vaes, counts, cfg, device)
    print(f"{'V':<40} {'weighting':<10} {'mse road':>9} {'mse rest':>9} {'mse all':>9} {'recon':>7}")
    for r in summary["vaes"]:
        print(f"{r['ckpt']:<40} {r['weighting']:<10} {r['mse_road']:9.5f} {r['mse_rest']:9.5f} "
              f"{r['mse_all']:9.5f} {r['recon_per_frame']:7.2f}")
    print(f"road mask: {summary['road_fraction']:.1%} of the pixels")
    write_atomically(cfg.json, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    labels = ["held out", "road mask"] + [f"{i + 1}: {r['weighting']}" for i, r in enumerate(summary["vaes"])]
    image_grid(rows, cfg.png, labels=labels)
    print(f"wrote {cfg.json} and {cfg.png}")
    return summary


if __name__ == "__main__":
    run_main(main, Config)
