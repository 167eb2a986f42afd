"""wm/search.py: CMA-ES's resume state in plain arrays, replayed exactly;
a file that tries to run code."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import write_tiny_world_model

import train_controller
from train_controller import Config
from wm.cli import UsageError
from wm.search import BadState, Search


def sphere(x: np.ndarray) -> float:
    return float(np.sum((x - 1) ** 2))


def drive(search: Search, generations: range, path=None, stop_at=()):
    """Run the search, saved and loaded again before each generation in
    `stop_at` (a resume); -> the members asked each generation."""
    asked = []
    for g in generations:
        if g in stop_at:
            search.save(path, {"generation": g})
            np.random.seed(12345)  # whatever the process did meanwhile
            search, info = Search.load(path, progress=False)
            assert info == {"generation": g} and search.generation == g
        if g == 4:
            search.set_sigma(0.6)
        if g == 7:
            search.resize(6, seed=9)
        xs = search.ask()
        asked.append(np.array(xs))
        search.tell(xs, [sphere(x) for x in xs])
    return asked, search


def test_a_resumed_search_proposes_exactly_what_the_uninterrupted_one_does(tmp_path):
    straight, a = drive(Search.start(np.zeros(30), 0.3, 8, seed=1), range(12))
    resumed, b = drive(Search.start(np.zeros(30), 0.3, 8, seed=1), range(12), tmp_path / "es.npz",
                       stop_at=(3, 4, 7, 10))
    assert [len(x) for x in straight] == [8] * 7 + [6] * 5
    for x, y in zip(straight, resumed):
        np.testing.assert_array_equal(x, y)  # to the last bit, across a step-size reset and a new population
    np.testing.assert_array_equal(a.es.mean, b.es.mean)
    assert a.es.sigma == b.es.sigma and a.es.countiter == b.es.countiter
    # A state is plain arrays: it loads with allow_pickle=False, and is small.
    with np.load(tmp_path / "es.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)
    assert (tmp_path / "es.npz").stat().st_size < 100_000



class RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_state_file_never_runs_code_and_a_foreign_one_is_one_line(tmp_path):
    write_tiny_world_model(tmp_path)
    marker = tmp_path / "ran"
    RunsCode.marker = marker
    path = tmp_path / "controller_es.npz"
    with open(path, "wb") as f:
        np.savez(f, meta=np.array([RunsCode()], dtype=object))
    with pytest.raises(BadState, match="not a readable CMA-ES state"):
        Search.load(path)
    with pytest.raises(UsageError, match="not a readable CMA-ES state.*pass --restart"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4))
    assert not marker.exists()
    # A plain file of another kind, and a state without train_controller.py's record.
    with open(path, "wb") as f:
        np.savez(f, meta=np.array('{"format": 1, "stretches": []}'))
    with pytest.raises(UsageError, match="not a CMA-ES state of this repository"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4))
    Search.start(np.zeros(75), 0.1, 4, 1).save(path, {"generation": 1})
    with pytest.raises(UsageError, match="not a CMA-ES state of train_controller.py"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4))
    # A list where the record should be, and a state with an array cut out of it.
    with open(path, "wb") as f:
        np.savez(f, meta=np.array("[1, 2]"))
    with pytest.raises(UsageError, match="pass --restart"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4))
    Search.start(np.zeros(75), 0.1, 4, 1).save(path, {"generation": 1})
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if not k.endswith("_x0")}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(UsageError, match="not a whole CMA-ES state.*pass --restart"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4))


def test_each_sees_every_replayed_generation_and_its_errors_are_its_own(tmp_path):
    asked, search = drive(Search.start(np.zeros(10), 0.3, 8, seed=1), range(9))
    search.save(tmp_path / "es.npz", {"generation": 9})
    seen = []

    def each(s):
        seen.append((s.generation, s.es.mean.copy()))

    Search.load(tmp_path / "es.npz", progress=False, each=each)
    assert [g for g, _ in seen] == list(range(1, 10))  # across the new population of generation 8
    np.testing.assert_array_equal(seen[-1][1], search.es.mean)
    # Where the search stood after generation 3: the same as a search told 3 generations.
    _, three = drive(Search.start(np.zeros(10), 0.3, 8, seed=1), range(3))
    np.testing.assert_array_equal(seen[2][1], three.es.mean)

    def broken(s):
        raise KeyError("the caller's own bug")

    with pytest.raises(KeyError, match="the caller's own bug"):  # not reported as a damaged state
        Search.load(tmp_path / "es.npz", progress=False, each=broken)
