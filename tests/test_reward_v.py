"""A V that weights what matters for driving: the road mask (wm/frames.py),
train_vae.py --recon-weighting road, and experiments/compare_vae.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import compare_vae
import train_vae
from conftest import error_line, run_script, write_tiny_vae
from wm.checkpoint import load_checkpoint
from wm.cli import UsageError
from wm.env import COLLECT_SEED, make_env
from wm.frames import (CAR_COLS, CAR_ROWS, EDGE_PIXELS, GRASS_GREEN_EXCESS, VOID_MAX, preprocess, recon_weights,
                       road_mask)
from wm.rollouts import rollout_path, write_rollout

GRASS, ROAD = (100, 202, 100), (102, 102, 102)  # as they come out of the resize


@pytest.fixture(scope="module")
def rendered() -> dict[str, np.ndarray]:
    """Two frames of track 3: the car at rest on the road once the camera has
    zoomed in, and the same car driven onto the grass."""
    env = make_env(fast=True)
    env.reset(seed=3)
    frames = {}
    for i in range(120):
        obs, *_ = env.step(np.array([0, 0, 0] if i < 60 else [1, 0.5, 0], np.float32))
        if i == 59:
            frames["on_road"] = preprocess(obs)
    frames["on_grass"] = preprocess(obs)
    env.close()
    return frames


def grass_like(frame: np.ndarray) -> np.ndarray:
    """Pixels of one of the two grass colours, give or take the resize (stricter than the mask's rule)."""
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    return (g > 190) & (abs(r - 100) < 8) & (abs(b - 100) < 8)


def grey(frame: np.ndarray) -> np.ndarray:
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    return (abs(r - g) < 8) & (abs(g - b) < 8) & (r > 90) & (r < 120)


def car_box() -> np.ndarray:
    box = np.zeros((64, 64), bool)
    box[CAR_ROWS, CAR_COLS] = True
    return box


def test_mask_marks_the_road_ahead_and_the_car_and_not_the_grass(rendered):
    frame = rendered["on_road"]
    mask = road_mask(frame)
    ahead = (slice(5, 45), 32)  # the column of the car, above it: the road the car faces
    assert grey(frame)[ahead].all()  # (the frame is as the test expects)
    assert mask[ahead].all()
    hull = (frame[..., 0] > 150) & (frame[..., 1] < 80)  # the car's red
    assert hull[50:60, 28:36].sum() >= 4 and mask[hull].all()
    # Grass farther than EDGE_PIXELS from anything that is not grass: weight 1.
    near_other = np.zeros((64, 64), bool)
    for i, j in zip(*np.nonzero(~grass_like(frame))):
        near_other[max(i - EDGE_PIXELS - 1, 0):i + EDGE_PIXELS + 2, max(j - EDGE_PIXELS - 1, 0):j + EDGE_PIXELS + 2] = True
    far_grass = ~near_other & ~car_box()
    assert far_grass.mean() > 0.3
    assert not mask[far_grass].any()
    # The road's edges: grass within EDGE_PIXELS of the road, along a row, is marked.
    road_near = np.zeros((64, 64), bool)
    for d in range(1, EDGE_PIXELS + 1):
        road_near |= np.roll(grey(frame), d, axis=1) | np.roll(grey(frame), -d, axis=1)
    edge = grass_like(frame) & road_near
    assert edge.sum() > 20 and mask[edge].all()
    w = recon_weights(torch.from_numpy(mask), 10.0)
    assert w[5, 32] > 2 > 0.5 > w[far_grass].max()  # road ahead heavy, far grass light


def test_mask_marks_the_car_and_its_surroundings_on_the_grass(rendered):
    frame = rendered["on_grass"]
    mask = road_mask(frame)
    beside = (slice(52, 57), [27, 37])  # grass either side of the car, within its box
    assert grass_like(frame)[beside].all()
    assert mask[beside].all() and mask[car_box()].all()


def test_mask_of_uniform_frames():
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    frames[0], frames[1] = GRASS, ROAD  # frames[2]: the black beyond the playfield (the zoom-in)
    masks = road_mask(frames)
    assert np.array_equal(masks[0], car_box()) and masks[1].all() and np.array_equal(masks[2], car_box())
    with pytest.raises(ValueError, match="uint8"):
        road_mask(frames.astype(np.float32))


def test_mask_equals_the_rule_written_plainly(rendered):
    """The uint8 arithmetic and running maxima of road_mask against the rule
    in wide integers, grown by scipy's binary_dilation, frame by frame: on
    grass with specks of every colour (the uint8 overflow corner included)
    and on real frames."""
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(0)
    noisy = np.full((6, 64, 64, 3), GRASS, np.uint8)  # grass, 1 pixel in 50 of any colour
    specks = rng.random(noisy.shape[:3]) < 0.02
    noisy[specks] = rng.integers(0, 256, (specks.sum(), 3), dtype=np.uint8)
    frames = np.concatenate([noisy, np.stack([rendered["on_road"], rendered["on_grass"]])])
    for frame, mask in zip(frames, road_mask(frames)):
        r, g, b = (frame[..., c].astype(int) for c in range(3))
        marked = (g - np.maximum(r, b) <= GRASS_GREEN_EXCESS) & (np.maximum(np.maximum(r, g), b) >= VOID_MAX)
        want = binary_dilation(marked, np.ones((2 * EDGE_PIXELS + 1,) * 2, bool)) | car_box()
        assert np.array_equal(mask, want)


def test_weights_are_the_road_weight_on_marked_pixels_and_average_one():
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0, :16] = True  # a quarter of frame 0; frame 1 has nothing marked
    w = recon_weights(mask, 10.0)
    torch.testing.assert_close(w.mean(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(w[0][mask[0]] / w[0][~mask[0]].max(), torch.tensor(10.0))
    assert torch.equal(w[1], torch.ones(64, 64))
    assert torch.equal(recon_weights(mask, 1.0), torch.ones(2, 64, 64))  # weight 1: the paper's loss


# ---------------------------------------------------------------------------
# train_vae.py --recon-weighting road, and the stages after it


def road_rollouts(out_dir: Path, n: int = 3, steps: int = 16) -> Path:
    """Rollouts of the real schema whose frames are grass with a road band
    that wanders (frames where the mask matters), on collection tracks."""
    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        obs = np.empty((steps, 64, 64, 3), np.uint8)
        obs[:] = GRASS
        for t in range(steps):
            c = 10 + (3 * i + t) % 40
            obs[t, :, c:c + 13] = ROAD
        obs = np.clip(obs + rng.integers(-3, 4, obs.shape), 0, 255).astype(np.uint8)
        done = np.zeros(steps, bool)
        done[-1] = True
        write_rollout(rollout_path(out_dir, COLLECT_SEED + i), observations=obs,
                      actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                      rewards=rng.normal(size=steps).astype(np.float32), terminated=done,
                      truncated=np.zeros(steps, bool))
    return out_dir


def tiny(data_dir, ckpt_dir, **kw) -> train_vae.Config:
    return train_vae.Config(**{"data_dir": str(data_dir), "ckpt_dir": str(ckpt_dir), "epochs": 1,
                               "batch_size": 16, "latent_size": 8, "precision": "fp32", "view": "road",
                               "recon_weighting": "plain", **kw})  # road weighting marks the road view's pixels


@pytest.fixture(scope="module")
def two_vs(tmp_path_factory) -> Path:
    """Road-like rollouts, and a plain and a road-weighted V trained on them
    with the same split (in-process, one tiny epoch each)."""
    root = tmp_path_factory.mktemp("reward_v")
    road_rollouts(root / "rollouts")
    train_vae.main(tiny(root / "rollouts", root / "plain"))
    train_vae.main(tiny(root / "rollouts", root / "road", recon_weighting="road"))
    return root


def test_road_weighting_is_recorded_used_and_refused_on_resume_with_another(two_vs, tmp_path):
    plain, road = (load_checkpoint(two_vs / d / "vae.pt", "vae") for d in ("plain", "road"))
    assert plain["config"]["recon_weighting"] == "plain" and road["config"]["recon_weighting"] == "road"
    assert train_vae.describe_weighting(road["config"]) == "road x10"
    assert train_vae.describe_weighting({}) == "plain"  # a V from before the option
    assert plain["val_recon"] == plain["val_recon_plain"]
    assert road["val_recon"] != road["val_recon_plain"]  # the weights did reach the loss
    for ckpt in (plain, road):
        assert 0 < ckpt["val_mse_rest"] and 0 < ckpt["val_mse_road"]
    with pytest.raises(UsageError, match="trained with --recon-weighting plain, this run asks for road x10"):
        train_vae.main(tiny(two_vs / "rollouts", two_vs / "plain", recon_weighting="road", epochs=2))


def test_script_end_to_end_with_road_weighting_feeds_m_and_c(tmp_path):
    from train_mdnrnn import Config as MConfig
    from train_mdnrnn import main as train_m
    from wm.agent import load_models

    data, ckpt = road_rollouts(tmp_path / "rollouts"), tmp_path / "ckpt"
    r = run_script("train_vae.py", "--data-dir", str(data), "--ckpt-dir", str(ckpt), "--epochs", "1",
                   "--batch-size", "16", "--latent-size", "8", "--recon-weighting", "road",
                   "--road-weight", "4", "--view", "road", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "road x4 reconstruction error" in r.stdout and "mse road" in r.stdout
    v = load_checkpoint(ckpt / "vae.pt", "vae")
    assert v["config"]["recon_weighting"] == "road" and v["config"]["road_weight"] == 4
    rows = train_vae.MetricsLog(ckpt / "vae_metrics.csv").rows()
    assert {"val_recon_plain", "val_mse_road", "val_mse_rest"} <= set(rows[0])
    # M trains on it, and a z-only C's agent loads it, as for any V.
    train_m(MConfig(data_dir=str(data), latent_dir=str(tmp_path / "latents"), ckpt_dir=str(ckpt), epochs=1,
                    seq_len=8, batch_size=2, hidden_size=16, n_gaussians=2, strip_steps=4, strip_start=4,
                    device="cpu"))
    m = load_checkpoint(ckpt / "mdnrnn.pt", "mdnrnn")
    assert m["vae_fingerprint"] == v["fingerprint"]
    for with_m in (True, False):  # the [z, h] agent's V and M, and the z-only agent's V
        vae, _, fingerprints = load_models(ckpt, with_m=with_m)
        assert vae.cfg.latent_size == 8 and fingerprints["vae_fingerprint"] == v["fingerprint"]


def test_bad_weighting_flags_are_one_line(tmp_path):
    r = run_script("train_vae.py", "--data-dir", str(tmp_path), "--recon-weighting", "pixels")
    assert error_line(r) == "error: --recon-weighting must be one of plain, road, dashboard, got 'pixels'"
    for weighting in (["--recon-weighting", "dashboard"], []):  # the default weighting, too
        r = run_script("train_vae.py", "--data-dir", str(tmp_path), *weighting, "--view", "road")
        assert error_line(r) == ("error: --recon-weighting dashboard weights the dashboard, which only the full "
                                 "view shows; use it with --view full, or pass --recon-weighting plain or road")


# ---------------------------------------------------------------------------
# train_vae.py --recon-weighting dashboard (the full view)


def test_dashboard_weights_are_the_weight_on_rows_56_to_63():
    cfg = train_vae.Config(view="full", recon_weighting="dashboard", dashboard_weight=10.0)
    w = train_vae.loss_weights(3, None, cfg, torch.device("cpu"))
    assert w.shape == (3, 64, 64)
    # 512 dashboard pixels at weight 10 and 3584 others at 1, scaled to mean 1.
    torch.testing.assert_close(w[:, 56:], torch.full((3, 8, 64), 10 * 4096 / (10 * 512 + 3584)))
    torch.testing.assert_close(w[:, :56], torch.full((3, 56, 64), 4096 / (10 * 512 + 3584)))
    assert train_vae.loss_weights(3, None, train_vae.Config(recon_weighting="plain"), torch.device("cpu")) is None


def test_dashboard_weighting_is_recorded_and_reaches_the_loss(tmp_path):
    data = road_rollouts(tmp_path / "rollouts")
    for path in data.glob("*.npz"):  # the same frames, recorded as full-view ones
        arrays = dict(np.load(path))
        write_rollout(path, **arrays, view=np.array("full"))
    train_vae.main(tiny(data, tmp_path / "dash", view="full", recon_weighting="dashboard",
                        dashboard_weight=5.0))
    v = load_checkpoint(tmp_path / "dash" / "vae.pt", "vae")
    assert v["config"]["recon_weighting"] == "dashboard" and v["model_args"]["view"] == "full"
    assert train_vae.describe_weighting(v["config"]) == "dashboard x5"
    assert v["val_recon"] != v["val_recon_plain"]  # the weights did reach the loss
    r = run_script("train_vae.py", "--data-dir", str(tmp_path), "--road-weight", "0.5")
    assert error_line(r) == "error: --road-weight must be at least 1, got 0.5"


# ---------------------------------------------------------------------------
# experiments/compare_vae.py


def test_compare_vae_end_to_end(two_vs, tmp_path):
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    ckpts = f"{two_vs / 'plain' / 'vae.pt'},{two_vs / 'road' / 'vae.pt'}"
    r = run_script("-m", "experiments.compare_vae", "--ckpts", ckpts, "--data-dir", str(two_vs / "rollouts"),
                   "--json", str(out_json), "--png", str(out_png), "--batch-size", "7", "--show", "4",
                   timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(out_json.read_text())
    v = load_checkpoint(two_vs / "plain" / "vae.pt", "vae")
    assert got["rollouts"] == v["val_rollouts"] and got["frames"] == 16
    assert [x["weighting"] for x in got["vaes"]] == ["plain", "road x10"]
    # The plain V's errors against a direct computation, frame by frame.
    from models import ConvVAE
    from wm.frames import to_model_input

    frames = np.load(two_vs / "rollouts" / v["val_rollouts"][0])["observations"]
    vae = ConvVAE.from_checkpoint(v).eval()
    with torch.no_grad():
        x = to_model_input(frames)
        sq = ((vae.decode(vae.encode(x)[0]) - x) ** 2).numpy().transpose(0, 2, 3, 1)  # (N, 64, 64, 3)
    mask = road_mask(frames)
    assert got["vaes"][0]["mse_road"] == pytest.approx(sq[mask].mean(), rel=1e-5)
    assert got["vaes"][0]["mse_rest"] == pytest.approx(sq[~mask].mean(), rel=1e-5)
    assert got["vaes"][0]["recon_per_frame"] == pytest.approx(sq.sum() / len(sq), rel=1e-5)
    assert got["road_fraction"] == pytest.approx(mask.mean())
    png = Image.open(out_png)
    assert png.height >= 4 * 64 * 2 and png.width > 4 * 64 * 2  # frames, mask, two Vs; 4 frames each


def test_compare_vae_scores_only_tracks_no_v_trained_on(two_vs, tmp_path):
    cfg = compare_vae.Config(ckpts=str(write_tiny_vae(tmp_path, view="road")), data_dir=str(two_vs / "rollouts"),
                             json=str(tmp_path / "c.json"), png=str(tmp_path / "c.png"), show=2)
    with pytest.raises(UsageError, match="does not record which rollouts V trained on"):
        compare_vae.main(cfg)
    # A second V trained on other tracks (its own copies of the road V's
    # training rollouts, renamed to new tracks): the road V's held-out
    # rollouts are unseen by both, and are what is scored.
    road = load_checkpoint(two_vs / "road" / "vae.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i, name in enumerate(road["train_rollouts"]):
        shutil.copy(two_vs / "rollouts" / name, rollout_path(elsewhere, 50_000 + i))
    train_vae.main(tiny(elsewhere, tmp_path / "other", val_fraction=0.5))
    cfg.ckpts = f"{two_vs / 'road' / 'vae.pt'},{tmp_path / 'other' / 'vae.pt'}"
    compare_vae.main(cfg)
    assert json.loads((tmp_path / "c.json").read_text())["rollouts"] == road["val_rollouts"]
    # Rollouts that some V trained on are refused.
    seen = tmp_path / "seen"
    seen.mkdir()
    shutil.copy(two_vs / "rollouts" / road["train_rollouts"][0], seen)
    cfg.data_dir = str(seen)
    with pytest.raises(UsageError, match="every rollout in .* is on a track that some V trained on"):
        compare_vae.main(cfg)
