"""collect_rollouts.py as a user runs it: files, resume, Ctrl-C, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from collect_rollouts import collect_one
from tests.conftest import ROOT, default_sigint, pool_workers, run_script, start_script
from wm.env import COLLECT_SEED
from wm.rollouts import is_complete, read_rollout, read_setting, rollout_path, write_rollout


def test_end_to_end_writes_the_schema(tmp_path):
    out = tmp_path / "r"
    res = run_script("collect_rollouts.py", "--rollouts", "2", "--max-steps", "30",
                     "--workers", "2", "--out-dir", str(out), "--seed", "5")
    assert res.returncode == 0, res.stderr
    # 30 game frames each, one kept per decision at the default repeat of 2
    assert "rollouts 2" in res.stdout and "frames 30 (each held 2 game frames)" in res.stdout
    assert "MB on disk" in res.stdout
    files = sorted(out.glob("rollout_*.npz"))
    assert files == [rollout_path(out, 5), rollout_path(out, 6)]
    for f in files:
        d = read_rollout(f)
        assert d["observations"].shape == (15, 64, 64, 3) and d["observations"].dtype == np.uint8
        assert d["actions"].shape == (15, 3) and d["actions"].dtype == np.float32
        assert d["rewards"].shape == (15,) and d["rewards"].dtype == np.float32
        assert d["terminated"].dtype == bool and d["truncated"].dtype == bool
        assert d["truncated"][-1] and not d["truncated"][:-1].any()  # the --max-steps limit
        assert d["observations"].std() > 0


def test_same_seed_same_rollout_and_observation_precedes_action():
    a = collect_one(3, 25, "brownian")
    b = collect_one(3, 25, "brownian")
    c = collect_one(4, 25, "brownian")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["actions"], c["actions"])
    # Frame 0 is the reset frame, seen before any action was taken.
    from wm.env import make_env
    from wm.frames import preprocess
    env = make_env(fast=True)
    obs, _ = env.reset(seed=3)
    assert np.array_equal(a["observations"][0], preprocess(obs))
    obs, *_ = env.step(a["actions"][0])
    assert np.array_equal(a["observations"][1], preprocess(obs))


def test_uniform_policy_differs_from_brownian():
    u = collect_one(3, 10, "uniform")["actions"]
    b = collect_one(3, 10, "brownian")["actions"]
    # Brownian actions move in small steps; uniform ones jump.
    assert np.abs(np.diff(b, axis=0)).mean() < np.abs(np.diff(u, axis=0)).mean()


def test_pursuit_policy_drives_along_the_road(tmp_path):
    res = run_script("collect_rollouts.py", "--rollouts", "2", "--max-steps", "300", "--policy", "pursuit",
                     "--action-repeat", "2", "--workers", "2", "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    for seed in (COLLECT_SEED, COLLECT_SEED + 1):
        pursuit = read_rollout(rollout_path(tmp_path, seed))
        brownian = collect_one(seed, 300, "brownian", action_repeat=2)
        # Each new tile of road is worth 1000 / (tiles) points, about 3: in 300
        # frames a car that follows the road gains dozens of tiles, a random one few.
        assert pursuit["rewards"].sum() > 60 > brownian["rewards"].sum(), seed
        assert pursuit["actions"][:, 1].max() > 0.5  # it accelerates


def test_rerun_skips_complete_and_redoes_partial(tmp_path):
    out = tmp_path / "r"
    args = ("collect_rollouts.py", "--rollouts", "2", "--max-steps", "20", "--workers", "1",
            "--out-dir", str(out))
    assert run_script(*args).returncode == 0
    good, bad = rollout_path(out, COLLECT_SEED), rollout_path(out, COLLECT_SEED + 1)  # the default seeds
    good_mtime = good.stat().st_mtime_ns
    bad.write_bytes(bad.read_bytes()[:500])  # a truncated file
    (out / ".rollout_0000009.123.tmp.npz").write_bytes(b"junk")  # left by a killed run
    assert not is_complete(bad)
    res = run_script(*args)
    assert res.returncode == 0, res.stderr
    assert "1 of 2 rollouts already" in res.stdout and "warning" not in res.stderr
    assert good.stat().st_mtime_ns == good_mtime
    assert is_complete(bad) and len(read_rollout(bad)["actions"]) == 10  # 20 frames, each action held 2
    assert not list(out.glob(".*tmp*"))


def test_ctrl_c_leaves_no_half_written_file(tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "collect_rollouts.py", "--rollouts", "30", "--max-steps",
                             "1000", "--workers", "2", "--out-dir", str(out)], cwd=ROOT, env=env, preexec_fn=default_sigint,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Interrupt once the first rollout is written, while others are being written.
    deadline = time.time() + 120
    while not list(out.glob("rollout_*.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not list(out.glob(".*tmp*"))
    written = list(out.glob("rollout_*.npz"))
    assert 1 <= len(written) < 30 and all(is_complete(f) for f in written)


def wait_for_bar(proc: subprocess.Popen) -> None:
    """Read the script's stderr until its progress bar shows: the pool's
    workers have started and been sent their first rollouts."""
    seen = ""
    while "collect:" not in seen:
        c = proc.stderr.read(1)
        assert c, f"the script ended before its progress bar showed: {seen}"
        seen += c


def test_a_killed_worker_ends_the_run_with_one_line_and_a_rerun_completes(tmp_path):
    out = tmp_path / "r"
    args = ("collect_rollouts.py", "--rollouts", "3", "--max-steps", "300", "--workers", "2",
            "--out-dir", str(out))
    proc = start_script(*args)
    try:
        wait_for_bar(proc)
        workers = pool_workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)  # multiprocessing.Pool waited here for good
    finally:
        proc.kill()
    assert time.time() - t0 < 10
    assert proc.returncode == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: worker ") and "died while running a task (exit code -9)" in last, err
    res = run_script(*args)
    assert res.returncode == 0, res.stderr
    assert all(is_complete(rollout_path(out, COLLECT_SEED + s)) for s in range(3)) and not list(out.glob(".*tmp*"))


def test_workers_stop_quietly_when_the_main_process_is_killed(tmp_path):
    out = tmp_path / "r"
    proc = start_script("collect_rollouts.py", "--rollouts", "4", "--max-steps", "1000", "--workers", "2",
                        "--out-dir", str(out))
    try:
        wait_for_bar(proc)
        workers = pool_workers(proc.pid)
        assert len(workers) == 2, workers
        proc.kill()
        t0 = time.time()
        # The workers (and multiprocessing's resource tracker) share the script's
        # stderr: it ends once the last of them has exited.
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.time() - t0 < 5
    assert "Traceback" not in err and "Error" not in err and "leaked" not in err, err
    assert not list(out.glob("rollout_*.npz"))  # none finished after their parent was gone
    assert all(exited(w) for w in workers)


def exited(pid: int) -> bool:
    """Process `pid` is gone, or a zombie that nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("args, message", [
    (["--rollouts", "0"], "--rollouts must be at least 1"),
    (["--max-steps", "-5"], "--max-steps must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--action-repeat", "0"], "--action-repeat must be at least 1"),
    (["--policy", "drunk"], "--policy must be one of"),
    (["--out-dir", "{file}"], "is a file"),
    (["--out-dir", "{file}/sub"], "cannot write"),
])
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    f = tmp_path / "a_file"
    f.write_text("x")
    args = [a.format(file=f) for a in args]
    res = run_script("collect_rollouts.py", *args)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_action_repeat_keeps_one_row_per_held_action_and_records_k(tmp_path):
    out = tmp_path / "r"
    args = ("collect_rollouts.py", "--rollouts", "1", "--max-steps", "30", "--workers", "1",
            "--out-dir", str(out), "--seed", "3")
    res = run_script(*args, "--action-repeat", "3")
    assert res.returncode == 0, res.stderr
    path = rollout_path(out, 3)
    d = read_rollout(path)
    assert len(d["observations"]) == len(d["actions"]) == 10  # 30 frames, 3 a row
    assert read_setting(path, "action_repeat") == 3 and d["truncated"][-1] and not d["truncated"][:-1].any()
    # Row t is the frame seen before action t, which then drives 3 frames.
    from wm.env import make_env, step_repeat
    from wm.frames import preprocess
    env = make_env(fast=True)
    obs, _ = env.reset(seed=3)
    for t in range(3):
        assert np.array_equal(d["observations"][t], preprocess(obs, "full"))  # the default view
        obs, reward, *_ = step_repeat(env, d["actions"][t], 3)
        assert d["rewards"][t] == np.float32(reward)
    # A k = 1 file has no action_repeat array (it is the file from before the flag) and reads as 1.
    plain = collect_one(3, 5, "brownian")
    assert "action_repeat" not in plain
    write_rollout(tmp_path / "plain.npz", **plain)
    assert read_setting(tmp_path / "plain.npz", "action_repeat") == 1
    # A rerun with another k neither reuses nor overwrites these rollouts.
    mtime = path.stat().st_mtime_ns
    res = run_script(*args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "collected with --action-repeat 3" in res.stderr and "another --out-dir" in res.stderr
    assert path.stat().st_mtime_ns == mtime


def test_each_use_of_a_track_has_its_own_seeds():
    """Collection's default tracks meet neither evaluation's nor C's held-out
    or training tracks, even at the paper's 10,000 rollouts."""
    import collect_rollouts
    import evaluate
    import train_controller
    from wm.env import EVAL_SEED, HELD_OUT_SEED, SEED_LIMIT, TRAIN_SEED

    ranges = {"evaluation": range(EVAL_SEED, COLLECT_SEED), "collection": range(COLLECT_SEED, HELD_OUT_SEED),
              "held-out": range(HELD_OUT_SEED, TRAIN_SEED), "training": range(TRAIN_SEED, SEED_LIMIT)}
    assert EVAL_SEED < COLLECT_SEED < HELD_OUT_SEED < TRAIN_SEED < SEED_LIMIT  # so the ranges are disjoint

    def within(name, seeds):
        return all(s in ranges[name] for s in seeds)

    collect = collect_rollouts.Config()
    assert within("collection", range(collect.seed, collect.seed + 10_000))
    ev = evaluate.Config()
    assert within("evaluation", range(ev.seed, ev.seed + ev.episodes))
    c = train_controller.Config()
    assert within("held-out", [train_controller.HELD_OUT_SEED + i for i in range(c.eval_episodes)])
    assert within("training", [s for g in range(100) for s in train_controller.train_seeds(c.seed, g, 16)])


def test_a_warning_when_the_folder_would_hold_scored_tracks(tmp_path, capsys):
    from collect_rollouts import warn_on_scored_tracks

    out = tmp_path / "r"
    out.mkdir()
    warn_on_scored_tracks(out, range(COLLECT_SEED, COLLECT_SEED + 400))  # the defaults
    assert capsys.readouterr().err == ""
    warn_on_scored_tracks(out, range(0, 400))  # the shipped V's rollouts: evaluate.py's tracks 0..99
    assert capsys.readouterr().err.startswith(f"warning: {out} would hold 400 rollouts of tracks that are scored")
    warn_on_scored_tracks(out, range(99_990, 100_010))  # into C's held-out tracks
    assert "would hold 10 rollouts" in capsys.readouterr().err
    # Rollouts of evaluation's tracks already in the folder: V and M would learn from them too.
    write_rollout(rollout_path(out, 7), observations=np.zeros((1, 64, 64, 3), np.uint8))
    warn_on_scored_tracks(out, range(COLLECT_SEED, COLLECT_SEED + 400))
    assert "would hold 1 rollout of tracks that are scored (e.g. seed 7" in capsys.readouterr().err
