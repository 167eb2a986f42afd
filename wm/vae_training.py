"""What V's training shares with the scripts that measure or compare Vs
(bench/, experiments/compare_vae.py): the stream of frames from rollout files,
read in a background thread, the precision, the optimizer and one training step."""

from __future__ import annotations

import math
import queue
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from models import ConvVAE
from models.vae import vae_loss
from wm.cli import fail
from wm.frames import FRAME_SIZE, road_mask, to_model_input
from wm.rollouts import BadRollout, array_headers, folder_setting, list_rollouts, read_rollout


def describe_weighting(config: dict) -> str:
    """How the V of a checkpoint's `config` weighted its reconstruction error:
    plain, or road or dashboard with its weight. A V from before the option is plain."""
    kind = config.get("recon_weighting", "plain")
    if kind == "plain":
        return "plain"
    return f"{kind} x{config[kind + '_weight']:g}"


def frame_count(path: Path) -> int:
    """Frames in a rollout, read from the .npy header alone (no decompression
    of the frames); BadRollout if unreadable, a clear error if of the wrong shape."""
    shape, dtype = array_headers(path, ["observations"])["observations"]
    if len(shape) != 4 or shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3) or dtype != np.uint8:
        raise fail(f"{path}: frames are {shape} {dtype}, expected (T, {FRAME_SIZE}, {FRAME_SIZE}, 3) "
                   f"uint8; collect the rollouts again with collect_rollouts.py")
    return shape[0]


def scan_rollouts(data_dir: str, view: str) -> dict[Path, int]:
    """The readable rollouts of a folder and their frame counts, warning about
    the others; one line when their frames are not of `view`."""
    files = list_rollouts(data_dir)
    found = folder_setting(data_dir, files, "view", "V")
    if found != view:
        raise fail(f"{data_dir} holds frames of --view {found}, this V asks for --view {view}; pass "
                   f"--view {found}, or collect rollouts with collect_rollouts.py --view {view}")
    counts = {}
    for path in files:
        try:
            counts[path] = frame_count(path)
        except BadRollout as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
    if not counts:
        raise fail(f"no readable rollouts in {data_dir}; run collect_rollouts.py again")
    return counts


def frame_batches(files: list[Path], batch_size: int, buffer_rollouts: int, bad: set[Path],
                  rng: np.random.Generator | None = None):
    """Yield (B, 64, 64, 3) uint8 batches from the files, reading `buffer_rollouts`
    files at a time. With `rng`, files and frames are shuffled (frames across the
    files of one buffer); without, batches come in file order. A file that turns
    out unreadable is warned about once, added to `bad` and skipped."""
    order = rng.permutation(len(files)) if rng is not None else np.arange(len(files))
    carry = np.zeros((0, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)  # frames short of a batch
    for start in range(0, len(order), buffer_rollouts):
        frames = [carry]
        for i in order[start:start + buffer_rollouts]:
            if files[i] in bad:
                continue
            try:
                frames.append(read_rollout(files[i])["observations"])
            except BadRollout as e:
                bad.add(files[i])
                warnings.warn(f"skipping {e}", stacklevel=2)
        frames = np.concatenate(frames)
        if rng is not None:
            frames = frames[rng.permutation(len(frames))]
        full = len(frames) // batch_size * batch_size
        for s in range(0, full, batch_size):
            yield frames[s:s + batch_size]
        carry = frames[full:].copy()  # a copy, so that this buffer can be freed
    if len(carry):
        yield carry


def with_masks(batches, masks: bool):
    """(frames, road_mask(frames) or None) per batch. Run inside `prefetch`,
    the masks are computed once per frame in its thread, beside the reading,
    not in the training loop."""
    for frames in batches:
        yield frames, (road_mask(frames) if masks else None)


def _as_tensors(batch):
    """A numpy batch, or a tuple of them (None stays None), as torch tensors."""
    if isinstance(batch, tuple):
        return tuple(None if a is None else torch.from_numpy(a) for a in batch)
    return torch.from_numpy(batch)


_DONE = object()


def prefetch(batches, depth: int = 4):
    """Run a batch generator in a background thread, so that reading and
    decompressing the next rollouts overlaps training on these ones. An error
    in the thread is raised here; leaving the loop early stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for b in batches:
                if not put(_as_tensors(b)):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread, raised there
            put(e)

    threading.Thread(target=work, daemon=True, name="frame-prefetch").start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------
# Speed: precision and optimizer


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. auto: bf16 only on a CPU
    that computes it natively (emulated bf16 is slower than fp32), fp32 on a
    GPU, where V is too small for bf16 to pay (bench.py vae on an H200: 17,400
    images/s in bf16 against 21,600 in fp32 at batch 100, 4% ahead at 1,000)."""
    if name not in ("auto", "bf16", "fp32"):
        raise fail(f"--precision {name!r}: use auto, bf16 or fp32")
    if name == "fp32" or (name == "auto" and device.type == "cuda"):
        return None
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = _cpu_has_bf16()
    if name == "bf16" and not native:
        warnings.warn(f"--precision bf16 on a {device.type} without native bf16 will be slow")
    return torch.bfloat16 if (native or name == "bf16") else None


def _cpu_has_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool((check and check()) or (amx and amx()))
    except RuntimeError:
        return False


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch has it for the device (a few
    ms per step on CPU), else the default one."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

def train_step(model: ConvVAE, opt: torch.optim.Optimizer, frames: torch.Tensor, device: torch.device,
               dtype: torch.dtype | None, kl_floor: float,
               weights: torch.Tensor | None = None) -> tuple[float, float, float]:
    """One Adam step on a (B, 64, 64, 3) uint8 batch, its reconstruction error
    weighted per pixel by `weights` (B, 64, 64) if given; returns (loss, recon,
    kl). A non-finite loss raises FloatingPointError before the weights change."""
    x = to_model_input(frames, device)  # (B, 3, 64, 64)
    with autocast(device, dtype):
        recon, mu, logvar = model(x)
    loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_floor, weights)
    values = torch.stack([loss, rec, kl]).tolist()  # one device sync per step
    if not math.isfinite(values[0]):
        raise FloatingPointError(f"loss is {values[0]} (recon {values[1]}, kl {values[2]})")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return tuple(values)


def mean_or_nan(total: float, count: float) -> float:
    """A region's mean squared error; NaN when no frame has that region."""
    return total / count if count else math.nan
