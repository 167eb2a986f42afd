"""What a stage does when things go wrong: a finished checkpoint is never
overwritten by a fresh run, a diverged M saves nothing, a kill between the
metrics row and the resume state loses no row, and a run killed after its
first controller.pt still resumes."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from conftest import (error_line, make_synthetic_rollouts, run_script, write_tiny_controller,
                      write_tiny_world_model)

import evaluate
import train_controller
import train_vae
from wm.metrics import MetricsLog
from wm.cli import UsageError
from wm.rollouts import read_rollout, read_setting, write_rollout
from wm.search import Search


@pytest.mark.parametrize("script, best, last", [("train_vae.py", "vae.pt", "vae_last.pt"),
                                                ("train_mdnrnn.py", "mdnrnn.pt", "mdnrnn_last.pt")])
def test_a_finished_checkpoint_is_not_overwritten_by_a_fresh_run(tmp_path, script, best, last):
    """A folder holding vae.pt or mdnrnn.pt but not the *_last.pt that
    training leaves (a shipped or committed run) is not trained over."""
    ro, ckpt = tmp_path / "ro", tmp_path / "ckpt"
    make_synthetic_rollouts(ro, n=3)
    write_tiny_world_model(ckpt)
    before = (ckpt / best).read_bytes()
    args = [script, "--data-dir", str(ro), "--ckpt-dir", str(ckpt), "--latent-dir", str(tmp_path / "lat"),
            "--epochs", "1", "--batch-size", "20"]
    if script == "train_vae.py":
        args.remove("--latent-dir"), args.remove(str(tmp_path / "lat"))
    line = error_line(run_script(*args))
    assert f"{best} is there but {last} is not" in line and "--restart" in line
    assert (ckpt / best).read_bytes() == before
    assert run_script(*args, "--restart").returncode == 0
    assert (ckpt / best).read_bytes() != before


def test_m_that_diverges_saves_nothing_and_says_so(tmp_path):
    ro, ckpt = tmp_path / "ro", tmp_path / "ckpt"
    paths = make_synthetic_rollouts(ro, n=3)
    data = read_rollout(paths[0])
    data["rewards"][3] = np.inf
    write_rollout(paths[0], **data, view=np.array("full"))
    from conftest import write_tiny_vae

    write_tiny_vae(ckpt)
    r = run_script("train_mdnrnn.py", "--data-dir", str(ro), "--latent-dir", str(tmp_path / "lat"),
                   "--ckpt-dir", str(ckpt), "--epochs", "1", "--seq-len", "8")
    line = r.stderr.strip().splitlines()[-1]  # after the encoding's progress bar
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert line.startswith("error: training diverged in epoch 1") and "inf or NaN" in line
    assert not (ckpt / "mdnrnn_last.pt").exists() and not (ckpt / "mdnrnn.pt").exists()


def fake_fitness(*args):
    return lambda xs, seeds: (np.array([-np.sum((x - 1) ** 2) for x in xs]), 0)


def controller_config(tmp_path, generations, **flags):
    return train_controller.Config(ckpt_dir=str(tmp_path), pop_size=4, sigma0=0.5, generations=generations,
                                   rollouts_per_member=1, max_steps=5, workers=1, eval_episodes=1, **flags)


def test_a_kill_between_the_metrics_row_and_the_state_loses_no_row(tmp_path, monkeypatch):
    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    monkeypatch.setattr(train_controller, "RealFitness", fake_fitness)
    save = Search.save

    def killed_at_2(self, path, info):
        if info["generation"] == 2:
            raise KeyboardInterrupt
        save(self, path, info)

    monkeypatch.setattr(Search, "save", killed_at_2)
    with pytest.raises(KeyboardInterrupt):
        train_controller.main(controller_config(tmp_path, 3))
    monkeypatch.setattr(Search, "save", save)
    state = train_controller.main(controller_config(tmp_path, 3))
    assert state["generation"] == 3
    rows = MetricsLog(tmp_path / "controller_metrics.csv").rows()
    assert [r["generation"] for r in rows] == ["1", "2", "3"]


def test_a_run_killed_after_its_first_controller_pt_resumes(tmp_path, monkeypatch):
    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    monkeypatch.setattr(train_controller, "RealFitness", fake_fitness)
    save = Search.save
    monkeypatch.setattr(Search, "save", lambda self, path, info: (
        save(self, path, info) if info["generation"] < 1 else (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        train_controller.main(controller_config(tmp_path, 2, eval_every=1))
    assert (tmp_path / "controller.pt").is_file()
    monkeypatch.setattr(Search, "save", save)
    assert train_controller.main(controller_config(tmp_path, 2, eval_every=1))["generation"] == 2


def test_a_kill_between_v_s_metrics_row_and_its_checkpoint_loses_no_row(synthetic_rollouts, tmp_path,
                                                                        monkeypatch):
    ckpt = tmp_path / "ckpt"
    save = train_vae.save_checkpoint

    def killed_in_epoch_2(path, payload):
        if payload["epoch"] == 2 and path.name == "vae_last.pt":
            raise KeyboardInterrupt
        save(path, payload)

    monkeypatch.setattr(train_vae, "save_checkpoint", killed_in_epoch_2)
    cfg = train_vae.Config(data_dir=str(synthetic_rollouts), ckpt_dir=str(ckpt), epochs=3, batch_size=20)
    with pytest.raises(KeyboardInterrupt):
        train_vae.main(cfg)
    monkeypatch.setattr(train_vae, "save_checkpoint", save)
    train_vae.main(cfg)
    assert [r["epoch"] for r in MetricsLog(ckpt / "vae_metrics.csv").rows()] == ["1", "2", "3"]


def test_a_second_run_into_the_same_folder_is_refused_and_a_dead_one_s_lock_is_taken_over(tmp_path):
    """One lock per output folder, for every stage; the second run names the
    first's process, and a lock left by a killed run does not block the next."""
    import os
    import subprocess
    import sys

    from wm.files import folder_lock

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(str(sleeper.pid))  # a live run holds it
        for script in ("collect_rollouts.py", "train_vae.py", "train_mdnrnn.py", "train_controller.py"):
            flag = "--out-dir" if script == "collect_rollouts.py" else "--ckpt-dir"
            line = error_line(run_script(script, flag, str(tmp_path)))
            assert f"is in use by another run (process {sleeper.pid})" in line, script
        # Temporary rollout files of a live writer are left alone.
        tmp = tmp_path / f".rollout_0010000.{sleeper.pid}.tmp.npz"
        tmp.write_bytes(b"partial")
        from wm.rollouts import remove_stale_temporaries

        remove_stale_temporaries(tmp_path)
        assert tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    remove_stale_temporaries(tmp_path)
    assert not tmp.exists()  # its writer is gone
    with folder_lock(tmp_path, "--ckpt-dir"):  # the dead run's lock is taken over
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_a_rollout_without_steps_is_skipped_by_v_and_m(tmp_path):
    ro, ckpt = tmp_path / "ro", tmp_path / "ckpt"
    make_synthetic_rollouts(ro, n=3)
    write_rollout(ro / "rollout_0000099.npz", observations=np.zeros((0, 64, 64, 3), np.uint8),
                  actions=np.zeros((0, 3), np.float32), rewards=np.zeros(0, np.float32),
                  terminated=np.zeros(0, bool), truncated=np.zeros(0, bool), view=np.array("full"))
    for args in (["train_vae.py", "--batch-size", "20"],
                 ["train_mdnrnn.py", "--latent-dir", str(tmp_path / "lat"), "--seq-len", "8"]):
        r = run_script(*args, "--data-dir", str(ro), "--ckpt-dir", str(ckpt), "--epochs", "1")
        assert r.returncode == 0, r.stderr
        assert "rollout_0000099.npz: holds no steps" in r.stderr, args[0]


def test_a_resumed_run_uses_its_settings_or_refuses(tmp_path, capsys):
    """V resumed with another --seed or --val-fraction is refused (they draw
    its split); with more rollouts in the folder it keeps its split, so no
    validation rollout is trained on. Collection does not count a rollout
    of another --policy or --max-steps as one of those asked for."""
    ro, ckpt = tmp_path / "ro", tmp_path / "ckpt"
    make_synthetic_rollouts(ro, n=4, steps=16)
    tiny = dict(data_dir=str(ro), ckpt_dir=str(ckpt), batch_size=16, precision="fp32", val_fraction=0.25)
    train_vae.main(train_vae.Config(epochs=1, **tiny))
    first = torch.load(ckpt / "vae_last.pt", weights_only=True)
    for change, flag in (({"seed": 1}, "--seed 0"), ({"val_fraction": 0.5}, "--val-fraction 0.25")):
        with pytest.raises(UsageError, match=f"give {flag}, or pass --restart"):
            train_vae.main(train_vae.Config(epochs=2, **{**tiny, **change}))
    make_synthetic_rollouts(ro, n=8, steps=16)  # 4 more, of which the default split would hold out 2
    capsys.readouterr()
    train_vae.main(train_vae.Config(epochs=2, **tiny))
    assert "4 rollouts came to" in capsys.readouterr().out
    last = torch.load(ckpt / "vae_last.pt", weights_only=True)
    assert last["epoch"] == 2
    assert (last["train_rollouts"], last["val_rollouts"]) == (first["train_rollouts"], first["val_rollouts"])

    out = tmp_path / "collected"
    args = ["collect_rollouts.py", "--rollouts", "2", "--max-steps", "20", "--workers", "1",
            "--policy", "uniform", "--out-dir", str(out)]
    assert run_script(*args).returncode == 0
    assert read_setting(out / "rollout_0010000.npz", "policy") == "uniform"
    for asked, wrong in (("uniform", "brownian"), ("20", "30")):
        line = error_line(run_script(*[wrong if a == asked else a for a in args]))
        assert "already holds 2 of these tracks' rollouts collected with" in line and "another --seed" in line


@pytest.mark.parametrize("name", ["vae.pt", "mdnrnn.pt", "controller.pt"])
def test_a_foreign_checkpoint_is_one_line(tmp_path, name):
    """A checkpoint without model_args, with an unknown one, or with weights
    of another shape is refused in one line by the stage that reads it."""
    write_tiny_world_model(tmp_path)
    write_tiny_controller(tmp_path)
    good = torch.load(tmp_path / name, weights_only=True)
    first = next(iter(good["model"]))
    broken = {"no model_args": {k: v for k, v in good.items() if k != "model_args"},
              "unknown setting": {**good, "model_args": {**good["model_args"], "colour": "red"}},
              "wrong shape": {**good, "model": {**good["model"], first: torch.zeros(3, 3)}}}
    for what, ckpt in broken.items():
        torch.save(ckpt, tmp_path / name)
        with pytest.raises(UsageError) as e:
            evaluate.main(evaluate.Config(ckpt_dir=str(tmp_path), episodes=1, max_steps=5, workers=1))
        line = str(e.value)
        assert "\n" not in line
        assert f"{tmp_path / name} " in line and "rerun" in line, (what, line)
        assert ("has no model_args" if what == "no model_args" else "does not fit") in line, (what, line)


def test_c_whose_fitness_is_not_finite_stops_and_keeps_its_state(tmp_path, monkeypatch):
    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    monkeypatch.setattr(train_controller, "RealFitness", fake_fitness)
    train_controller.main(controller_config(tmp_path, 1))
    before = (tmp_path / "controller_es.npz").read_bytes()
    monkeypatch.setattr(train_controller, "RealFitness",
                        lambda *a: lambda xs, seeds: (np.array([np.nan] + [0.0] * (len(xs) - 1)), 0))
    with pytest.raises(UsageError, match="generation 2: 1 members' fitness is not finite"):
        train_controller.main(controller_config(tmp_path, 2))
    assert (tmp_path / "controller_es.npz").read_bytes() == before


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 256 KiB tmpfs (needs the right to mount, as root has)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def last_line(result) -> str:
    """The one error line a script ended with, after its progress bars."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_full_disk_is_one_line_and_loses_no_result(full_disk, tmp_path):
    """Collection, V, C and evaluation on a disk that fills up: one line each,
    the files there as they were, and evaluate.py's scores still printed."""
    collect = ["collect_rollouts.py", "--rollouts", "3", "--max-steps", "400", "--workers", "1"]
    line = last_line(run_script(*collect, "--out-dir", str(full_disk / "ro")))
    assert line.startswith("error: no space left on the disk of") and "free some space" in line
    make_synthetic_rollouts(tmp_path / "ro", n=3, steps=16)
    line = last_line(run_script("train_vae.py", "--data-dir", str(tmp_path / "ro"), "--ckpt-dir",
                                 str(full_disk / "v"), "--epochs", "1", "--batch-size", "16"))
    assert line.startswith("error: no space left on the disk of") and "vae" in line
    write_tiny_world_model(tmp_path / "c", latent_size=2, hidden_size=2)
    write_tiny_controller(tmp_path / "c")
    (full_disk / "c").mkdir()
    for name in ("vae.pt", "mdnrnn.pt"):  # V alone is larger than this disk
        (full_disk / "c" / name).symlink_to(tmp_path / "c" / name)
    # Every page taken: an empty file still fits (evaluate.py's check at the start), no JSON does.
    subprocess.run(["dd", "if=/dev/zero", f"of={full_disk / 'filler'}", "bs=4k"], capture_output=True)
    line = last_line(run_script("train_controller.py", "--ckpt-dir", str(full_disk / "c"), "--pop-size", "4",
                                "--generations", "1", "--max-steps", "5", "--rollouts-per-member", "1",
                                "--workers", "1", "--eval-episodes", "1"))
    assert line.startswith("error: no space left on the disk"), line
    r = run_script("evaluate.py", "--ckpt-dir", str(tmp_path / "c"), "--episodes", "1", "--max-steps", "5",
                   "--workers", "1", "--json", str(full_disk / "scores.json"))
    import json

    line = last_line(r)
    assert "no space left" in line and "the line of JSON above" in line, line
    assert json.loads(r.stdout.strip().splitlines()[-1])["episodes"] == 1
