"""CMA-ES (pycma) with a resume state of plain numbers and arrays.

pycma's own state is an object: pickled, it costs 13 MB for C's 867
weights (a covariance and its eigenvectors, 6 MB each), and loading a
pickle runs whatever code the file names. But pycma is deterministic given
where a search started and what it was told, since its samples come from
numpy's global generator. So the state kept here is that, per stretch of
the search (a fresh start, or a new population on a resume): its start
(mean, step size, population, pycma's seed, numpy's generator), the step
sizes set by hand and when, and every value told for every member since.
Loading replays each generation's ask and tell, and the resumed search
proposes exactly what the uninterrupted one would have. The file is an
.npz of arrays plus one JSON string, read with allow_pickle=False, a few
hundred KB after hundreds of generations.

"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import cma
import numpy as np
from tqdm import tqdm

from wm.files import write_atomically
from wm.rollouts import NPZ_ERRORS


class BadState(ValueError):
    pass


def _rng_state() -> tuple[np.ndarray, dict]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return keys.copy(), {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_rng_state(keys: np.ndarray, numbers: dict) -> None:
    np.random.set_state(("MT19937", keys, numbers["pos"], numbers["has_gauss"], numbers["cached_gaussian"]))


def _new_es(mean: np.ndarray, sigma: float, popsize: int, seed: int) -> cma.CMAEvolutionStrategy:
    return cma.CMAEvolutionStrategy(mean, sigma, {"popsize": popsize, "seed": seed, "verbose": -9})


class Search:
    """pycma's search (`self.es`, to read: mean, sigma, result) with ask,
    tell and the two changes a resume may make, each recorded so that a
    replay repeats it: a step size set by hand and a new population."""

    def __init__(self):
        self.stretches: list[dict] = []  # {"meta": JSON-able, "arrays": {name: ndarray}, "told": [values]}
        self.es: cma.CMAEvolutionStrategy | None = None

    @property
    def generation(self) -> int:
        return sum(len(s["told"]) for s in self.stretches)

    @classmethod
    def start(cls, x0: np.ndarray, sigma0: float, popsize: int, seed: int) -> "Search":
        search = cls()
        search._begin(np.asarray(x0, dtype=float), sigma0, popsize, seed)
        return search

    def _begin(self, mean: np.ndarray, sigma: float, popsize: int, seed: int,
               rng: tuple[np.ndarray, dict] | None = None) -> None:
        """A new stretch: a fresh pycma search at `mean`, drawing from numpy's
        generator as `rng` has it (keys, numbers), else as pycma's seed left it."""
        self.es = _new_es(mean, sigma, popsize, seed)
        meta = {"popsize": popsize, "seed": seed, "sigma0": float(sigma), "sigma_set": []}
        arrays = {"x0": mean.copy()}
        if rng is not None:
            _set_rng_state(*rng)
        arrays["rng_keys"], meta["rng"] = _rng_state()
        self.stretches.append({"meta": meta, "arrays": arrays, "told": []})

    def ask(self) -> list[np.ndarray]:
        """The next generation's members."""
        return self._ask()

    def _ask(self) -> list[np.ndarray]:  # also the replay's, which a caller watching `ask` does not see
        sigma_set = dict(self.stretches[-1]["meta"]["sigma_set"])
        told = len(self.stretches[-1]["told"])
        if told in sigma_set:  # replaying: the step size set by hand before this generation
            self.es.sigma = sigma_set[told]
        return self.es.ask()

    def tell(self, solutions: list[np.ndarray], values) -> None:
        values = [float(v) for v in values]
        self.es.tell(solutions, values)
        self.stretches[-1]["told"].append(values)

    def set_sigma(self, sigma: float) -> None:
        self.stretches[-1]["meta"]["sigma_set"].append([len(self.stretches[-1]["told"]), float(sigma)])
        self.es.sigma = sigma

    def resize(self, popsize: int, seed: int) -> None:
        """Go on with another population: a new search at this one's mean and
        step size, its covariance and evolution paths afresh. Little is lost:
        pycma adapts the covariance of C's hundreds of weights at a rate of
        about 2/n^2 a generation."""
        self._begin(self.es.mean.copy(), float(self.es.sigma), popsize, seed)

    # --- the file ---------------------------------------------------------------

    def save(self, path: str | os.PathLike, info: dict[str, Any]) -> None:
        """Write the stretches and the caller's `info` (JSON-able) atomically."""
        arrays = {}
        for i, s in enumerate(self.stretches):
            for name, a in s["arrays"].items():
                arrays[f"s{i}_{name}"] = a
            arrays[f"s{i}_told"] = np.array(s["told"], dtype=np.float64).reshape(-1, s["meta"]["popsize"])
        meta = {"format": 1, "stretches": [s["meta"] for s in self.stretches], "info": info}
        arrays["meta"] = np.array(json.dumps(meta))
        write_atomically(path, lambda tmp: _save_npz_to(tmp, arrays))

    @classmethod
    def load(cls, path: str | os.PathLike, progress: bool = True,
             each: Callable[["Search"], None] | None = None) -> tuple["Search", dict]:
        """Replay a saved search -> (the search, the caller's info); BadState
        if the file is unreadable or not such a state. `each` is called with
        the search after each generation's tell, to read where it stood then."""
        try:
            with np.load(path, allow_pickle=False) as f:
                files = {k: f[k] for k in f.files}
            meta = json.loads(str(files["meta"]))
            stretches = [{"meta": m, "arrays": {name[len(f"s{i}_"):]: a for name, a in files.items()
                                                if name.startswith(f"s{i}_") and name != f"s{i}_told"},
                          "told": files[f"s{i}_told"]} for i, m in enumerate(meta["stretches"])]
        except (*NPZ_ERRORS, json.JSONDecodeError, TypeError) as e:
            raise BadState(f"{path} is not a readable CMA-ES state ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != 1 or not stretches:
            raise BadState(f"{path} is not a CMA-ES state of this repository")
        search = cls()
        total = sum(len(s["told"]) for s in stretches)
        if "info" not in meta:
            raise BadState(f"{path} is not a whole CMA-ES state (no info)")
        replay = search._replay(stretches)
        with tqdm(total=total, desc="replaying CMA-ES", unit="gen", leave=False, disable=not progress) as bar:
            while True:
                try:
                    if next(replay, None) is None:
                        break
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a damaged or foreign state
                    raise BadState(f"{path} is not a whole CMA-ES state ({type(e).__name__}: {e})") from None
                if each is not None:  # outside the try: a caller's error is its own, not the state's
                    each(search)
                bar.update()
        return search, meta["info"]

    def _replay(self, stretches: list[dict]):
        """Tell each saved generation again, yielding after each tell."""
        for s in stretches:
            m, a = s["meta"], s["arrays"]
            self._begin(a["x0"], m["sigma0"], m["popsize"], m["seed"], rng=(a["rng_keys"], m["rng"]))
            self.stretches[-1]["meta"]["sigma_set"] = m["sigma_set"]
            for values in s["told"]:
                self.tell(self._ask(), values)
                yield True


def _save_npz_to(tmp: Path, arrays: dict) -> None:
    """np.savez appends .npz to a name without it: write through a file object."""
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
