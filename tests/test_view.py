"""What V sees (--view road or full) travels from collection to V, M and the
agent; the schedule of V's learning rate; collecting with a trained C."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (error_line, make_synthetic_rollouts, run_script, write_tiny_controller,
                      write_tiny_world_model)
from PIL import Image

import train_vae
from wm.agent import load_agent
from wm.frames import preprocess
from wm.rollouts import read_rollout, read_setting, rollout_path


def test_the_full_view_keeps_the_dashboard_and_the_road_view_drops_it():
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[84:] = 255  # a white dashboard
    road, full = preprocess(frame, "road"), preprocess(frame, "full")
    assert road.max() == 0  # the paper's crop drops rows 84-95
    assert (full[57:] == 255).all() and (full[:55] == 0).all()  # 12 of 96 rows: the last 8 of 64
    expected = np.array(Image.fromarray(frame).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(full, expected)
    assert np.array_equal(preprocess(frame), road)  # road is the default: the shipped V's
    with pytest.raises(ValueError, match="view must be one of"):
        preprocess(frame, "wide")


def test_a_full_view_rollout_records_its_view_and_v_and_m_follow_it(tmp_path):
    ro, ckpt = tmp_path / "ro", tmp_path / "ckpt"
    r = run_script("collect_rollouts.py", "--rollouts", "2", "--max-steps", "30", "--workers", "1",
                   "--view", "full", "--out-dir", str(ro))
    assert r.returncode == 0, r.stderr
    path = rollout_path(ro, 10_000)
    assert read_setting(path, "view") == "full" and read_setting(path, "action_repeat") == 2
    frames = read_rollout(path)["observations"]
    assert frames[5, 57:].mean() < 60 < frames[5, :50].mean()  # the dark dashboard below the road

    # A folder holds one view: collecting the other into it is refused.
    assert "collected with --view full" in error_line(run_script(
        "collect_rollouts.py", "--rollouts", "2", "--max-steps", "30", "--view", "road", "--out-dir", str(ro)))
    # V must be asked for the view its frames have.
    line = error_line(run_script("train_vae.py", "--data-dir", str(ro), "--ckpt-dir", str(ckpt),
                                 "--epochs", "1", "--view", "road", "--recon-weighting", "plain"))
    assert "holds frames of --view full" in line and "--view full" in line
    r = run_script("train_vae.py", "--data-dir", str(ro), "--ckpt-dir", str(ckpt), "--epochs", "1",
                   "--batch-size", "10")
    assert r.returncode == 0, r.stderr
    assert torch.load(ckpt / "vae.pt", weights_only=True)["model_args"]["view"] == "full"

    # M learns from V's codes: the rollouts must show V's view.
    road = tmp_path / "road"
    make_synthetic_rollouts(road, n=3, view="road")
    line = error_line(run_script("train_mdnrnn.py", "--data-dir", str(road), "--latent-dir",
                                 str(tmp_path / "lat"), "--ckpt-dir", str(ckpt), "--epochs", "1"))
    assert "--view road" in line and "learned --view full" in line
    r = run_script("train_mdnrnn.py", "--data-dir", str(ro), "--latent-dir", str(tmp_path / "lat"),
                   "--ckpt-dir", str(ckpt), "--epochs", "1", "--seq-len", "8", "--batch-size", "2")
    assert r.returncode == 0, r.stderr


def test_the_agent_sees_the_frame_as_its_v_does(tmp_path):
    """The same game frame, a V of each view: the agent's z is V's code of
    that view's preprocessing, not of the other."""
    for view in ("road", "full"):
        d = tmp_path / view
        write_tiny_world_model(d, view=view)
        write_tiny_controller(d, action_repeat=1)
        agent, _ = load_agent(d)
        frame = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        frame[84:] = 0
        agent.act(frame[None])
        with torch.no_grad():
            for seen in ("road", "full"):
                x = torch.as_tensor(preprocess(frame, seen)).permute(2, 0, 1)[None].float() / 255
                same = torch.allclose(agent.z, agent.vae.encode(x)[0], atol=1e-5)
                assert same == (seen == view), (view, seen)


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = train_vae.Config(lr=1e-3, lr_schedule="cosine")
    assert train_vae.lr_at(cfg, 0.0) < 1e-4
    assert train_vae.lr_at(cfg, train_vae.WARMUP) == pytest.approx(1e-3)
    middle = train_vae.WARMUP + (1 - train_vae.WARMUP) / 2
    assert train_vae.lr_at(cfg, middle) == pytest.approx(5e-4)
    assert train_vae.lr_at(cfg, 1.0) == pytest.approx(0.0, abs=1e-12)
    rates = [train_vae.lr_at(cfg, p) for p in np.linspace(train_vae.WARMUP, 1, 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert train_vae.lr_at(train_vae.Config(lr=3e-4, lr_schedule="constant"), 0.7) == 3e-4  # the paper's


def test_a_resumed_v_trains_at_the_rate_it_is_given(synthetic_rollouts, tmp_path):
    """The optimizer's saved rate must not override --lr on a resume."""
    ckpt = tmp_path / "ckpt"
    args = ["train_vae.py", "--data-dir", str(synthetic_rollouts), "--ckpt-dir", str(ckpt),
            "--batch-size", "20", "--lr-schedule", "constant"]
    assert run_script(*args, "--epochs", "1", "--lr", "1e-4").returncode == 0
    r = run_script(*args, "--epochs", "2", "--lr", "5e-4")
    assert r.returncode == 0, r.stderr
    last = torch.load(ckpt / "vae_last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)
    assert last["lr"] == pytest.approx(5e-4)


def test_collecting_with_a_trained_c_adds_noise_to_its_actions(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_tiny_world_model(ckpt, action_repeat=2)
    write_tiny_controller(ckpt, action_repeat=2)
    actions = {}
    for noise in ("0", "0.3"):
        out = tmp_path / f"noise{noise}"
        r = run_script("collect_rollouts.py", "--rollouts", "1", "--max-steps", "40", "--workers", "1",
                       "--policy", "controller", "--ckpt-dir", str(ckpt), "--noise", noise,
                       "--action-repeat", "2", "--out-dir", str(out))
        assert r.returncode == 0, r.stderr
        actions[noise] = read_rollout(rollout_path(out, 10_000))["actions"]
    # The noise moves C's actions, and they stay in the game's range.
    assert actions["0"].shape == (20, 3)
    diff = actions["0.3"] - actions["0"]
    assert np.abs(diff).max() > 0.05 and (actions["0.3"][:, 1:] >= 0).all()
    assert (np.abs(actions["0.3"]) <= 1).all()
    assert "give its folder as --ckpt-dir" in error_line(run_script(
        "collect_rollouts.py", "--rollouts", "1", "--policy", "controller", "--out-dir", str(tmp_path / "x")))
    assert "--action-repeat 2" in error_line(run_script(
        "collect_rollouts.py", "--rollouts", "1", "--policy", "controller", "--ckpt-dir", str(ckpt),
        "--action-repeat", "1", "--out-dir", str(tmp_path / "y")))
