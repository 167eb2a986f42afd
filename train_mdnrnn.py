"""Train M, the MDN-RNN, on rollouts encoded by V.

Encodes the rollouts with checkpoints/vae.pt into data/latents/ first (only
those missing or stale), then trains M to predict z_{t+1}, the reward and the
episode's end from z_t and a_t. Writes checkpoints/mdnrnn.pt (best validation
loss), mdnrnn_last.pt (to resume from), mdnrnn_metrics.csv, mdnrnn_loss.png
and, after training, mdnrnn_strip.png: real frames, V's reconstructions, M's
one-step predictions and an open-loop dream on a held-out rollout. M holds
out the rollouts on V's validation tracks (vae.pt records them), so neither
V nor M trained on the tracks of its held-out loss and strip. A rerun
resumes from mdnrnn_last.pt; --restart starts over.

M steps once per row of the rollouts: every k-th game frame for rollouts
collected with --action-repeat k. mdnrnn.pt records k (model_args), and a
folder that mixes rollouts of different k is refused.

usage: python train_mdnrnn.py --data-dir data/rollouts --ckpt-dir checkpoints --epochs 20
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import MIXTURES, MDNRNN, ConvVAE, MDNRNNConfig, mdn_loss
from wm.checkpoint import keep_finished, load_checkpoint, recorded_tracks, resume_training, save_checkpoint
from wm.cli import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, fail, resolve_device, run_main
from wm.files import locked, writable_folder
from wm.frames import to_image
from wm.latents import check_latent_size, encode_rollouts
from wm.metrics import MetricsLog, image_grid
from wm.rollouts import folder_setting, list_rollouts, read_rollout, track_of


@dataclass
class Config:
    data_dir: str = "data/rollouts"  # rollout files, written by collect_rollouts.py
    latent_dir: str = "data/latents"  # V's encodings of the rollouts, rebuilt when vae.pt changes
    ckpt_dir: str = "checkpoints"  # vae.pt is read here; mdnrnn.pt, mdnrnn_last.pt and plots written
    epochs: int = 20  # passes over the training sequences (the paper's code: 4,000 batches of 100)
    seq_len: int = 100  # steps per training sequence; longer rollouts are cut into pieces
    batch_size: int = 32  # sequences per batch
    lr: float = 1e-3  # Adam learning rate (the paper's code: 0.001)
    grad_clip: float = 1.0  # max gradient norm (the paper's code: 1.0)
    hidden_size: int = 256  # LSTM units (the paper: 256)
    n_gaussians: int = 5  # mixture components (the paper: 5)
    mixture: str = "dim"  # dim: a mixture per dimension of z (the paper's code); frame: K whole frames (models/mdnrnn.py)
    reward_weight: float = 1.0  # weight of the reward regression term (0 turns the head off)
    done_weight: float = 1.0  # weight of the episode-end term (0 turns the head off)
    val_fraction: float = 0.1  # share of rollouts held out when vae.pt records no split (else: V's validation tracks)
    encode_batch: int = 256  # frames per V forward pass when encoding
    strip_steps: int = 12  # frames in the strip PNG
    strip_every: int = 5  # show every k-th step in the strip (M still steps every row)
    strip_start: int = 100  # row the strip's dream starts from (CarRacing zooms in first)
    dream_temperature: float = 1.0  # tau for the strip's dream (the paper's Doom dreams: 1.15)
    restart: bool = False  # ignore mdnrnn_last.pt and start from scratch (else a rerun resumes)
    init_from: str = ""  # a fresh start's weights: this mdnrnn.pt's (fine-tuning an M on new rollouts) instead of random ones
    head_only: bool = False  # with --init-from: train the mixture head alone; the LSTM and the reward and done heads keep its weights
    seed: int = 0  # data split, batch order and z sampling
    device: str = "auto"  # auto, cpu or cuda

    # The range of each number option, checked in one line before main runs.
    RANGES = {"epochs": AT_LEAST_1, "seq_len": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE,
              "grad_clip": POSITIVE, "hidden_size": AT_LEAST_1, "n_gaussians": AT_LEAST_1,
              "reward_weight": NON_NEGATIVE, "done_weight": NON_NEGATIVE, "val_fraction": FRACTION,
              "encode_batch": AT_LEAST_1, "strip_steps": AT_LEAST_1, "strip_every": AT_LEAST_1,
              "strip_start": NON_NEGATIVE, "dream_temperature": POSITIVE, "seed": NON_NEGATIVE}


def make_windows(latents: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """Cut every rollout into sequences of `seq_len` steps, padded at the end.

    Step t of a sequence has input (z_t, a_t) and targets z_{t+1}, r_t, done_t.
    The last step of a rollout has no z_{t+1} (the rollout stores no frame
    after the final action) but keeps its reward and done targets, which is
    where the episode's end is. Returns (N = number of sequences):
        mu, logvar  (N, L + 1, Z)   frames t .. t + L
        actions     (N, L, A)
        rewards, done, step_mask, z_mask   (N, L)
    """
    L = seq_len
    out = {k: [] for k in ("mu", "logvar", "actions", "rewards", "done", "step_mask", "z_mask")}
    for d in latents:
        T = len(d["mu"])
        for s in range(0, T, L):
            n = min(L, T - s)  # steps in this piece
            frames = min(L + 1, T - s)
            pad_f = ((0, L + 1 - frames), (0, 0))
            out["mu"].append(np.pad(d["mu"][s:s + frames], pad_f))
            out["logvar"].append(np.pad(d["logvar"][s:s + frames], pad_f))
            out["actions"].append(np.pad(d["actions"][s:s + n], ((0, L - n), (0, 0))))
            out["rewards"].append(np.pad(d["rewards"][s:s + n], (0, L - n)))
            # Only termination ends a dream; truncation is the time limit, not the track.
            out["done"].append(np.pad(d["terminated"][s:s + n].astype(np.float32), (0, L - n)))
            out["step_mask"].append(np.arange(L) < n)
            out["z_mask"].append(np.arange(L) < frames - 1)
    return {k: torch.as_tensor(np.stack(v)).float() for k, v in out.items()}


def sample_z(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """z drawn afresh from each frame's posterior (the paper's augmentation)."""
    return mu + torch.randn(mu.shape, generator=generator) * torch.exp(0.5 * logvar)


def run_epoch(model, windows, cfg: Config, device, generator: torch.Generator,
              optimizer=None, desc: str = "") -> dict[str, float]:
    """One pass over `windows`: trains when an optimizer is given, else evaluates.
    Returns the step-weighted mean of each loss term and the sequences/s."""
    n = len(windows["actions"])
    order = torch.randperm(n, generator=generator) if optimizer else torch.arange(n)
    sums = {"loss": 0.0, "nll": 0.0, "reward": 0.0, "done": 0.0}
    weight = 0.0
    model.train(optimizer is not None)
    t0 = time.perf_counter()
    for i in tqdm(range(0, n, cfg.batch_size), desc=desc, leave=False, unit="batch"):
        idx = order[i:i + cfg.batch_size]
        z = sample_z(windows["mu"][idx], windows["logvar"][idx], generator).to(device)  # (B, L+1, Z)
        b = {k: windows[k][idx].to(device) for k in ("actions", "rewards", "done", "step_mask", "z_mask")}
        with torch.set_grad_enabled(optimizer is not None):
            out, _ = model(z[:, :-1], b["actions"])
            loss = mdn_loss(out, z[:, 1:], b["rewards"], b["done"], b["z_mask"], b["step_mask"],
                            cfg.reward_weight, cfg.done_weight)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        w = float(b["step_mask"].sum())
        weight += w
        for k, v in zip(sums, loss):
            sums[k] += float(v.detach()) * w
    seconds = time.perf_counter() - t0
    return {**{k: v / max(weight, 1.0) for k, v in sums.items()}, "seq_per_s": n / seconds}


@torch.no_grad()
def save_strip(vae, model, rollout_path: Path, latents: dict, cfg: Config, device, png: Path) -> None:
    """Real frames, V's reconstructions, M's one-step predictions (decoded) and
    an open-loop dream from the same frame with the same actions."""
    vae.eval()
    model.eval()
    frames = read_rollout(rollout_path)["observations"]
    T = len(frames)
    n = max(1, min(cfg.strip_steps * cfg.strip_every, T - 1))  # steps dreamed
    s = max(0, min(cfg.strip_start, T - 1 - n))  # the dream starts from frame s
    shown = torch.arange(min(cfg.strip_every, n) - 1, n, cfg.strip_every)  # columns, as steps after s
    mu = torch.as_tensor(latents["mu"], device=device)  # (T, Z)
    actions = torch.as_tensor(latents["actions"], device=device)  # (T, A)
    # Teacher-forced pass over the real latents from the rollout's start, so
    # that M's memory at frame s is what the agent would have had.
    out, _ = model(mu[None, :s + n], actions[None, :s + n])
    one_step = model.sample_next_z(out, 0.0)[0, s:s + n]  # (n, Z), most likely component's mean
    state = model(mu[None, :s], actions[None, :s])[1] if s > 0 else model.initial_state(1, device)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    z, dream = mu[None, s], []
    for t in range(s, s + n):
        step_out, state = model.step(z, actions[None, t], state)
        z = model.sample_next_z(step_out, cfg.dream_temperature, g)  # (1, Z)
        dream.append(z[0])
    real = shown + s + 1  # frame indices of the columns
    rows = [frames[real.numpy()],
            to_image(vae.decode(mu[real.to(device)])),
            to_image(vae.decode(one_step[shown.to(device)])),
            to_image(vae.decode(torch.stack(dream)[shown.to(device)]))]
    image_grid(rows, png, labels=["real", "V recon", "M one-step", "M dream"])


def check_view(data_dir: str, files: list[Path], vae: ConvVAE) -> None:
    """M learns from V's codes of the rollouts' frames: V must have learned
    frames of the same view, or its codes mean nothing."""
    view = folder_setting(data_dir, files, "view", "M")
    if view != vae.cfg.view:
        raise fail(f"{data_dir} holds frames of --view {view}, but vae.pt learned --view {vae.cfg.view}; "
                   f"collect rollouts with collect_rollouts.py --view {vae.cfg.view} for M")


def hold_out_like_v(latents: list[tuple[Path, dict]], vae_ckpt: dict,
                    cfg: Config) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]]]:
    """Split (rollout, latents) pairs into M's training and held-out sets.

    M holds out the rollouts on V's validation tracks (vae.pt's
    `val_rollouts`), matched by track seed, so that M on another folder of the
    same tracks (another --action-repeat) holds out the same tracks: its
    held-out loss and strip are then on tracks neither V nor M learned from.
    A vae.pt that records no split, or none of whose validation tracks is in
    --data-dir, gets a warning and the old rule: every m-th rollout in file
    order, m = 1 / --val-fraction (the last one when none is; at least one
    when there are two)."""
    v_val = recorded_tracks(vae_ckpt, "val_rollouts")
    if v_val is not None:
        val = [pair for pair in latents if track_of(pair[0]) in v_val]
        if val and len(val) == len(latents):
            raise fail(f"every rollout in {cfg.data_dir} is on one of V's validation tracks, which M "
                       f"holds out too, so none is left to train on; collect rollouts of other tracks "
                       f"into it with collect_rollouts.py")
        if val:
            return [pair for pair in latents if track_of(pair[0]) not in v_val], val
        why = f"none of the {len(latents)} rollouts in {cfg.data_dir} is on V's validation tracks"
    else:
        why = "vae.pt does not record which rollouts V held out (it predates that)"
    if len(latents) < 2:
        print(f"warning: {why}, and one rollout is all there is: M holds none out", file=sys.stderr)
        return latents, []
    # Every m-th file in name order, else the last: a folder that grows by
    # newer tracks (a loop that collects every round) keeps its split, and
    # the newest rollouts are trained on too.
    every = max(1, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else len(latents) + 1
    val_at = set(range(every - 1, len(latents), every)) or {len(latents) - 1}
    val_at.discard(0)  # one is left to train on
    print(f"warning: {why}; M holds out every {every}th of them instead ({len(val_at)}), which V may "
          f"have trained on", file=sys.stderr)
    return ([p for i, p in enumerate(latents) if i not in val_at],
            [p for i, p in enumerate(latents) if i in val_at])


def init_from(path: str, model: MDNRNN, mcfg: MDNRNNConfig, vae_fp: str) -> None:
    """Start from the weights of the mdnrnn.pt at `path`: an M of this size,
    trained on codes of this V. An M of the other mixture gives its LSTM and
    its reward and done heads; the mixture head starts fresh."""
    if not Path(path).is_file():
        raise fail(f"--init-from {path}: no such file; give the mdnrnn.pt to fine-tune")
    ckpt = load_checkpoint(path, kind="mdnrnn")
    if ckpt.get("vae_fingerprint") != vae_fp:
        raise fail(f"--init-from {path} learned the codes of another V (vae fingerprint "
                   f"{ckpt.get('vae_fingerprint')}, vae.pt is {vae_fp}); give an M trained with this vae.pt")
    saved = asdict(MDNRNNConfig(**ckpt["model_args"]))
    if {**saved, "mixture": mcfg.mixture} != asdict(mcfg):
        raise fail(f"--init-from {path} is an M with {saved}, this run's has {asdict(mcfg)}; match "
                   f"--hidden-size, --n-gaussians and the heads' weights, or give another mdnrnn.pt")
    weights, new_head = ckpt["model"], saved["mixture"] != mcfg.mixture
    if new_head:
        weights = {k: v for k, v in weights.items() if not k.startswith("mdn.")}
    model.load_state_dict(weights, strict=not new_head)
    print(f"starting from {path}'s weights (epoch {ckpt.get('epoch')}, val {ckpt.get('val_loss')})"
          + (f", with a new {mcfg.mixture} mixture head" if new_head else ""))


@locked("ckpt_dir", "--ckpt-dir")  # one run at a time writes there
def main(cfg: Config) -> dict:
    if cfg.mixture not in MIXTURES:
        raise fail(f"--mixture must be one of {', '.join(MIXTURES)}, got {cfg.mixture!r}")
    if cfg.head_only and not cfg.init_from:
        raise fail("--head-only trains the mixture head on another M's LSTM; give that mdnrnn.pt with --init-from")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ckpt_dir = Path(cfg.ckpt_dir)
    keep_finished(ckpt_dir / "mdnrnn.pt", ckpt_dir / "mdnrnn_last.pt", cfg.restart)
    rollout_files = list_rollouts(cfg.data_dir)
    action_repeat = folder_setting(cfg.data_dir, rollout_files, "action_repeat", "M")
    vae_ckpt = load_checkpoint(ckpt_dir / "vae.pt", kind="vae")
    vae = ConvVAE.from_checkpoint(vae_ckpt).to(device)
    check_view(cfg.data_dir, rollout_files, vae)
    vae_fp = vae_ckpt["fingerprint"]
    writable_folder(cfg.latent_dir, "--latent-dir")
    writable_folder(ckpt_dir, "--ckpt-dir")
    latents = encode_rollouts(rollout_files, cfg.latent_dir, vae, vae_fp, device, cfg.encode_batch)
    if not latents:
        raise fail(f"no readable rollouts in {cfg.data_dir}; rerun collect_rollouts.py")

    mcfg = MDNRNNConfig(latent_size=vae_ckpt["model_args"]["latent_size"],
                        action_size=latents[0][1]["actions"].shape[1],
                        hidden_size=cfg.hidden_size, n_gaussians=cfg.n_gaussians, mixture=cfg.mixture,
                        predict_reward=cfg.reward_weight > 0, predict_done=cfg.done_weight > 0,
                        action_repeat=action_repeat)
    check_latent_size(latents, mcfg.latent_size)

    train_set, val_set = hold_out_like_v(latents, vae_ckpt, cfg)
    train_w = make_windows([d for _, d in train_set], cfg.seq_len)
    val_w = make_windows([d for _, d in val_set], cfg.seq_len) if val_set else None
    print(f"{len(train_set)} train / {len(val_set)} held-out rollouts, {len(train_w['actions'])} "
          f"train sequences of {cfg.seq_len} steps, latent size {mcfg.latent_size}, device {device}")

    model = MDNRNN(mcfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    metrics = MetricsLog(ckpt_dir / "mdnrnn_metrics.csv")
    start_epoch, best = 0, math.inf
    last_path = ckpt_dir / "mdnrnn_last.pt"
    def same_v(last: dict) -> None:
        if last.get("vae_fingerprint") != vae_fp:
            raise fail(f"{last_path} was trained on another V (vae fingerprint "
                       f"{last.get('vae_fingerprint')}, vae.pt is {vae_fp}); pass --restart "
                       f"to train a new M on this V")

    last = resume_training(last_path, "mdnrnn", model, optimizer, asdict(mcfg), cfg.restart, same_v)
    if last is not None:
        start_epoch, best = last["epoch"], last["best_val"]
    elif cfg.init_from:
        init_from(cfg.init_from, model, mcfg, vae_fp)
    metrics.truncate_after(start_epoch)
    if cfg.head_only:  # the dynamics M learned stay as they were; only how it draws z changes
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("mdn."))

    print(f"M: {sum(p.numel() for p in model.parameters()):,} parameters")
    row = {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        # A generator per epoch, so a resumed run draws the same batches and z as an unbroken one.
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        train = run_epoch(model, train_w, cfg, device, g, optimizer, desc=f"epoch {epoch}")
        # Validation draws the same z every epoch, so its curve compares epochs, not noise.
        val = run_epoch(model, val_w, cfg, device, torch.Generator().manual_seed(cfg.seed + 1),
                        desc="val") if val_w is not None else train
        seconds = time.perf_counter() - t0
        if not all(math.isfinite(v["loss"]) for v in (train, val)):
            raise fail(f"training diverged in epoch {epoch} (train loss {train['loss']}, val {val['loss']}); "
                       f"{last_path} is left as it was after epoch {epoch - 1} (try a lower --lr, or "
                       f"check the rollouts' rewards for inf or NaN)")
        row = {"epoch": epoch, **{f"train_{k}": round(v, 5) for k, v in train.items() if k != "seq_per_s"},
               **{f"val_{k}": round(v, 5) for k, v in val.items() if k != "seq_per_s"},
               "seq_per_s": round(train["seq_per_s"], 1), "seconds": round(seconds, 2)}
        metrics.append(row)
        metrics.plot(ckpt_dir / "mdnrnn_loss.png", ["train_loss", "val_loss", "train_nll", "val_nll"],
                     title="M: mixture NLL (nats per dim of z) + reward + done", ylabel="loss")
        is_best = val["loss"] < best
        best = min(best, val["loss"])
        payload = {"kind": "mdnrnn", "model": model.state_dict(), "model_args": asdict(mcfg),
                   "config": asdict(cfg), "optimizer": optimizer.state_dict(), "epoch": epoch,
                   "vae_fingerprint": vae_fp, "train_loss": train["loss"], "val_loss": val["loss"],
                   "best_val": best, "train_rollouts": [p.name for p, _ in train_set],
                   "val_rollouts": [p.name for p, _ in val_set]}
        if is_best:  # the one to use: weights only (the optimizer stays in mdnrnn_last.pt)
            save_checkpoint(ckpt_dir / "mdnrnn.pt", {k: v for k, v in payload.items() if k != "optimizer"})
        save_checkpoint(last_path, payload)
        print(f"epoch {epoch}  train {train['loss']:.4f} (nll {train['nll']:.4f} reward "
              f"{train['reward']:.4f} done {train['done']:.4f})  val {val['loss']:.4f}  "
              f"{train['seq_per_s']:.0f} seq/s  {seconds:.1f} s{'  best' if is_best else ''}")

    best_ckpt = load_checkpoint(ckpt_dir / "mdnrnn.pt", kind="mdnrnn")
    model.load_state_dict(best_ckpt["model"])
    strip_path, strip_latents = (val_set or train_set)[0]
    save_strip(vae, model, strip_path, strip_latents, cfg, device, ckpt_dir / "mdnrnn_strip.png")
    print(f"wrote {ckpt_dir / 'mdnrnn.pt'} (val {best_ckpt['val_loss']:.4f}) and {ckpt_dir / 'mdnrnn_strip.png'}")
    return row


if __name__ == "__main__":
    run_main(main, Config)
