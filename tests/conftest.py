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


def make_synthetic_rollouts(out_dir: Path, n: int = 3, steps: int = 40, seed: int = 0) -> list[Path]:
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
        write_rollout(path, observations=obs,
                      actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                      rewards=rng.normal(size=steps).astype(np.float32),
                      terminated=done, truncated=np.zeros(steps, bool))
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

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
