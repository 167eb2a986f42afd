"""The shared package: flags from a dataclass, checkpoints, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from typing import get_type_hints

import numpy as np
import pytest
import torch
from conftest import ROOT, error_line, run_script

from wm.checkpoint import load_checkpoint, save_checkpoint, state_fingerprint
from wm.cli import AT_LEAST_1, POSITIVE, UsageError, parse_config
from wm.files import temporary_path, write_atomically
from wm.metrics import MetricsLog
from wm.rollouts import write_rollout


@dataclass
class Config:
    lr: float = 1e-3  # learning rate
    max_steps: int = 10  # steps
    out_dir: str = "data"  # where
    fast: bool = True  # use the fast thing

    RANGES = {"lr": POSITIVE, "max_steps": AT_LEAST_1}


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
    assert load_checkpoint(path)["model_args"] == {"n": 3}
    with pytest.raises(UsageError, match="does not fit the vae model"):  # a Linear is no V
        load_checkpoint(path, kind="vae")
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


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "--config {path} holds [1, 2], not an object of options"),
    ('{"lr": "fast"}', 'lr in {path} must be a number, got "fast"'),
    ('{"max_steps": 2.5}', "max_steps in {path} must be a whole number, got 2.5"),
    ('{"max_steps": true}', "max_steps in {path} must be a whole number, got true"),
    ('{"fast": 1}', "fast in {path} must be true or false, got 1"),
    ('{"out_dir": null}', "out_dir in {path} must be a string, got null"),
    ('{"max_steps": 0}', "max_steps in {path} must be at least 1, got 0"),
    ('{"nope": 1}', "{path} sets unknown option(s) nope"),
])
def test_a_bad_config_file_is_one_line_naming_the_key_and_the_file(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        parse_config(Config, ["--config", str(path)])
    assert str(e.value).startswith(message.format(path=path))


def test_config_values_are_checked_as_flags_are(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"lr": 1, "max_steps": 0}')
    cfg = parse_config(Config, ["--config", str(path), "--max-steps", "2"])  # the flag wins
    assert cfg == Config(lr=1.0, max_steps=2) and type(cfg.lr) is float
    with pytest.raises(UsageError, match="--max-steps must be at least 1, got 0"):
        parse_config(Config, ["--max-steps", "0"])
    with pytest.raises(UsageError, match="--lr must be positive, got -0.1"):
        parse_config(Config, ["--lr", "-0.1"])


def test_a_size_of_zero_is_refused_with_one_line(synthetic_rollouts, tmp_path):
    r = run_script("train_vae.py", "--latent-size", "0", "--data-dir", str(synthetic_rollouts),  # an empty z
                   "--ckpt-dir", str(tmp_path / "ckpt"))
    assert error_line(r) == "error: --latent-size must be at least 1, got 0"
    r = run_script("-m", "bench.speed", "env", "--steps", "0")  # argparse's error: usage, then the line
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "python -m bench.speed: error: --steps must be at least 1, got 0"


def test_every_number_option_of_every_script_has_a_range():
    import collect_rollouts, evaluate, train_controller, train_mdnrnn, train_vae
    from bench import speed as bench
    from experiments import compare_ppo, compare_vae, train_ppo
    from tools import curves, probe

    own = {"action_repeat", "log_std_init", "test_episodes"}  # checked by the script itself; any number
    for script in (collect_rollouts, train_vae, train_mdnrnn, train_controller, evaluate, train_ppo, compare_ppo,
                   compare_vae, probe, curves):
        hints = get_type_hints(script.Config)
        numbers = {f.name for f in fields(script.Config) if hints[f.name] in (int, float)}
        assert numbers - own <= set(script.Config.RANGES), (script.__name__, numbers - own - set(script.Config.RANGES))
        assert set(script.Config.RANGES) <= numbers, script.__name__  # a range of a field that is gone
        assert parse_config(script.Config, []) == script.Config()  # the defaults are in range
    for name, (_, flags) in bench.BENCHES.items():
        unranged = [flag for flag, kind, _, rule in flags if kind in (int, float) and rule is None]
        assert not unranged, (name, unranged)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.txt"
    write_atomically(path, lambda tmp: tmp.write_text("old"))

    def half_then(error):
        def write(tmp):
            tmp.write_text("ha")
            raise error
        return write

    # A full disk becomes one line (UsageError); a Ctrl-C stays a Ctrl-C.
    for error, raised in ((OSError(28, "No space left on device"), UsageError),
                          (KeyboardInterrupt(), KeyboardInterrupt)):
        with pytest.raises(raised):
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


def test_link_is_relative_keeps_what_is_there_and_replaces_a_dangling_link(tmp_path):
    from wm.files import link

    models, run = tmp_path / "models", tmp_path / "runs" / "a"
    models.mkdir()
    run.mkdir(parents=True)
    (models / "vae.pt").write_text("v1")
    link(models / "vae.pt", run)
    assert os.readlink(run / "vae.pt") == "../../models/vae.pt" and (run / "vae.pt").read_text() == "v1"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "vae.pt").write_text("v2")
    link(tmp_path / "elsewhere" / "vae.pt", run)  # a live link stays
    assert (run / "vae.pt").read_text() == "v1"
    (models / "vae.pt").rename(models / "moved.pt")  # now it dangles
    link(tmp_path / "elsewhere" / "vae.pt", run)
    assert os.readlink(run / "vae.pt") == "../../elsewhere/vae.pt" and (run / "vae.pt").read_text() == "v2"
