"""Shared fixtures: small synthetic data where the environment is not the point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # no display in CI
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

from wm.rollouts import rollout_path, write_rollout  # noqa: E402


def make_synthetic_rollouts(out_dir: Path, n: int = 3, steps: int = 40, seed: int = 0,
                            action_repeat: int = 1, view: str = "full") -> list[Path]:
    """Rollouts of the real schema with smooth random frames (not the game)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, size=(1, 64, 64, 3))
        drift = rng.integers(-3, 4, size=(steps, 1, 1, 3)).cumsum(0)
        obs = np.clip(base + drift, 0, 255).astype(np.uint8)
        done = np.zeros(steps, bool)
        done[-1] = True
        path = rollout_path(out_dir, seed + i)
        k = {"action_repeat": np.array(action_repeat), "view": np.array(view)}  # as collected
        write_rollout(path, observations=obs,
                      actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                      rewards=rng.normal(size=steps).astype(np.float32),
                      terminated=done, truncated=np.zeros(steps, bool), **k)
        paths.append(path)
    return paths


@pytest.fixture
def synthetic_rollouts(tmp_path) -> Path:
    """A folder of 3 small synthetic rollouts (40 frames each)."""
    d = tmp_path / "rollouts"
    make_synthetic_rollouts(d)
    return d


def run_script(*args: str, timeout: float = 300, cwd: Path = ROOT):
    """Run a repository script as a user would, return the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, *args], cwd=cwd, env=_script_env(), capture_output=True,
                          text=True, timeout=timeout)


def error_line(result) -> str:
    """The line a script that refused to run printed, after checking that it
    printed that line alone (no traceback) and exited with status 2."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def default_sigint() -> None:
    """Popen's preexec_fn for a script a test may interrupt: a job that a shell
    starts in the background inherits Ctrl-C ignored, and Python then never
    raises KeyboardInterrupt. Give the child the default back."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(*args: str, cwd: Path = ROOT, env: dict | None = None):
    """Start a repository script as run_script does, with `env` added to its
    environment, without waiting for it: the Popen's communicate() gives its
    (stdout, stderr)."""
    import subprocess

    return subprocess.Popen([sys.executable, *args], cwd=cwd, env={**_script_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def pool_workers(pid: int) -> list[int]:
    """The pids of the local pool's workers (wm/pool.py) that process `pid` started."""
    import subprocess

    children = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                              text=True).stdout.splitlines()
    return [int(c.split()[0]) for c in children if "spawn_main" in c]


def _script_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class FakeClock:
    """Stands in for a bench's timers (time.perf_counter and time.process_time)
    and moves only when timed work runs: `charge(fn, seconds)` is `fn` costing
    `seconds(*args)` a call. A bench's rates can then be checked against the
    work done and the seconds it should have been divided by."""

    def __init__(self, monkeypatch):
        import time

        self.now = 0.0
        for name in ("perf_counter", "process_time"):
            monkeypatch.setattr(time, name, lambda: self.now)

    def charge(self, fn, seconds):
        def timed(*args, **kwargs):
            self.now += seconds(*args, **kwargs)
            return fn(*args, **kwargs)

        return timed


def write_tiny_vae(ckpt_dir: Path, latent_size: int = 8, seed: int = 0, view: str = "full") -> Path:
    """An untrained V saved as `ckpt_dir/vae.pt`, in the real checkpoint format."""
    import torch
    from dataclasses import asdict

    from models import ConvVAE, VAEConfig
    from wm.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    cfg = VAEConfig(latent_size=latent_size, view=view)
    path = Path(ckpt_dir) / "vae.pt"
    save_checkpoint(path, {"kind": "vae", "model": ConvVAE(cfg).state_dict(),
                           "model_args": asdict(cfg), "config": {}, "epoch": 0})
    return path


def write_tiny_world_model(ckpt_dir: Path, latent_size: int = 8, hidden_size: int = 16,
                           seed: int = 0, action_repeat: int = 1, view: str = "full") -> tuple[Path, Path]:
    """An untrained, matched (V, M) pair: `ckpt_dir/vae.pt` and `ckpt_dir/mdnrnn.pt`,
    loadable with `wm.latents.load_world_model(ckpt_dir)`."""
    import torch
    from dataclasses import asdict

    from models import MDNRNN, MDNRNNConfig
    from wm.checkpoint import load_checkpoint, save_checkpoint

    vae_path = write_tiny_vae(ckpt_dir, latent_size, seed, view)
    torch.manual_seed(seed)
    cfg = MDNRNNConfig(latent_size=latent_size, hidden_size=hidden_size, n_gaussians=2,
                       action_repeat=action_repeat)
    path = Path(ckpt_dir) / "mdnrnn.pt"
    save_checkpoint(path, {"kind": "mdnrnn", "model": MDNRNN(cfg).state_dict(),
                           "model_args": asdict(cfg), "config": {}, "epoch": 0,
                           "vae_fingerprint": load_checkpoint(vae_path, "vae")["fingerprint"]})
    return vae_path, path


def write_tiny_controller(ckpt_dir: Path, features: str = "zh", seed: int = 0,
                          action_repeat: int = 1) -> Path:
    """A random C saved as `ckpt_dir/controller.pt` for the V and M already in
    `ckpt_dir` (see write_tiny_world_model), as train_controller.py writes it."""
    import torch
    from dataclasses import asdict

    from models.controller import Controller, ControllerConfig
    from wm.agent import load_models
    from wm.checkpoint import save_checkpoint

    vae, mdnrnn, fingerprints = load_models(ckpt_dir, with_m=features == "zh")
    torch.manual_seed(seed)
    cfg = ControllerConfig(latent_size=vae.cfg.latent_size, features=features,
                           hidden_size=mdnrnn.cfg.hidden_size if mdnrnn is not None else 0)
    controller = Controller(cfg)
    path = Path(ckpt_dir) / "controller.pt"
    save_checkpoint(path, {"kind": "controller", "model": controller.state_dict(),
                           "model_args": asdict(cfg), "config": {}, "generation": 0,
                           "held_out": 0.0, "held_out_std": 0.0, "action_repeat": action_repeat,
                           **fingerprints})
    return path
