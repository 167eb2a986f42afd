"""What a stage does when things go wrong: a finished checkpoint is never
overwritten by a fresh run, a diverged M saves nothing, a kill between the
metrics row and the resume state loses no row, and a run killed after its
first controller.pt still resumes."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import error_line, make_synthetic_rollouts, run_script, write_tiny_world_model

import train_controller
import train_vae
from wm.metrics import MetricsLog
from wm.rollouts import read_rollout, write_rollout
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
    write_rollout(paths[0], **data)
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
                  terminated=np.zeros(0, bool), truncated=np.zeros(0, bool))
    for args in (["train_vae.py", "--batch-size", "20"],
                 ["train_mdnrnn.py", "--latent-dir", str(tmp_path / "lat"), "--seq-len", "8"]):
        r = run_script(*args, "--data-dir", str(ro), "--ckpt-dir", str(ckpt), "--epochs", "1")
        assert r.returncode == 0, r.stderr
        assert "rollout_0000099.npz: holds no steps" in r.stderr, args[0]
