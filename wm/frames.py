"""Frame preprocessing, in one place: every stage sees frames through here.

CarRacing gives 96x96x3 uint8 frames whose bottom 12 rows (84-95) are the
dashboard (speed, ABS, steering, gyro bars). We drop them, because the paper's
V sees only the road, then resize the 84x96 view to 64x64 (the paper's size).
Frames stay uint8 on disk; they are scaled to [0, 1] floats only at the
model's input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

FRAME_SIZE = 64  # the paper's V input is 64x64x3
DASHBOARD_ROW = 84  # rows 84..95 of the 96x96 frame are the dashboard


def preprocess(frame: np.ndarray) -> np.ndarray:
    """(96, 96, 3) uint8 environment frame -> (64, 64, 3) uint8 model frame."""
    if frame.shape != (96, 96, 3) or frame.dtype != np.uint8:
        raise ValueError(f"expected a (96, 96, 3) uint8 CarRacing frame, got {frame.shape} {frame.dtype}")
    view = Image.fromarray(frame[:DASHBOARD_ROW])
    return np.array(view.resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR))  # writable, for torch


def to_grey(frames: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 frames -> (..., H, W) uint8 luma, with the weights
    and the rounding down of gymnasium's GrayscaleObservation (the input of
    rl-baselines3-zoo's CarRacing agents)."""
    return np.sum(np.multiply(frames, np.array([0.2125, 0.7154, 0.0721])), axis=-1).astype(np.uint8)


def to_model_input(frames: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(..., 64, 64, 3) uint8 frames -> (..., 3, 64, 64) float in [0, 1] on `device`.

    The uint8 tensor is moved first and converted on the device, which moves
    a quarter of the bytes.
    """
    import torch  # here, so collecting rollouts never pays for importing torch

    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or tuple(x.shape[-3:]) != (FRAME_SIZE, FRAME_SIZE, 3):
        raise ValueError(f"expected (..., {FRAME_SIZE}, {FRAME_SIZE}, 3) uint8 frames, "
                         f"got {tuple(x.shape)} {x.dtype}")
    x = x.to(device, non_blocking=True)
    return x.movedim(-1, -3).float().div_(255.0)


def to_image(x: torch.Tensor) -> np.ndarray:
    """(..., 3, 64, 64) float in [0, 1] -> (..., 64, 64, 3) uint8, for pictures."""
    return (x.detach().float().clamp(0, 1).movedim(-3, -1) * 255).round().byte().cpu().numpy()
