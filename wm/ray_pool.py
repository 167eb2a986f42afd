"""The worker pool on Ray's actors, for `--backend ray`: wm.pool.WorkerPool's
interface, so that a script runs the same workers on a Ray cluster.

    with RayPool(4, EpisodeRunner, spec, address="auto") as pool:
        results = pool.map([(params, seeds), ...])   # in task order

Each actor builds `factory(*args)` once when it starts (wm.pool.start_runner,
as a local worker does) and runs `runner(*task)` for every task it is sent, so
the same tasks give the same results on either backend.

An actor whose process dies (killed, out of memory, its machine lost) is
restarted by Ray, which builds the runner again and reruns the task it was
running (`max_restarts`, `max_task_retries`): the caller loses nothing and
sees nothing. An actor that dies more than `restarts` times ends `map` with
a WorkerError, and one that raises with a WorkerError that carries its
traceback, as the local pool does: neither hangs.

Ray is imported here and nowhere else: wm.pool.make_pool imports this module
only for `--backend ray`.
"""

from __future__ import annotations

import os
import re
import time
import traceback
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from wm.pool import Pool, WorkerError, inject_fault, start_runner


@ray.remote
class _Actor:
    def __init__(self, factory: Callable, args: tuple, fault: str | None):
        # A failure is kept, not raised, so that the pool reports it with its
        # traceback (a UsageError, being a SystemExit, would end the actor silently).
        self.fault, self.runner, self.error = fault, None, None
        # Asked only under a fault: Ray warns that the property is deprecated.
        self.restarted = bool(fault) and ray.get_runtime_context().was_current_actor_reconstructed
        try:
            self.runner = start_runner(factory, args)
        except BaseException:
            self.error = traceback.format_exc()

    def ready(self) -> str | None:
        return self.error

    def run(self, task: tuple):
        inject_fault(self.fault, self.restarted)
        if self.runner is None:
            raise RuntimeError(f"the actor failed to start again after a restart:\n{self.error}")
        return self.runner(*task)

    def cpu_seconds(self) -> float:
        return time.process_time()


class RayPool(Pool):
    def __init__(self, n_workers: int, factory: Callable, *args: Any, address: str = "",
                 restarts: int = 3, start_timeout: float = 300.0):
        """Start `n_workers` actors, one CPU each, each running `factory(*args)`
        once. `address`: empty joins the Ray instance running on this machine
        or starts one, `auto` joins a running cluster, or `host:port`; a Ray
        already initialised in this process is used as it is (and left running).
        Each actor is restarted at most `restarts` times."""
        if n_workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {n_workers}")
        self.restarts, self.actors, self.running = restarts, [], {}
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            try:
                ray.init(address=address or None)
            except ConnectionError as e:
                raise WorkerError(f"cannot join the Ray cluster at --ray-address {address} ({e}); start "
                                  f"one with `ray start --head`, or leave --ray-address empty to start "
                                  f"one on this machine") from None
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            if n_workers > cpus:
                raise WorkerError(f"{n_workers} Ray actors need a CPU each and the Ray cluster has {cpus:g}; "
                                  f"ask for fewer workers, or add machines (ray start --address=...)")
            # WM_FAULT travels as an argument: an actor's environment is its node's, not ours.
            actor = _Actor.options(num_cpus=1, max_restarts=restarts, max_task_retries=restarts)
            self.actors = [actor.remote(factory, args, os.environ.get("WM_FAULT")) for _ in range(n_workers)]
            try:
                errors = ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout)
            except GetTimeoutError:
                raise WorkerError(f"not every Ray actor started within {start_timeout:.0f} s") from None
            except RayActorError as e:
                raise WorkerError(f"a Ray actor died while starting:\n{e}") from None
            for i, error in enumerate(errors):
                if error is not None:
                    raise WorkerError(f"actor {i} failed while starting:\n{error.rstrip()}")
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def _send(self, i: int, task: tuple[int, tuple]) -> None:
        index, task_args = task
        self.running[self.actors[i].run.remote(task_args)] = i, index

    def _results(self, busy: set[int]):
        [ref], _ = ray.wait(list(self.running), num_returns=1)
        i, index = self.running.pop(ref)
        return [(i, (index, self._get(ref, i)))]

    def _get(self, ref, i: int):
        try:
            return ray.get(ref)
        except RayTaskError as e:
            # Ray's message: the actor's pid and address, then its traceback.
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).rstrip()  # without terminal colours
            raise WorkerError(f"actor {i} failed while running a task:\n{message}") from None
        except RayActorError as e:
            raise WorkerError(f"actor {i} died while running a task and Ray could not run it again (it "
                              f"restarts an actor {self.restarts} times at most); out of memory, a crash in "
                              f"the environment, or its machine lost?\n{e}") from None

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the actor processes so far."""
        return sum(ray.get([a.cpu_seconds.remote() for a in self.actors]))

    def close(self) -> None:
        """Kill the actors (waiting a little for the tasks they were running
        to end), then stop Ray if this pool started it."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.running:
            ray.wait(list(self.running), num_returns=len(self.running), timeout=10)
        self.actors, self.running = [], {}
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False
