"""evaluate.py: scores, the JSON, the video, and the random baseline."""

from __future__ import annotations

import dataclasses
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, run_script, write_tiny_controller, write_tiny_world_model

import evaluate
from evaluate import Config
from wm.cli import UsageError, parse_config
from wm.metrics import interquartile_mean


def test_evaluate_writes_the_json_and_a_video(tmp_path):
    write_tiny_world_model(tmp_path)
    write_tiny_controller(tmp_path)
    out, video = tmp_path / "out.json", tmp_path / "out.gif"
    r = run_script("evaluate.py", "--ckpt-dir", str(tmp_path), "--episodes", "2", "--json", str(out),
                   "--video", str(video), "--max-steps", "30", "--workers", "2", timeout=180)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["episodes"] == 2 and result["seed"] == 0 and len(result["scores"]) == 2
    assert result["mean"] == pytest.approx(np.mean(result["scores"]))
    assert result["std"] == pytest.approx(np.std(result["scores"]))
    assert min(result["scores"]) <= result["iqm_ci95"][0] <= result["iqm"] <= result["iqm_ci95"][1]
    assert "+-" in r.stdout and "episode   2" in r.stdout

    frames = iio.imread(video, index=None)  # every 4th step of episode 1, 12.5 pictures a second
    assert frames.shape == (8, 416, 1400, 3)  # the game's 600 x 400 frame, V's and M's 400 x 400
    real, v, m = frames[:, 20:380, 20:580], frames[:, 20:380, 620:980], frames[:, 20:380, 1020:1380]
    assert real.mean() > 20 and v.mean() > 20  # the road, and V's (untrained, grey) picture
    assert m[0].max() == 0 and m[-1].mean() > 20  # M has nothing to predict at the first step


def test_interquartile_mean_and_its_interval():
    # By hand: the middle half of 0..99 is 25..74, whose mean is 49.5.
    iqm, (low, high) = interquartile_mean(list(map(float, range(100))))
    assert iqm == 49.5 and low < 49.5 < high
    # An outlier moves the mean but not the IQM; the interval narrows with more episodes.
    rng = np.random.default_rng(0)
    few, many = rng.normal(900, 30, 20), rng.normal(900, 30, 400)
    assert interquartile_mean([*many[:-1], -100.0])[0] == pytest.approx(
        np.mean(np.sort(many[:-1])[99:299]))
    width = lambda s: np.subtract(*interquartile_mean(list(s))[1][::-1])  # noqa: E731
    assert width(many) < width(few)


def test_random_policy_needs_no_checkpoints(tmp_path, monkeypatch):
    import wm.env

    made = []
    monkeypatch.setattr(evaluate, "make_env", lambda **kw: made.append(kw) or wm.env.make_env(**kw))
    out = tmp_path / "r.json"
    cfg = Config(policy="random", ckpt_dir=str(tmp_path / "nothing"), episodes=3, max_steps=20,
                 workers=1, json=str(out))
    result = evaluate.main(cfg)
    assert json.loads(out.read_text())["scores"] == result["scores"] and len(result["scores"]) == 3
    assert made and all(kw["fast"] is False for kw in made)  # the official CarRacing-v3
    # Seeded: the same tracks, the same actions, whether the episodes run in one batch or one at a time.
    assert evaluate.main(dataclasses.replace(cfg, batch_size=1))["scores"] == result["scores"]


def test_controller_trained_on_another_v_is_refused(tmp_path):
    write_tiny_world_model(tmp_path)
    write_tiny_controller(tmp_path)
    write_tiny_world_model(tmp_path, seed=1)  # V and M retrained since
    with pytest.raises(UsageError, match="trained with another vae.pt"):
        evaluate.main(Config(ckpt_dir=str(tmp_path), episodes=1, workers=1))


@pytest.mark.parametrize("flags, message", [
    ([], "controller.pt not found; run train_controller.py"),
    (["--episodes", "0"], "--episodes must be at least 1"),
    (["--render", "window"], "--render must be none or human"),
    (["--video", "x.avi"], "--video must end in .gif or .mp4"),
    (["--policy", "best"], "--policy must be agent, random or ppo"),
    (["--policy", "ppo"], "ppo_last.zip not found; run experiments/train_ppo.py first"),
    (["--policy", "random", "--drive-stats", "--backend", "ray"], "--drive-stats runs the episodes in this process; drop --backend ray"),
    (["--policy", "random", "--stochastic"], "--stochastic samples a PPO policy's actions; add --policy ppo"),
    (["--policy", "random", "--render", "human", "--backend", "ray"], "--render human runs the episodes in this process; drop --backend ray"),
    (["--policy", "random", "--json", "."], r"cannot write --json \. \(\. is a folder\)"),
])
def test_bad_input_gets_one_line_errors(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        evaluate.main(parse_config(Config, ["--ckpt-dir", str(tmp_path), *flags]))


@pytest.mark.parametrize("flag, name", [("--json", "scores.json"), ("--video", "drive.gif")])
def test_an_output_that_cannot_be_written_fails_before_the_first_episode(tmp_path, flag, name):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / name  # its parent is a file: no one, root included, can write there
    r = run_script("evaluate.py", "--policy", "random", "--episodes", "4", "--max-steps", "100", "--workers", "1",
                   flag, str(path))
    assert error_line(r) == f"error: cannot write {flag} {path} ({path.parent} is a file, not a folder); pass another path"
    assert "episode" not in r.stdout


def test_the_shipped_agent_plays_and_films_on_a_fresh_clone(tmp_path):
    """The README's first command, shortened: the committed agent loads (weights
    only, V, M and C belonging together) and writes its video."""
    shipped = ROOT / "checkpoints" / "pretrained"
    for name in ("vae.pt", "mdnrnn.pt", "controller.pt"):
        assert (shipped / name).is_file(), f"{name} is not committed in {shipped}"
        assert torch.load(shipped / name, weights_only=True)["model"]
    out, video = tmp_path / "out.json", tmp_path / "drive.gif"
    r = run_script("evaluate.py", "--ckpt-dir", str(shipped), "--episodes", "1", "--max-steps", "60",
                   "--workers", "1", "--json", str(out), "--video", str(video), timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["steps"] == 60  # a car that drives stays on the track 60 steps
    assert iio.imread(video, index=None).shape == (15, 416, 1400, 3)  # 30 decisions, every other filmed


@pytest.mark.parametrize("folder, features", [("random_data", "zh"), ("random_data/z_only", "z"),
                                              ("random_data/dream", "zh")])
def test_the_results_table_s_other_cs_play(tmp_path, folder, features):
    """The table's other rows: their Cs are committed beside the shipped one.
    They read the V and M that learned from random rollouts (random_data/; the
    z-only and dream-trained Cs through links, not second copies), not the
    shipped agent's."""
    shipped = ROOT / "checkpoints" / "pretrained"
    for name in ("vae.pt", "mdnrnn.pt"):
        path = (shipped / folder / name).resolve()
        assert path != (shipped / name).resolve(), name
        if features == "zh" or name == "vae.pt":
            assert path == (shipped / "random_data" / name).resolve(), name
    assert torch.load(shipped / folder / "controller.pt", weights_only=True)["model_args"]["features"] == features
    out = tmp_path / "out.json"
    r = run_script("evaluate.py", "--ckpt-dir", str(shipped / folder), "--episodes", "1", "--max-steps", "60",
                   "--workers", "1", "--json", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["steps"] == 60


def test_the_dream_only_cs_read_their_loop_s_m_and_the_shipped_one_plays(tmp_path):
    """The dream-only Cs read their loop's M (round 10 of the repair loop, or
    round 2 of the loop from laps past the grip) and the shipped V through
    links; the scaled ones are their CMA-ES C's weights times their scale
    (tools/scale_controller.py); the one in the results table plays."""
    shipped = ROOT / "checkpoints" / "pretrained"
    for m, source, scaled in (("dream_repair", "dream_seeds", (("dream_scaled_075", 0.75), ("dream_scaled_085", 0.85))),
                              ("dream_grip", "dream_grip_ensemble", (("dream_grip_ensemble_090", 0.9),))):
        weights = torch.load(shipped / source / "controller.pt", weights_only=True)
        for folder, scale in ((source, 1.0), *scaled):
            assert (shipped / folder / "mdnrnn.pt").resolve() == (shipped / m / "mdnrnn.pt").resolve()
            assert (shipped / folder / "vae.pt").resolve() == (shipped / "vae.pt").resolve()
            ckpt = torch.load(shipped / folder / "controller.pt", weights_only=True)
            assert ckpt.get("scale", 1.0) == scale, folder
            assert all(torch.allclose(ckpt["model"][k], scale * weights["model"][k]) for k in weights["model"]), folder
    # The ensemble's C dreamed in round 2's M and the M fine-tuned from it, which is shipped too.
    member = torch.load(shipped / "dream_grip_m2" / "mdnrnn.pt", weights_only=True)
    ensemble = torch.load(shipped / "dream_grip_ensemble" / "controller.pt", weights_only=True)
    assert ensemble["config"]["dream_ensemble"] and member["vae_fingerprint"] == ensemble["vae_fingerprint"]
    out = tmp_path / "out.json"
    r = run_script("evaluate.py", "--ckpt-dir", str(shipped / "dream_grip_ensemble_090"), "--episodes", "1",
                   "--max-steps", "60", "--workers", "1", "--json", str(out), timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["steps"] == 60


def test_the_agent_holds_its_actions_as_controller_pt_says(tmp_path):
    write_tiny_world_model(tmp_path, action_repeat=3)
    write_tiny_controller(tmp_path, action_repeat=3)
    video = tmp_path / "k3.gif"
    result = evaluate.main(Config(ckpt_dir=str(tmp_path), episodes=1, workers=1, max_steps=30,
                                  video=str(video)))
    assert result["steps"] == 30  # frames, as at k = 1
    assert result["frames"] == [30] and result["laps_finished"] == 0 and result["lap_frames"] is None
    # 10 decisions in 30 frames, every other filmed: 12.5 pictures a second or fewer (at k = 1,
    # every 4th of 30: 8).
    assert iio.imread(video, index=None).shape[0] == 5
    assert evaluate.agent_spec(Config(ckpt_dir=str(tmp_path)))[0].action_repeat == 3  # what the workers get
    write_tiny_controller(tmp_path)  # a controller.pt from before the flag: k = 1
    assert evaluate.agent_spec(Config(ckpt_dir=str(tmp_path)))[0].action_repeat == 1


def test_a_warning_when_the_tracks_scored_are_tracks_v_or_m_trained_on(tmp_path, capsys):
    from wm.checkpoint import load_checkpoint, save_checkpoint
    from wm.env import COLLECT_SEED
    from wm.rollouts import rollout_path

    write_tiny_world_model(tmp_path)
    write_tiny_controller(tmp_path)

    def trained_on(name, seeds):  # what train_vae.py and train_mdnrnn.py record (the fingerprint stays)
        ckpt = load_checkpoint(tmp_path / f"{name}.pt", name)
        save_checkpoint(tmp_path / f"{name}.pt", {**ckpt, "train_rollouts": [rollout_path("", s).name for s in seeds]})

    def warning(seed=0):  # what evaluate.main prints before it drives 2 episodes from `seed`
        cfg = Config(ckpt_dir=str(tmp_path), seed=seed, episodes=2)
        capsys.readouterr()
        evaluate.warn_on_seen_tracks([seed, seed + 1], evaluate.world_model_tracks(cfg, evaluate.agent_spec(cfg)[0]))
        return capsys.readouterr().err

    assert warning() == ""  # checkpoints that record no rollouts: nothing to say
    trained_on("vae", range(COLLECT_SEED, COLLECT_SEED + 5))  # collection's own tracks
    assert warning() == ""
    trained_on("vae", range(1, 5))  # V on tracks 1..4, as the shipped V on 0..399
    trained_on("mdnrnn", [0])
    evaluate.main(Config(ckpt_dir=str(tmp_path), episodes=2, workers=1, max_steps=5))
    assert capsys.readouterr().err.strip().splitlines() == [
        "warning: 2 of the 2 tracks scored (seeds 0..1) are tracks that V and M trained on (e.g. seed 0), "
        "so this is no score on unseen tracks; --seed 5 scores on none of them"]
    assert warning(seed=5) == ""
    write_tiny_controller(tmp_path, features="z")  # C without M: only V's tracks count
    assert "1 of the 2 tracks scored (seeds 0..1) are tracks that V trained on (e.g. seed 1)" in warning()


def test_only_the_random_data_v_warns_that_it_trained_on_evaluation_s_tracks(capsys):
    """The random-data V learned from rollouts of tracks 0..399, before collection
    had tracks of its own: its score is on 91 tracks it trained on. The shipped
    V and M learned from collection's own tracks only."""
    def warning_on_tracks_0_to_99(folder):
        cfg = Config(ckpt_dir=str(folder))
        spec, _ = evaluate.agent_spec(cfg)
        evaluate.warn_on_seen_tracks(list(range(100)), evaluate.world_model_tracks(cfg, spec))
        return capsys.readouterr().err

    shipped = ROOT / "checkpoints" / "pretrained"
    assert warning_on_tracks_0_to_99(shipped) == ""
    assert "91 of the 100 tracks scored (seeds 0..99) are tracks that V trained on" in \
        warning_on_tracks_0_to_99(shipped / "random_data")


def test_drive_stats_say_how_each_episode_was_driven(tmp_path, capsys):
    out = tmp_path / "d.json"
    cfg = Config(policy="random", ckpt_dir=str(tmp_path), episodes=3, max_steps=40, workers=2, batch_size=2,
                 json=str(out), drive_stats=True)
    result = evaluate.main(cfg)
    assert "--drive-stats: every episode runs in this process, not on 2 workers" in capsys.readouterr().out
    driving = json.loads(out.read_text())["driving"]
    assert len(driving) == 3 and [d["frames"] for d in driving] == [40, 40, 40]
    for d in driving:
        # Uniform random actions: the steering changes sign about every other decision.
        assert 0.2 < d["steer_flips"] < 0.8 and 0.3 < d["abs_steer"] < 0.7 and d["top_speed"] > 0
    # The log only watches: the same scores as without it, on the workers.
    assert evaluate.main(dataclasses.replace(cfg, drive_stats=False, json=None))["scores"] == result["scores"]


def test_the_stages_defaults_are_the_shipped_recipe():
    """Run with their defaults, the stages make the shipped agent's recipe:
    each Config's defaults are the settings its stage recorded in the shipped
    checkpoints, all but the folders that run used and the machine's own
    (workers, device, threads); an option added since (a weight that only
    another weighting reads) is the one setting a checkpoint may not record.
    Collection's are the view V learned and the rate M learned."""
    import collect_rollouts, train_controller, train_mdnrnn, train_vae

    shipped = ROOT / "checkpoints" / "pretrained"
    own = {"data_dir", "latent_dir", "ckpt_dir", "workers", "device", "threads"}
    for name, script in (("vae.pt", train_vae), ("mdnrnn.pt", train_mdnrnn), ("controller.pt", train_controller)):
        recorded = torch.load(shipped / name, weights_only=True)["config"]
        defaults = dataclasses.asdict(script.Config())
        assert set(recorded) <= set(defaults), name
        differ = {k: (defaults[k], v) for k, v in recorded.items() if k not in own and defaults[k] != v}
        assert not differ, f"{script.__name__}.Config's defaults differ from {name}'s (default, recorded): {differ}"
    collect = collect_rollouts.Config()
    assert collect.view == torch.load(shipped / "vae.pt", weights_only=True)["model_args"]["view"]
    assert collect.action_repeat == torch.load(shipped / "mdnrnn.pt", weights_only=True)["model_args"]["action_repeat"]
