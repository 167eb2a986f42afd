"""The PPO baselines: experiments/train_ppo.py's three arms, what each policy sees
(wm/ppo.py), scoring with evaluate.py --policy ppo, and experiments/compare_ppo.py."""

from __future__ import annotations

import csv as csv_module
import dataclasses
import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, run_script, start_script, write_tiny_world_model
from PIL import Image

from experiments import compare_ppo
import evaluate
from experiments import train_ppo
from models import MDNRNN, ConvVAE
from wm.cli import UsageError
from wm.ppo import EPISODES_FILE, MODEL_FILE, NORM_FILE, make_arm_env

# Two rollouts of 2 environments x 16 agent steps; episodes of 40 frames (20 agent steps).
TINY = ["--seeds", "0", "--n-envs", "2", "--n-steps", "16", "--batch-size", "32", "--n-epochs", "1",
        "--max-steps", "40", "--save-every", "64", "--frames", "128"]
TINY_CFG = dict(seeds="0", n_envs=2, n_steps=16, batch_size=32, n_epochs=1, max_steps=40, save_every=64,
                progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny untrained V and M, M at the runs' frame skip of 2."""
    d = tmp_path_factory.mktemp("world")
    write_tiny_world_model(d, latent_size=8, hidden_size=16, action_repeat=2)
    return d


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """Each arm trained once at a tiny budget, as a user runs it, the three
    at once -> (out_dir, {arm: (returncode, stdout, stderr)})."""
    out = tmp_path_factory.mktemp("ppo")
    # Passive OpenMP waits, as train_agent.sh sets them: torch's two threads
    # spin-waiting for each other doubled a tiny run's time on a busy machine.
    started = {arm: start_script("-m", "experiments.train_ppo", "--arm", arm, "--ckpt-dir", str(world), "--out-dir", str(out),
                                 *TINY, env={"OMP_WAIT_POLICY": "PASSIVE"}) for arm in ("pixels", "z", "zh")}
    done = {}
    try:
        for arm, proc in started.items():
            stdout, stderr = proc.communicate(timeout=240)
            done[arm] = (proc.returncode, stdout, stderr)
    finally:
        for proc in started.values():
            proc.kill()
    return out, done


@pytest.mark.parametrize("arm, obs_shape", [("pixels", (2, 64, 64)), ("z", (8,)), ("zh", (8 + 16,))])
def test_each_arm_trains_and_writes_its_run(runs, arm, obs_shape):
    from stable_baselines3 import PPO

    out, done = runs
    returncode, stdout, stderr = done[arm]
    assert returncode == 0, stderr
    run_dir = out / arm / "seed0"
    assert f"{arm} seed 0  frames 64 " in stdout and f"{arm} seed 0  frames 128 " in stdout  # saved twice
    model = PPO.load(run_dir / MODEL_FILE)
    assert model.num_timesteps == 64 and model.observation_space.shape == obs_shape  # 128 frames, 2 a step
    extractor = type(model.policy.features_extractor).__name__
    assert model.use_sde and extractor == ("NatureCNN" if arm == "pixels" else "FlattenExtractor")
    assert (run_dir / NORM_FILE).stat().st_size > 0
    assert json.loads((run_dir / "run.json").read_text())["frames_trained"] == 128
    rows = [line.split(",") for line in (run_dir / EPISODES_FILE).read_text().splitlines()]
    assert rows[0] == ["frames", "return", "steps"] and len(rows) > 1
    assert all(0 < int(f) <= 128 and int(s) == 20 and np.isfinite(float(ret)) for f, ret, s in rows[1:])
    events = list((run_dir / "tensorboard").glob("ppo_0/events.out.tfevents.*"))
    assert len(events) == 1 and b"time/frames" in events[0].read_bytes()
    assert not list(run_dir.glob(".*.tmp*"))


def test_latent_arms_refuse_to_start_without_v_or_m(tmp_path, world):
    r = run_script("-m", "experiments.train_ppo", "--arm", "z", "--ckpt-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'vae.pt'} not found; run train_vae.py first (or point --ckpt-dir at its folder)"]
    shutil.copy(world / "vae.pt", tmp_path / "vae.pt")
    with pytest.raises(UsageError, match="mdnrnn.pt not found; run train_mdnrnn.py first"):
        train_ppo.main(train_ppo.Config(arm="zh", ckpt_dir=str(tmp_path), out_dir=str(tmp_path / "o")))
    write_tiny_world_model(tmp_path, action_repeat=1)  # M learned every frame; the runs hold actions for 2
    with pytest.raises(UsageError, match="learned every 1 frames .* pass --frame-skip 1"):
        train_ppo.main(train_ppo.Config(arm="zh", ckpt_dir=str(tmp_path), out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_outputs_that_cannot_be_written_are_one_line_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "ppo"  # its parent is a file: no one, root included, can write there
    r = run_script("-m", "experiments.train_ppo", "--arm", "pixels", "--out-dir", str(out))
    assert error_line(r) == f"error: cannot write to --out-dir {out} (Not a directory); pass a writable folder"
    csv = tmp_path / "controller_metrics.csv"
    csv.write_text("generation,held_out\n1,10.0\n")
    r = run_script("-m", "experiments.compare_ppo", "--runs-dir", str(tmp_path), "--cmaes", f"zh={csv}", "--out", str(out / "c"))
    assert error_line(r) == f"error: cannot write --out {out / 'c.png'} (Not a directory); pass another path"


def test_latent_observation_is_v_mean_and_m_memory(world):
    """[z, h] against V and M run by hand on the stock environment, every frame stepped."""
    vae = ConvVAE.from_checkpoint(torch.load(world / "vae.pt", weights_only=True)).eval()
    mdnrnn = MDNRNN.from_checkpoint(torch.load(world / "mdnrnn.pt", weights_only=True)).eval()

    @torch.no_grad()
    def mu(frame):  # V's view (road: the dashboard cut), 64x64 bilinear, scaled to [0, 1], channels first
        seen = frame[:84] if vae.cfg.view == "road" else frame
        img = np.asarray(Image.fromarray(seen).resize((64, 64), Image.BILINEAR))
        return vae.encode(torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 255)[0][0]

    env, stock = make_arm_env("zh", world, frame_skip=2, max_steps=40), gym.make("CarRacing-v3")
    obs, _ = env.reset(seed=5)
    frame, _ = stock.reset(seed=5)
    z, state = mu(frame), None
    assert obs.shape == (24,) and np.allclose(obs[:8], z, atol=1e-5) and not obs[8:].any()  # no memory yet
    for action in ([0.0, 1.0, 0.0], [-0.5, 0.3, 0.0], [0.4, 0.0, 0.2]):
        a = torch.tensor(action)
        with torch.no_grad():  # M's sequence model (nn.LSTM), not the one-step cell the view uses
            _, state = mdnrnn(z[None, None], a[None, None], state)
        obs, reward, terminated, truncated, info = env.step(np.array(action, dtype=np.float32))
        frame, r1 = stock.step(np.array(action))[:2]
        frame, r2 = stock.step(np.array(action))[:2]
        z = mu(frame)
        assert info["frames"] == 2 and reward == pytest.approx(r1 + r2)
        assert np.allclose(obs[:8], z, atol=1e-5) and np.allclose(obs[8:], state[0][0], atol=1e-5)
    obs, _ = env.reset(seed=6)
    assert not obs[8:].any()  # memory starts over with the episode
    env.close()
    stock.close()


def test_pixel_observation_stacks_grey_frames():
    env = make_arm_env("pixels", None, frame_skip=2, frame_stack=2, max_steps=40)
    first, _ = env.reset(seed=1)
    assert first.shape == (2, 64, 64) and first.dtype == np.uint8 and (first[0] == first[1]).all()
    second = env.step(np.array([0.0, 1.0, 0.0], dtype=np.float32))[0]
    assert (second[0] == first[1]).all() and 60 < first.mean() < 200  # grey road and grass, not black
    env.close()


def test_resume_continues_the_step_count(runs, world, tmp_path, capsys):
    from stable_baselines3 import PPO

    out, run_dir = tmp_path / "ppo", tmp_path / "ppo" / "z" / "seed0"
    shutil.copytree(runs[0] / "z", out / "z")
    before = (run_dir / EPISODES_FILE).read_text().splitlines()
    flags = ["--arm", "z", "--ckpt-dir", str(world), "--out-dir", str(out), *TINY[:-1], "256"]
    stdout, stderr = start_script("-m", "experiments.train_ppo", *flags, env={"OMP_WAIT_POLICY": "PASSIVE"}).communicate(timeout=240)
    assert "resuming PPO on z, seed 0" in stdout and "frames 128 -> 256" in stdout, stderr
    model = PPO.load(run_dir / MODEL_FILE)
    assert model.num_timesteps == 128 and model._num_timesteps_at_start == 64  # went on from 64 agent steps
    after = (run_dir / EPISODES_FILE).read_text().splitlines()
    assert after[:len(before)] == before and len(after) > len(before)
    assert max(int(line.split(",")[0]) for line in after[1:]) <= 256
    assert [p.name for p in (run_dir / "tensorboard").iterdir()] == ["ppo_0"]
    cfg = train_ppo.Config(arm="z", ckpt_dir=str(world), out_dir=str(out), frames=256, **TINY_CFG)
    train_ppo.main(cfg)
    assert "already at 256 frames" in capsys.readouterr().out
    with pytest.raises(UsageError, match="trained with n_steps = 16, this run asks for 8"):
        train_ppo.main(train_ppo.Config(**{**vars(cfg), "n_steps": 8}))


def test_evaluate_scores_a_run_on_the_official_env(runs, tmp_path, monkeypatch):
    from stable_baselines3 import PPO

    import wm.env

    made = []
    monkeypatch.setattr(evaluate, "make_env", lambda **kw: made.append(kw) or wm.env.make_env(**kw))
    run_dir = runs[0] / "pixels" / "seed0"
    result = evaluate.main(evaluate.Config(policy="ppo", ckpt_dir=str(run_dir), episodes=2, max_steps=20,
                                           workers=1))
    assert len(result["scores"]) == 2 and result["steps"] == 40  # frames, every one stepped
    assert made and all(kw["fast"] is False for kw in made)
    # The same policy on the same track through the training wrapper, the official env beneath it.
    env, model = make_arm_env("pixels", None, max_steps=20, fast=False), PPO.load(run_dir / MODEL_FILE)
    obs, _ = env.reset(seed=0)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(model.predict(obs, deterministic=True)[0])
        total, done = total + reward, terminated or truncated
    assert result["scores"][0] == pytest.approx(total, abs=1e-4)
    # A run whose V has changed since is refused.
    other = tmp_path / "other"
    shutil.copytree(runs[0] / "z" / "seed0", other)
    run = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**run, "vae_fingerprint": "0123"}))
    with pytest.raises(UsageError, match="trained with another vae.pt .* retrain it with experiments/train_ppo.py"):
        evaluate.main(evaluate.Config(policy="ppo", ckpt_dir=str(other), episodes=1, workers=1))


def test_stochastic_scores_sample_the_trained_noise(runs, tmp_path):
    from stable_baselines3 import PPO

    from wm.ppo import PPOAgent

    run_dir = tmp_path / "run"
    shutil.copytree(runs[0] / "z" / "seed0", run_dir)
    model = PPO.load(run_dir / MODEL_FILE)
    with torch.no_grad():
        model.policy.log_std.fill_(1.0)  # gSDE's σ = e: far from the e^-2 a model is built with
    model.save(run_dir / MODEL_FILE)
    agent = PPOAgent.load(run_dir, stochastic=True)
    agent.reset([0, 1])
    agent.act(np.zeros((2, 96, 96, 3), np.uint8))
    noise = agent.model.policy.action_dist.exploration_matrices
    assert noise.shape[0] == 2 and noise.std().item() == pytest.approx(np.e, rel=0.1)
    cfg = evaluate.Config(policy="ppo", ckpt_dir=str(run_dir), episodes=2, max_steps=20, workers=1)
    sampled = evaluate.main(dataclasses.replace(cfg, stochastic=True))
    again = evaluate.main(dataclasses.replace(cfg, stochastic=True))
    assert sampled["stochastic"] and again["scores"] == sampled["scores"]  # seeded by the tracks
    assert evaluate.main(cfg)["scores"] != sampled["scores"]


def test_compare_draws_every_arm_and_pools_the_seeds_scores(runs, tmp_path):
    out = tmp_path / "ppo"
    shutil.copytree(runs[0], out)
    shutil.copytree(out / "z" / "seed0", out / "z" / "seed1")
    for seed, scores in ((0, [10.0, 20.0]), (1, [30.0, 60.0])):
        (out / "z" / f"seed{seed}" / "scores.json").write_text(json.dumps(
            {"scores": scores, "mean": float(np.mean(scores))}))
    csv = ROOT / "checkpoints" / "pretrained" / "road_view" / "controller_metrics.csv"
    text = compare_ppo.main(compare_ppo.Config(runs_dir=str(out), cmaes=f"zh={csv}", out=str(tmp_path / "c")))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:]}
    assert set(rows) == {f"PPO on {arm}, {how}" for arm in ("pixels (CNN)", "z", "[z, h]")
                         for how in ("mean action", "sampled actions")} | {"CMA-ES on [z, h]"}
    assert "to be run: python evaluate.py --policy ppo --ckpt-dir" in rows["PPO on pixels (CNN), mean action"]
    assert "--policy ppo --stochastic --ckpt-dir" in rows["PPO on z, sampled actions"]
    assert "| 2 | 128 / 128 | 30.0 ± 18.7 |" in rows["PPO on z, mean action"]  # 4 episodes pooled: the std of 10, 20, 30, 60
    shipped = json.loads((csv.parent / "scores.json").read_text())  # the scores.json beside the CSV
    generation = torch.load(csv.parent / "controller.pt", weights_only=True)["generation"]  # the C it scored
    frames = next(int(r["frames"]) for r in csv_module.DictReader(csv.open()) if int(r["generation"]) == generation)
    assert f"| 1 | {frames:,} | {shipped['mean']:.1f} ± {shipped['std']:.1f} |" in rows["CMA-ES on [z, h]"]
    assert (tmp_path / "c.png").stat().st_size > 10_000 and (tmp_path / "c.md").read_text() == text


def test_returns_at_reads_each_seeds_curve_between_its_episodes(tmp_path):
    for seed, rows in ((0, "10,0,5\n20,10,5\n"), (1, "10,20,5\n20,30,5\n")):
        run = tmp_path / "z" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "episodes.csv").write_text("frames,return,steps\n" + rows)
    text = compare_ppo.returns_at({"z": [tmp_path / "z" / "seed0", tmp_path / "z" / "seed1"]}, 1, [15, 20, 30])
    # by hand: at 15 frames seed 0 is halfway from 0 to 10, seed 1 from 20 to 30; nothing after 20
    assert text.splitlines()[2:] == ["| 15 | 15 (5, 25) |", "| 20 | 20 (10, 30) |", "| 30 |  |"]
    r = run_script("-m", "experiments.compare_ppo", "--runs-dir", str(tmp_path), "--at", "1e5")
    assert error_line(r) == "error: --at takes frames separated by commas, e.g. 100000,200000, got '1e5'"


def test_curves_average_seeds_where_all_have_data():
    assert compare_ppo.rolling_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    x, mean, low, high = compare_ppo.band([(np.array([0.0, 10.0]), np.array([0.0, 10.0])),
                                           (np.array([5.0, 20.0]), np.array([5.0, 5.0]))], points=3)
    assert x.tolist() == [5.0, 7.5, 10.0] and mean.tolist() == [5.0, 6.25, 7.5]
    assert low.tolist() == [5.0, 5.0, 5.0] and high.tolist() == [5.0, 7.5, 10.0]
