"""Frame preprocessing, in one place: every stage sees frames through here.

CarRacing gives 96x96x3 uint8 frames whose bottom 12 rows (84-95) are the
dashboard (speed, ABS, steering, gyro bars). The view says what V sees:
"road", the paper's, drops the dashboard and resizes the 84x96 road to 64x64;
"full" resizes the whole frame, dashboard included, so that V can read the
car's speed off its bar (at 64x64 the dashboard is rows 56-63). A V records
its view (VAEConfig.view), a rollout the view of its frames, and every stage
preprocesses as its V did. Frames stay uint8 on disk; they are scaled to
[0, 1] floats only at the model's input.

`road_mask` marks the pixels that matter for driving (road, kerbs, the road's
edges, the car and its neighbourhood), from CarRacing-v3's palette, and
`dashboard_mask` the full view's dashboard, for V's optional weighted
reconstruction loss (train_vae.py --recon-weighting road or dashboard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

FRAME_SIZE = 64  # the paper's V input is 64x64x3
DASHBOARD_ROW = 84  # rows 84..95 of the 96x96 frame are the dashboard
# The rows of the 96x96 frame each view keeps: the paper's crop, or all of it.
VIEWS = {"road": DASHBOARD_ROW, "full": 96}

# road_mask's rule, from CarRacing-v3's palette (gymnasium's car_racing.py,
# without domain_randomize): the grass is the only green thing in the game,
# (102, 204, 102) and (102, 230, 102), about 100-130 greener than red or blue
# (about 2 less after the resize). Road tiles are grey (102-107 in all three),
# kerbs red or white, the car red (204, 0, 0) with black and grey wheels, skid
# marks grey or brown (102, 102, 0): none is greener than red and blue by
# more than a few. A pixel is grass when its green exceeds its red and blue by
# more than half the road/grass contrast, so a pixel resized from a road/grass
# boundary counts as road when it is mostly road.
GRASS_GREEN_EXCESS = 50
# Beyond the playfield the window is black; it shows while the camera zooms
# in at an episode's start (about its first 50 frames). It is neither road
# nor grass, and not marked: a pixel whose every channel is below this (the
# car's black wheels are inside its box, marked below).
VOID_MAX = 40
# The road's edges: the grass within this many pixels of road, kerb or car is
# marked too, so that where the road ends is drawn as sharply as the road
# (about a seventh of the road's 13-pixel width in the 64x64 frame).
EDGE_PIXELS = 2
# The car is drawn at a fixed place in the view: the window's centre column,
# three quarters down (car_racing.py translates the car to (WINDOW_W / 2,
# WINDOW_H / 4) and flips), i.e. column 48, row 72 of the 96x96 frame, column
# 32, row 72 * 64 / 84 = 55 of the 64x64 one (its red hull covers rows 51-57,
# columns 31-32). The box around it, half a road width each way, is where
# "on the road or about to leave it" shows, so it is marked even on grass.
CAR_ROWS = slice(48, 61)  # rows 48..60
CAR_COLS = slice(26, 39)  # columns 26..38
# The full view's dashboard: rows 84-95 of the 96x96 frame are rows 56-63 of
# the 64x64 one. Its bars are a few pixels each (the speed bar at most about
# 2 x 3 at full speed), too few for the plain loss to draw them exactly.
DASHBOARD_ROWS = slice(DASHBOARD_ROW * FRAME_SIZE // 96, FRAME_SIZE)  # rows 56..63


def preprocess(frame: np.ndarray, view: str = "road") -> np.ndarray:
    """(96, 96, 3) uint8 environment frame -> (64, 64, 3) uint8 model frame,
    as V of this `view` sees it."""
    if frame.shape != (96, 96, 3) or frame.dtype != np.uint8:
        raise ValueError(f"expected a (96, 96, 3) uint8 CarRacing frame, got {frame.shape} {frame.dtype}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    image = Image.fromarray(frame[:VIEWS[view]])
    return np.array(image.resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR))  # writable, for torch


def road_mask(frames: np.ndarray) -> np.ndarray:
    """(..., 64, 64, 3) uint8 frames -> (..., 64, 64) bool: True on road, kerbs,
    the road's edges and the car's neighbourhood (the rule above), False on
    grass away from them. Cheap numpy and scipy, for a batch in the data pipeline."""
    if frames.shape[-3:] != (FRAME_SIZE, FRAME_SIZE, 3) or frames.dtype != np.uint8:
        raise ValueError(f"expected (..., {FRAME_SIZE}, {FRAME_SIZE}, 3) uint8 frames, "
                         f"got {frames.shape} {frames.dtype}")
    from scipy.ndimage import maximum_filter1d  # here, so collecting rollouts never imports scipy

    # In uint8, without widening the frames (that cost 10x the rest): a pixel
    # is grass when green > max(red, blue) + GRASS_GREEN_EXCESS, and no pixel
    # is that green when max(red, blue) is above 255 - GRASS_GREEN_EXCESS.
    red_blue = np.maximum(frames[..., 0], frames[..., 2])
    green = frames[..., 1]
    not_grass = green <= np.minimum(red_blue, 255 - GRASS_GREEN_EXCESS) + GRASS_GREEN_EXCESS
    lit = np.maximum(red_blue, green) >= VOID_MAX
    # Grown by EDGE_PIXELS each way within each frame: a square's dilation is
    # a running maximum along the rows, then along the columns.
    size = 2 * EDGE_PIXELS + 1
    mask = (not_grass & lit).view(np.uint8)
    for axis in (-1, -2):
        mask = maximum_filter1d(mask, size, axis=axis, mode="constant")
    mask = mask.view(bool)
    mask[..., CAR_ROWS, CAR_COLS] = True
    return mask


def dashboard_mask(n: int) -> np.ndarray:
    """(n, 64, 64) bool: True on the full view's dashboard (DASHBOARD_ROWS),
    the same in every frame."""
    mask = np.zeros((n, FRAME_SIZE, FRAME_SIZE), bool)
    mask[:, DASHBOARD_ROWS] = True
    return mask


def recon_weights(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """(..., 64, 64) bool mask -> (..., 64, 64) float per-pixel weights of V's
    reconstruction error: `weight` on marked pixels, 1 elsewhere, scaled to
    mean 1 over each frame. The scaling keeps the reconstruction term's total
    weight that of the paper's loss, so its balance against the KL term (and
    the free bits) is unchanged and only where V spends its error moves; a
    V trained so differs from the paper's in that alone."""
    w = 1 + (weight - 1) * mask.float()
    return w / w.mean(dim=(-2, -1), keepdim=True)


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
