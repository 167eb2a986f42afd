"""A persistent pool of worker processes that never hangs on a dead worker.

    with WorkerPool(4, EpisodeRunner, spec) as pool:
        results = pool.map([(params, seeds), ...])   # in task order

Each worker calls `factory(*args)` once when it starts (load the networks,
make the environment) and then runs `runner(*task)` for every task it is
sent. Only the task tuples travel to the workers and only the results come
back.

Why not multiprocessing.Pool: a worker that dies there (out of memory, a
segfault in Box2D) leaves the caller waiting forever, which is how the
best-known PyTorch World Models hangs (ctallec/world-models #37, #43). Here
the main process waits on the workers' pipes *and* their process sentinels at
once, so a worker that raises comes back as a WorkerError carrying its
traceback, and a worker that dies as a WorkerError with its exit code, both
as soon as it happens. Workers ignore Ctrl-C; the main process gets it and
stops them all on the way out of the `with` block. A worker whose main process
is gone (killed with kill -9) exits at once, quietly, rather than finish its
task and then fail to send the result.

Set WM_FAULT=raise (or exit) in the environment to make every worker fail on
its first task: the tests use it to check the two paths above end to end.

`make_pool(backend, ...)` builds this pool (`--backend local`) or its twin on
Ray's actors (`--backend ray`, wm/ray_pool.py); both are a `Pool`, and only
the latter imports Ray.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

from wm.cli import UsageError, fail

BACKENDS = ("local", "ray")


class WorkerError(RuntimeError):
    """A worker raised (the message holds its traceback) or died."""


def start_runner(factory: Callable, args: tuple):
    """A worker's runner, `factory(*args)`, built as every backend builds it."""
    # One process per core: threads would only fight (half the time spent in
    # the kernel, a driving C's laps several times slower).
    torch = sys.modules.get("torch")  # loaded with a factory that needs it
    if torch is not None:
        torch.set_num_threads(1)
    else:  # a runner that imports torch later (a rollout collector's driver) reads this then
        os.environ["OMP_NUM_THREADS"] = "1"
    return factory(*args)


def inject_fault(fault: str | None, restarted: bool = False) -> None:
    """WM_FAULT, for the tests: raise, exit, or exit-once (exit, but not
    once Ray has restarted the actor; a local worker is never restarted)."""
    if fault == "raise":
        raise RuntimeError("injected fault (WM_FAULT=raise)")
    if fault == "exit" or (fault == "exit-once" and not restarted):
        os._exit(3)


def _exit_with_parent() -> None:
    mp.parent_process().join()  # returns once the parent is gone (its end of a pipe closed)
    os._exit(0)


def _worker_main(conn, factory: Callable, args: tuple) -> None:
    # The parent handles Ctrl-C and then stops us; a KeyboardInterrupt
    # traceback from every worker would only bury the one line that matters.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        runner = start_runner(factory, args)
        conn.send(("ready", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    fault = os.environ.get("WM_FAULT")
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        index, task_args = task
        try:
            inject_fault(fault)
            conn.send(("ok", (index, runner(*task_args))))
        except UsageError as e:  # a full disk, say: its one line, not a traceback
            conn.send(("usage", e.message))
            return
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            return


class Pool:
    """What every backend's pool shares: `len(pool)` workers, `map`, `close`
    and the `with` block. A backend sends a task to a worker (`_send`) and
    waits for busy workers' results (`_results`)."""

    def map(self, tasks: Sequence[tuple], on_result: Callable[[int, Any], Any] | None = None) -> list:
        """Run each task tuple as `runner(*task)` on some worker; results in
        task order. `on_result(index, result)` is called as each one comes in."""
        results: list = [None] * len(tasks)
        todo = list(enumerate(tasks))[::-1]
        busy: set[int] = set()
        while todo or busy:
            for i in range(len(self)):
                if i not in busy and todo:
                    self._send(i, todo.pop())
                    busy.add(i)
            for i, (index, result) in self._results(busy):
                results[index] = result
                busy.discard(i)
                if on_result is not None:
                    on_result(index, result)
        return results

    def __len__(self) -> int:
        raise NotImplementedError

    def _send(self, i: int, task: tuple[int, tuple]) -> None:
        """Send (task index, task) to worker i."""
        raise NotImplementedError

    def _results(self, busy: set[int]) -> list[tuple[int, tuple[int, Any]]]:
        """[(worker, (task index, result))] for one or more of the busy workers."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WorkerPool(Pool):
    def __init__(self, n_workers: int, factory: Callable, *args: Any,
                 start_timeout: float = 300.0):
        """Start `n_workers` processes, each running `factory(*args)` once.

        `factory` must be importable by name (a module-level class or function):
        workers are spawned, not forked, so no torch or Box2D state is shared.
        """
        if n_workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {n_workers}")
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            for _ in range(n_workers):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, args=(child, factory, args), daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
            pending = set(range(n_workers))
            while pending:
                for i, msg in self._wait(pending, start_timeout, "while starting"):
                    pending.discard(i)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.procs)

    def _results(self, busy: set[int]):
        return self._wait(busy, None, "while running a task")

    def _send(self, i: int, task: tuple) -> None:
        try:
            self.conns[i].send(task)
        except OSError:  # a broken pipe: the worker is gone
            self.procs[i].join(1)
            raise WorkerError(f"worker {i} died (exit code {self.procs[i].exitcode}) "
                              f"before it was sent a task") from None

    def _wait(self, workers: set[int], timeout: float | None, doing: str):
        """[(worker, payload)] for the workers in `workers` that answered;
        raise WorkerError as soon as one of them reports an error or dies."""
        handles = {self.conns[i]: i for i in workers}
        handles.update({self.procs[i].sentinel: i for i in workers})
        ready = wait(list(handles), timeout)
        if not ready:
            raise WorkerError(f"no worker answered within {timeout:.0f} s {doing}")
        out = []
        for i in sorted({handles[h] for h in ready}):
            # A worker that sent its last words and exited fires both handles;
            # read the pipe first so the words are not lost.
            try:
                kind, payload = self.conns[i].recv() if self.conns[i].poll() else ("died", None)
            except EOFError:
                kind, payload = "died", None
            if kind == "usage":
                raise fail(payload)
            if kind == "error":
                raise WorkerError(f"worker {i} failed {doing}:\n{payload.rstrip()}")
            if kind == "died":
                self.procs[i].join(1)
                raise WorkerError(f"worker {i} died {doing} (exit code {self.procs[i].exitcode}); "
                                  f"out of memory, or a crash in the environment?")
            out.append((i, payload))
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the worker processes so far (Linux /proc)."""
        ticks = 0
        for p in self.procs:
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        """Stop the workers: ask politely, then terminate, then kill."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(0.5)
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


def check_backend(backend: str, ray_address: str = "") -> None:
    """One line for a backend that is not one, or that is not installed."""
    if backend not in BACKENDS:
        raise fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise fail("--backend ray needs Ray, which is not installed: pip install ray==2.60.0")
    if ray_address and backend != "ray":
        raise fail(f"--ray-address {ray_address} goes with --backend ray")


def make_pool(backend: str, n_workers: int, factory: Callable, *args: Any, ray_address: str = "") -> Pool:
    """A WorkerPool (`local`) or a RayPool (`ray`, on the Ray instance at
    `ray_address`, see wm/ray_pool.py) of `n_workers` running `factory(*args)`."""
    check_backend(backend, ray_address)
    if backend == "local":
        return WorkerPool(n_workers, factory, *args)
    from wm.ray_pool import RayPool  # here only: the local backend never imports Ray

    return RayPool(n_workers, factory, *args, address=ray_address)
