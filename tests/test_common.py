"""The shared package: flags from a dataclass, checkpoints, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import ROOT

from wm.checkpoint import load_checkpoint, save_checkpoint, state_fingerprint
from wm.cli import UsageError, parse_config
from wm.files import temporary_path, write_atomically
from wm.metrics import MetricsLog
from wm.rollouts import write_rollout


@dataclass
class Config:
    lr: float = 1e-3  # learning rate
    max_steps: int = 10  # steps
    out_dir: str = "data"  # where
    fast: bool = True  # use the fast thing


def test_flags_override_defaults_and_help_comes_from_comments(capsys, tmp_path):
    cfg = parse_config(Config, ["--lr", "0.5", "--max-steps", "3", "--fast", "false"])
    assert cfg == Config(lr=0.5, max_steps=3, out_dir="data", fast=False)
    over = tmp_path / "c.json"
    over.write_text(json.dumps({"max_steps": 7, "out_dir": "x"}))
    assert parse_config(Config, ["--config", str(over), "--out-dir", "y"]) == Config(max_steps=7, out_dir="y")
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"])
    assert "learning rate (default: 0.001)" in capsys.readouterr().out
    over.write_text(json.dumps({"nope": 1}))
    with pytest.raises(UsageError, match="unknown option"):
        parse_config(Config, ["--config", str(over)])


def test_checkpoint_round_trip_is_weights_only_and_fingerprinted(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"kind": "vae", "model": model.state_dict(), "model_args": {"n": 3}, "epoch": 4})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["fingerprint"] == state_fingerprint(model.state_dict())
    assert load_checkpoint(path, kind="vae")["model_args"] == {"n": 3}
    with torch.no_grad():
        model.weight[0, 0] += 1
    assert state_fingerprint(model.state_dict()) != ckpt["fingerprint"]
    assert not list(tmp_path.glob(".*.tmp*"))


def test_checkpoint_errors_say_what_to_do(tmp_path):
    with pytest.raises(UsageError, match="run train_vae.py first"):
        load_checkpoint(tmp_path / "vae.pt", kind="vae")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt", kind="mdnrnn")
    save_checkpoint(tmp_path / "v.pt", {"kind": "vae", "model": {}})
    with pytest.raises(UsageError, match="expected mdnrnn"):
        load_checkpoint(tmp_path / "v.pt", kind="mdnrnn")


def test_metrics_log_resume_drops_redone_epochs(tmp_path):
    log = MetricsLog(tmp_path / "m.csv")
    for e in range(1, 5):
        log.append({"epoch": e, "loss": 10 - e})
    log.truncate_after(2)
    log.append({"epoch": 3, "loss": 1.5, "extra": 1})
    rows = log.rows()
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and rows[-1]["extra"] == "1"
    log.extend([{"epoch": 4, "loss": 1.0}, {"epoch": 5, "loss": 0.5, "more": 2}])  # one rewrite
    rows = log.rows()
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [r["more"] for r in rows] == ["", "", "", "", "2"] and rows[2]["extra"] == "1"
    log.plot(tmp_path / "m.png", ["loss"])
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.txt"
    write_atomically(path, lambda tmp: tmp.write_text("old"))

    def half_then(error):
        def write(tmp):
            tmp.write_text("ha")
            raise error
        return write

    for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            write_atomically(path, half_then(error))
        assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.txt"]


def test_the_next_write_removes_what_a_killed_write_left(tmp_path):
    path = tmp_path / "m.npz"
    # A process killed (SIGKILL: no cleanup runs) while writing m.npz.
    child = subprocess.Popen([sys.executable, "-c", f"""
import time
from wm.files import write_atomically
write_atomically({str(path)!r}, lambda tmp: (tmp.write_bytes(b"half"), time.sleep(60)))
"""], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    left = temporary_path(path, child.pid)
    deadline = time.time() + 30
    while not left.exists() and time.time() < deadline:
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert left.read_bytes() == b"half"
    live = temporary_path(path, os.getppid())  # a live process writing m.npz at the same time
    other = temporary_path(tmp_path / "other.npz", child.pid)  # another file's: not this write's business
    for p in (live, other):
        p.write_bytes(b"x")
    write_rollout(path, a=np.zeros(3))  # np.savez needs the temporary name to end in .npz
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.npz", live.name, other.name])
    assert np.load(path)["a"].shape == (3,)
