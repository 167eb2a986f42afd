"""Train V, the ConvVAE, on the frames of the collected rollouts.

Frames stream from the rollout files a buffer of rollouts at a time, shuffled
within the buffer, so the data set never has to fit in memory (the paper's
10,000 rollouts are about 123 GB as uint8). Whole rollouts are held out for
validation, chosen by the seed. Each epoch writes, beside the checkpoints:
vae_metrics.csv, vae_loss.png, vae_recon.png (validation frames above their
reconstructions) and vae_samples.png (frames decoded from z drawn from the
prior). A rerun resumes from vae_last.pt; --restart starts over.

--recon-weighting road weights V's reconstruction error towards what matters
for driving: road, kerbs, the road's edges and the car's surroundings, marked
per frame from the game's palette (wm/frames.py, road_mask) as batches are
read. Validation also reports, whatever the weighting, the plain summed
squared error and the mean squared error on those pixels and on the rest, so
that Vs trained either way compare on one scale (see experiments/compare_vae.py).

    python train_vae.py --data-dir data/rollouts --ckpt-dir checkpoints --epochs 10
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import ConvVAE, VAEConfig
from models.vae import squared_error_by_region, vae_loss
from wm.checkpoint import keep_finished, resume_training, save_checkpoint
from wm.cli import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, fail, resolve_device, run_main
from wm.files import locked, writable_folder
from wm.frames import VIEWS, dashboard_mask, recon_weights, to_image, to_model_input
from wm.metrics import MetricsLog, image_grid
from wm.vae_training import (describe_weighting, frame_batches, make_optimizer, mean_or_nan, pick_precision,
                             prefetch, scan_rollouts, train_step, with_masks)


@dataclass
class Config:
    data_dir: str = "data/rollouts"  # folder of rollout_*.npz written by collect_rollouts.py
    ckpt_dir: str = "checkpoints"  # where vae.pt, vae_last.pt, the metrics and the pictures go
    epochs: int = 3  # passes over the training frames (paper: 10)
    batch_size: int = 100  # frames per step (paper: 100)
    lr: float = 1e-3  # Adam learning rate, the peak of a schedule (paper: 0.0001)
    lr_schedule: str = "cosine"  # constant (the paper's) or cosine: a linear warm-up over the first 2% of the steps, then a cosine decay to zero at the last epoch
    latent_size: int = 32  # size of z (paper: 32)
    kl_floor: float = 0.5  # free bits: KL floor per latent dimension, in nats (paper: 0.5)
    view: str = "full"  # what of the frame V sees (wm/frames.py): road (the paper's crop) or full (with the dashboard); the rollouts must be collected with the same --view
    recon_weighting: str = "dashboard"  # plain: every pixel alike (the paper); road: road, kerbs, edges and the car's surroundings weighted up (road view); dashboard: the dashboard's rows weighted up (full view) (wm/frames.py)
    road_weight: float = 10.0  # road weighting: a marked pixel's weight against 1 for grass, before scaling to mean 1 per frame (10: about 4/5 of the loss on about 28 in 100 pixels)
    dashboard_weight: float = 10.0  # dashboard weighting: a dashboard pixel's weight against 1 for the rest, before scaling to mean 1 (10: about 3/5 of the weight on the 1 in 8 pixels, most of them black)
    val_fraction: float = 0.1  # share of rollouts held out for validation (at least one)
    buffer_rollouts: int = 32  # rollouts whose frames are shuffled together; bounds memory
    precision: str = "auto"  # auto (bf16 on a CPU that has it, else fp32; fp32 on a GPU), bf16 or fp32
    threads: int = 0  # torch CPU threads; 0: one per core; 1 is far faster on a busy shared machine
    seed: int = 0  # seeds the validation split, the shuffling and the initial weights
    device: str = "auto"  # auto: CUDA when present, else CPU
    restart: bool = False  # ignore vae_last.pt and start from scratch

    # The range of each number option, checked in one line before main runs.
    RANGES = {"epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE, "latent_size": AT_LEAST_1,
              "kl_floor": NON_NEGATIVE, "road_weight": AT_LEAST_1,
              "dashboard_weight": AT_LEAST_1, "val_fraction": FRACTION,
              "buffer_rollouts": AT_LEAST_1, "threads": NON_NEGATIVE, "seed": NON_NEGATIVE}


WEIGHTINGS = ("plain", "road", "dashboard")
SCHEDULES = ("constant", "cosine")
WARMUP = 0.02  # share of the steps over which the cosine schedule's rate rises to --lr


def lr_at(cfg: Config, progress: float) -> float:
    """The learning rate at `progress`, the share of all epochs' steps done.
    A function of where training is, not a scheduler's state: a resumed run
    follows the schedule of the --epochs and --lr it is given."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if progress < WARMUP:
        return cfg.lr * (progress + 1e-3) / WARMUP
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP) / (1 - WARMUP))))


def check_weighting(cfg: Config) -> None:
    if cfg.lr_schedule not in SCHEDULES:
        raise fail(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.recon_weighting not in WEIGHTINGS:
        raise fail(f"--recon-weighting must be one of {', '.join(WEIGHTINGS)}, got {cfg.recon_weighting!r}")
    if cfg.view not in VIEWS:
        raise fail(f"--view must be one of {', '.join(VIEWS)}, got {cfg.view!r}")
    if cfg.recon_weighting == "road" and cfg.view != "road":
        # road_mask's box around the car is where the car sits in the road view.
        raise fail("--recon-weighting road marks the road view's pixels; use it with --view road")
    if cfg.recon_weighting == "dashboard" and cfg.view != "full":
        raise fail("--recon-weighting dashboard weights the dashboard, which only the full view shows; "
                   "use it with --view full, or pass --recon-weighting plain or road")


def refuse_other_settings(cfg: Config):
    """A resume check: vae_last.pt must have trained with this run's weighting
    (else the epochs would mix two objectives), and with its --seed and
    --val-fraction, which draw the split and the order."""
    def check(ckpt: dict) -> None:
        config = ckpt.get("config", {})
        was, now = describe_weighting(config), describe_weighting(asdict(cfg))
        if was != now:
            raise fail(f"{cfg.ckpt_dir}/vae_last.pt was trained with --recon-weighting {was}, this run "
                       f"asks for {now}; pass --restart to start over, or another --ckpt-dir")
        for key in ("seed", "val_fraction"):
            if key in config and config[key] != getattr(cfg, key):
                flag = "--" + key.replace("_", "-")
                raise fail(f"{cfg.ckpt_dir}/vae_last.pt was trained with {flag} {config[key]}, this run asks "
                           f"for {getattr(cfg, key)}; its validation rollouts would be redrawn: give "
                           f"{flag} {config[key]}, or pass --restart to start over")
    return check


def recorded_split(ckpt: dict, counts: dict[Path, int], data_dir: str) -> tuple[list[Path], list[Path]] | None:
    """The split a resumed run started with, as vae_last.pt records it, so
    that no rollout moves between training and validation (None for a file
    that records none). Rollouts added to the folder since are left out,
    rollouts gone from it are skipped, each with one line."""
    if "val_rollouts" not in ckpt:
        return None
    by_name = {f.name: f for f in counts}
    train = [by_name[n] for n in ckpt["train_rollouts"] if n in by_name]
    val = [by_name[n] for n in ckpt["val_rollouts"] if n in by_name]
    gone = len(ckpt["train_rollouts"]) + len(ckpt["val_rollouts"]) - len(train) - len(val)
    new = len(by_name) - len(train) - len(val)
    if not train or not val:
        raise fail(f"{data_dir} no longer holds the {'training' if not train else 'validation'} rollouts "
                   f"that vae_last.pt's run started with; give its --data-dir, or pass --restart")
    if gone:
        warnings.warn(f"{gone} of the rollouts this run started with are gone from {data_dir} or "
                      f"unreadable; going on without them", stacklevel=2)
    if new:
        print(f"{new} rollouts came to {data_dir} after this run started; it keeps its split and leaves "
              f"them out (--restart learns from them)")
    return train, val


# ---------------------------------------------------------------------------
# Data: rollout files -> shuffled uint8 batches, streamed


def split_rollouts(files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Hold out whole rollouts for validation, the same ones for the same seed."""
    if len(files) < 2:
        raise fail(f"need at least 2 rollouts (one to train on, one to validate on), found "
                   f"{len(files)}; run collect_rollouts.py with more --rollouts")
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val



def loss_weights(n: int, mask: torch.Tensor | None, cfg: Config, device: torch.device) -> torch.Tensor | None:
    """The per-pixel weights of the reconstruction error for a batch of `n`
    frames whose road masks are `mask` (n, 64, 64), on `device`; None (the
    paper's loss) for plain weighting."""
    if cfg.recon_weighting == "plain":
        return None
    if cfg.recon_weighting == "dashboard":
        return recon_weights(torch.from_numpy(dashboard_mask(n)).to(device), cfg.dashboard_weight)
    return recon_weights(mask.to(device, non_blocking=True), cfg.road_weight)  # (B, 64, 64)


@torch.no_grad()
def evaluate(model: ConvVAE, files: list[Path], cfg: Config, device: torch.device, bad: set[Path],
             n_show: int, total: int) -> tuple[dict[str, float], np.ndarray]:
    """Mean validation loss, recon and KL over all frames of `files`, in fp32 so
    that it compares across precisions, with a fixed z noise; and `n_show`
    validation frames spread evenly over the split, for the pictures.

    Whatever the weighting, also the plain recon (val_recon_plain, the paper's
    summed squared error) and the mean squared error per value on the pixels
    road_mask marks (val_mse_road) and on the rest (val_mse_rest), so that
    plain and weighted Vs compare on the same scale."""
    model.eval()
    torch.manual_seed(cfg.seed)
    sums, n = np.zeros(4), 0
    regions = torch.zeros(4, dtype=torch.float64)
    want = set(np.linspace(0, max(total - 1, 0), n_show).round().astype(int).tolist())
    shown = []
    for frames, mask in prefetch(with_masks(frame_batches(files, cfg.batch_size, cfg.buffer_rollouts, bad),
                                            masks=True)):
        x = to_model_input(frames, device)
        recon, mu, logvar = model(x)
        weights = loss_weights(len(frames), mask, cfg, device)
        loss, rec, kl = vae_loss(recon, x, mu, logvar, cfg.kl_floor, weights)
        plain = vae_loss(recon, x, mu, logvar, cfg.kl_floor)[1] if cfg.recon_weighting != "plain" else rec
        sums += np.array([loss.item(), rec.item(), kl.item(), plain.item()]) * len(x)
        regions += squared_error_by_region(recon, x, mask).cpu()
        shown += [frames[i - n].numpy() for i in sorted(want) if n <= i < n + len(x)]
        n += len(x)
    model.train()
    if n == 0:
        raise fail("every validation rollout is unreadable; run collect_rollouts.py again")
    loss, rec, kl, plain = (sums / n).tolist()
    road, n_road, rest, n_rest = regions.tolist()
    return {"val_loss": loss, "val_recon": rec, "val_kl": kl, "val_recon_plain": plain,
            "val_mse_road": mean_or_nan(road, n_road), "val_mse_rest": mean_or_nan(rest, n_rest)}, np.stack(shown)


@torch.no_grad()
def save_pictures(model: ConvVAE, shown: np.ndarray, ckpt_dir: Path, device: torch.device,
                  seed: int) -> None:
    """vae_recon.png: frames above their reconstructions (z = mu); vae_samples.png:
    frames decoded from the same prior draws every epoch."""
    model.eval()
    mu, _ = model.encode(to_model_input(shown, device))
    image_grid([shown, to_image(model.decode(mu))], ckpt_dir / "vae_recon.png",
               labels=["frame", "decoded"])
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * len(shown), model.cfg.latent_size, generator=g).to(device)
    samples = to_image(model.decode(z))
    image_grid([samples[:len(shown)], samples[len(shown):]], ckpt_dir / "vae_samples.png",
               labels=["z ~ N(0, I)", ""])
    model.train()


# ---------------------------------------------------------------------------


@locked("ckpt_dir", "--ckpt-dir")  # one run at a time writes there
def main(cfg: Config) -> dict:
    check_weighting(cfg)
    device = resolve_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ckpt_dir = Path(cfg.ckpt_dir)
    best_path, last_path = ckpt_dir / "vae.pt", ckpt_dir / "vae_last.pt"
    keep_finished(best_path, last_path, cfg.restart)

    counts = scan_rollouts(cfg.data_dir, cfg.view)
    train_files, val_files = split_rollouts(list(counts), cfg.val_fraction, cfg.seed)
    writable_folder(ckpt_dir, "--ckpt-dir")

    torch.manual_seed(cfg.seed)
    model_cfg = VAEConfig(latent_size=cfg.latent_size, view=cfg.view)
    model = ConvVAE(model_cfg).to(device)
    opt = make_optimizer(model, cfg.lr)
    start_epoch, best_val = 0, math.inf
    log = MetricsLog(ckpt_dir / "vae_metrics.csv")
    ckpt = resume_training(last_path, "vae", model, opt, asdict(model_cfg), cfg.restart,
                           check=refuse_other_settings(cfg))
    if ckpt is not None:
        start_epoch, best_val = ckpt["epoch"], ckpt["best_val_loss"]
        train_files, val_files = recorded_split(ckpt, counts, cfg.data_dir) or (train_files, val_files)
    n_train = sum(counts[f] for f in train_files)
    n_val = sum(counts[f] for f in val_files)
    log.truncate_after(start_epoch)
    if start_epoch >= cfg.epochs:
        print(f"{last_path} has already trained {start_epoch} epochs; raise --epochs to go on")
        return {"epoch": start_epoch, "best_val_loss": best_val}
    print(f"V: {sum(p.numel() for p in model.parameters()):,} parameters on {device}, "
          f"{'bf16 autocast' if dtype else 'fp32'}, {describe_weighting(asdict(cfg))} "
          f"reconstruction error; {n_train} training frames from "
          f"{len(train_files)} rollouts, {n_val} validation frames from {len(val_files)}")

    bad: set[Path] = set()
    row: dict = {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        rng = np.random.default_rng([cfg.seed, epoch])  # the same order on a resumed run
        torch.manual_seed(cfg.seed * 1000 + epoch)
        t0 = time.perf_counter()
        sums, n = np.zeros(3), 0
        bar = tqdm(total=n_train, desc=f"epoch {epoch}", unit="img", leave=False)
        batches = frame_batches(train_files, cfg.batch_size, cfg.buffer_rollouts, bad, rng)
        for frames, mask in prefetch(with_masks(batches, masks=cfg.recon_weighting == "road")):
            lr = lr_at(cfg, ((epoch - 1) * n_train + n) / (cfg.epochs * n_train))
            for group in opt.param_groups:  # also over the rate a resumed optimizer saved
                group["lr"] = lr
            try:
                values = train_step(model, opt, frames, device, dtype, cfg.kl_floor,
                                    loss_weights(len(frames), mask, cfg, device))
            except FloatingPointError as e:
                bar.close()
                raise fail(f"training diverged in epoch {epoch}: {e}; {last_path} is left as it "
                           f"was after epoch {epoch - 1} (try a lower --lr)")
            sums += np.array(values) * len(frames)
            n += len(frames)
            bar.update(len(frames))
            bar.set_postfix(loss=f"{values[0]:.1f}")
        bar.close()
        if n == 0:
            raise fail("every training rollout is unreadable; run collect_rollouts.py again")
        train_s = time.perf_counter() - t0
        val, shown = evaluate(model, val_files, cfg, device, bad, n_show=8, total=n_val)
        train_loss, train_recon, train_kl = sums / n
        best = val["val_loss"] < best_val
        best_val = min(best_val, val["val_loss"])
        row = {"epoch": epoch, "train_loss": train_loss, "train_recon": train_recon,
               "train_kl": train_kl, **val, "lr": lr, "img_per_s": n / train_s,
               "seconds": time.perf_counter() - t0}
        # Six significant digits, not four decimals: the per-region errors are ~0.001.
        row = {k: float(f"{float(v):.6g}") if k != "epoch" else v for k, v in row.items()}
        payload = {"kind": "vae", "model": model.state_dict(), "model_args": asdict(model_cfg),
                   "config": asdict(cfg), "optimizer": opt.state_dict(), "epoch": epoch,
                   **{k: v for k, v in row.items() if k != "epoch"}, "best_val_loss": best_val,
                   "train_rollouts": [f.name for f in train_files],
                   "val_rollouts": [f.name for f in val_files]}
        # The row first: killed before the checkpoint, the resumed run drops it
        # and redoes the epoch; the other way round, the row would be lost.
        log.append(row)
        if best:  # the one to use: weights only (Adam's state, twice their size, stays in vae_last.pt)
            save_checkpoint(best_path, {k: v for k, v in payload.items() if k != "optimizer"})
        save_checkpoint(last_path, payload)
        log.plot(ckpt_dir / "vae_loss.png", ["train_loss", "val_loss", "train_recon", "val_recon",
                                              "train_kl", "val_kl"],
                 title="V: loss per frame (recon: summed squared error; KL in nats)", logy=True)
        save_pictures(model, shown, ckpt_dir, device, cfg.seed)
        print(f"epoch {epoch}  train {train_loss:.1f} (recon {train_recon:.1f} kl {train_kl:.1f})  "
              f"val {row['val_loss']:.1f} (recon {row['val_recon']:.1f} kl {row['val_kl']:.1f}; "
              f"mse road {row['val_mse_road']:.4f} rest {row['val_mse_rest']:.4f})"
              f"{'  best' if best else ''}  {row['img_per_s']:.0f} img/s  {row['seconds']:.1f} s",
              flush=True)
    return row


if __name__ == "__main__":
    run_main(main, Config)
