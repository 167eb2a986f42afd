"""The shared package: flags from a dataclass, checkpoints, metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from wm.checkpoint import load_checkpoint, save_checkpoint, state_fingerprint
from wm.cli import UsageError, parse_config
from wm.metrics import MetricsLog


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
    assert not list(tmp_path.glob(".*tmp"))


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
