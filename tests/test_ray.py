"""The Ray backend (wm/ray_pool.py): the local workers' fitness, a dead actor
that costs nothing, a failing one that is one clear error, and a local
backend that never loads Ray."""

from __future__ import annotations

import re
import signal
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import ray
from conftest import run_script, write_tiny_world_model

import collect_rollouts
import evaluate
import train_controller
from wm.agent import AgentSpec, EpisodeRunner
from wm.cli import UsageError
from wm.pool import WorkerError
from wm.ray_pool import RayPool

# Members far apart (sigma0 1), so that their fitness differs and a member
# scored on the wrong track or with the wrong weights would show.
GENERATION = dict(pop_size=4, rollouts_per_member=1, generations=1, max_steps=30, workers=2,
                  eval_episodes=1, sigma0=1.0)


@pytest.fixture(scope="module")
def local_ray() -> str:
    """One small local Ray instance for the whole file (starting one takes
    seconds); its address, for scripts to join."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray")
    write_tiny_world_model(path)
    return path


def one_generation(ckpt_dir, **flags) -> dict:
    """Generation 1 of train_controller.main: each member's fitness, in rank
    order, which member has each, and the CMA-ES mean's held-out score."""
    state = train_controller.main(train_controller.Config(ckpt_dir=str(ckpt_dir), restart=True,
                                                          **GENERATION, **flags))
    es = state["es"]
    return {"fitness": np.asarray(es.fit.fit).tolist(), "members": np.asarray(es.fit.idx).tolist(),
            "held_out": state["best_held_out"]}


@pytest.fixture(scope="module")
def local_generation(world_model):
    return one_generation(world_model, backend="local")


# Far above a healthy run's time, so that only a real hang trips it: beside
# a training run that held both cores, a healthy one took over 120 s.
HANG_S = 300


@contextmanager
def no_hang(seconds: int):
    """A pool that hangs would hang the suite too: an alarm turns it into a failure."""
    def hung(*_):
        raise TimeoutError("the pool hung on a failed actor")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_one_generation_on_ray_gives_the_local_fitness(local_ray, world_model, local_generation):
    assert len(set(local_generation["fitness"])) > 1  # members that differ: the comparison says something
    assert one_generation(world_model, backend="ray") == local_generation


def test_results_come_in_task_order_as_one_process_gives_them(local_ray):
    spec = AgentSpec(max_steps=20)  # the random agent, seeded by the track
    expected = EpisodeRunner(spec)(None, [4, 5, 6])
    with RayPool(2, EpisodeRunner, spec) as pool:
        # The first task drives three episodes: the two short ones come back before it.
        assert pool.map([(None, [4, 5, 6]), (None, [4]), (None, [5])]) == [expected, expected[:1], expected[1:2]]


def test_an_actor_killed_mid_generation_loses_nothing(local_ray, world_model, local_generation, monkeypatch):
    # Every actor's first life exits in the middle of its first task.
    monkeypatch.setenv("WM_FAULT", "exit-once")
    with no_hang(HANG_S):
        # Without restarts the fault ends the map: it does fire.
        with RayPool(1, EpisodeRunner, AgentSpec(max_steps=5), restarts=0) as pool:
            with pytest.raises(WorkerError, match="actor 0 died while running a task"):
                pool.map([(None, [0])])
        # With them, Ray restarts the actors and reruns their tasks: the same generation.
        assert one_generation(world_model, backend="ray") == local_generation


def test_an_actor_that_raises_is_one_clear_error(local_ray, world_model, monkeypatch, tmp_path):
    with no_hang(HANG_S):
        with pytest.raises(WorkerError, match="actor 0 failed while starting(.|\n)*vae.pt not found"):
            RayPool(1, EpisodeRunner, AgentSpec(ckpt_dir=str(tmp_path), controller={"features": "z"}))
        monkeypatch.setenv("WM_FAULT", "raise")
        with pytest.raises(UsageError, match=r"actor \d failed while running a task:\n.*pid=\d+(.|\n)*"
                                             r"in run\n(.|\n)*RuntimeError: injected fault"):
            one_generation(world_model, backend="ray")


def test_the_local_backend_never_imports_ray(tmp_path):
    code = f"""
import sys
import collect_rollouts, evaluate, train_controller
from bench import speed as bench
train_controller.main(train_controller.Config(ckpt_dir={str(tmp_path)!r}, pop_size=2,
    rollouts_per_member=1, generations=1, max_steps=5, workers=1, eval_episodes=1))
collect_rollouts.main(collect_rollouts.Config(rollouts=1, max_steps=5, workers=1, out_dir={str(tmp_path / 'r')!r}))
print("ray loaded:", "ray" in sys.modules)
"""
    write_tiny_world_model(tmp_path)
    r = run_script("-c", code)
    assert r.returncode == 0, r.stderr
    assert "generation 1  mean" in r.stdout and "rollouts 1" in r.stdout  # both ran, on their workers
    assert "ray loaded: False" in r.stdout


@pytest.mark.parametrize("script", [train_controller, evaluate, collect_rollouts])
def test_backend_flags_get_one_line_errors(script, tmp_path, monkeypatch):
    def run(**flags):
        with pytest.raises(UsageError) as e:
            script.main(script.Config(**{"ckpt_dir" if script is not collect_rollouts else "out_dir": str(tmp_path)},
                                      **flags))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert run(backend="spark") == "--backend must be one of local, ray, got 'spark'"
    assert run(ray_address="auto") == "--ray-address auto goes with --backend ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert "pip install ray" in run(backend="ray")


def test_train_controller_prints_the_same_generation_on_ray_as_locally(local_ray, tmp_path):
    """What a user runs: the command line, each backend in its own
    process, the Ray one joining this file's Ray instance."""
    lines = {}
    for backend, flags in (("local", []), ("ray", ["--ray-address", local_ray])):
        write_tiny_world_model(tmp_path / backend)
        r = run_script("train_controller.py", "--backend", backend, *flags, "--ckpt-dir", str(tmp_path / backend),
                       "--pop-size", "4", "--rollouts-per-member", "1", "--generations", "1",
                       "--max-steps", "30", "--workers", "2", "--eval-episodes", "1", "--sigma0", "1",
                       timeout=240)
        assert r.returncode == 0, r.stderr
        [line] = [line for line in r.stdout.splitlines() if line.startswith("generation 1 ")]
        lines[backend] = re.sub(r"\s+\d+ steps/s.*", "", line)  # the speed and the time may differ
    assert "held-out" in lines["local"]
    assert lines["ray"] == lines["local"]
