"""Does the dream rank controllers as the game does? No real frames.

Every dream-mode run of train_controller.py scored its CMA-ES mean on the
held-out tracks every --eval-every generations (controller_metrics.csv).
This replays each run's search (controller_es.npz) to those generations,
takes the mean C there, and dreams all of them, each dream variant on the
same --dreams seeded dreams, in M and in each --ensemble M (C reading that
M's own h). For each variant it prints the rank correlation (Spearman's
rho) between the dreamed return and the held-out score over all those Cs,
beside the one the search itself saw: its population's mean dreamed
return in that generation. A variant whose rho is near 0 cannot tell a
good C from a bad one, however many members CMA-ES tries in it.

A variant is start:frames:temperature. start 0: the first frame of a rollout
in --latent-dir, M's memory at zero; else that agent step or later (every
10th), memory warmed up on the real steps before (train_controller.py
--dream-start). frames: the dream's time limit (--dream-frames).

Beside each variant's rho it prints the rho of C's gas there (its mean
over the frames that counted): a negative one says that the Cs that press
more gas in the dream drive worse in the game, which is what
train_controller.py --dream-gas-cost charges for.

usage: python -m tools.dream_rank --runs 'checkpoints/grip_s*' --latent-dir data/grip_search/latents --json rank.json
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.controller import Controller
from tools.dream_truth import spearman
from tools.scale_controller import save_derived
from wm.checkpoint import load_checkpoint
from wm.cli import AT_LEAST_1, NON_NEGATIVE, fail, run_main
from wm.dream import Dream, load_dream_world, load_start_states
from wm.files import write_atomically
from wm.search import BadState, Search


@dataclass
class Config:
    runs: str = "checkpoints/grip_s*"  # dream-mode run folders, comma-separated, each may be a glob
    ckpt_dir: str = ""  # the vae.pt and mdnrnn.pt to dream in (default: the first run's); every run's C reads this M's h
    ensemble: str = ""  # more mdnrnn.pt files of M's size, comma-separated: each variant is dreamed in each, and in their mean with M
    latent_dir: str = "data/latents"  # the real rollouts the dreams start from
    variants: str = "20:200:1,20:100:1,20:500:1,0:1000:1,20:200:1.5"  # start:frames:temperature, comma-separated
    dreams: int = 1024  # dreams per variant, the same seeds for every C
    seed: int = 7000  # the dreams' seeds are seed, seed + 1, ...
    json: str = ""  # write every C's held-out score and dreamed returns, and each variant's rho, here
    write_dir: str = ""  # also write each C as WRITE_DIR/<run>_g<generation>/controller.pt, with links to its run's vae.pt and mdnrnn.pt, to play or collect laps from

    RANGES = {"dreams": AT_LEAST_1, "seed": NON_NEGATIVE}


def parse_variants(text: str) -> list[tuple[int, int, float]]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            start, frames, tau = part.split(":")
            v = (int(start), int(frames), float(tau))
        except ValueError:
            raise fail(f"--variants {part!r}: give start:frames:temperature, e.g. 20:200:1") from None
        if v[0] < 0 or v[1] < 1 or not v[2] > 0:
            raise fail(f"--variants {part!r}: start must be >= 0, frames >= 1 and the temperature above 0")
        out.append(v)
    if not out:
        raise fail("--variants is empty: give start:frames:temperature, e.g. 20:200:1")
    return out


def run_dirs(text: str) -> list[Path]:
    dirs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        found = sorted(glob.glob(part)) or [part]
        dirs += [Path(d) for d in found]
    missing = [str(d) for d in dirs if not (d / "controller_es.npz").is_file()]
    if not dirs or missing:
        raise fail(f"--runs: no controller_es.npz in {', '.join(missing) or repr(text)}; "
                   f"give folders of train_controller.py --mode dream runs")
    return dirs


def held_out_generations(metrics: Path) -> dict[int, tuple[float, float]]:
    """{generation: (held-out score, population's mean dreamed return)} from controller_metrics.csv."""
    with open(metrics, newline="") as f:
        return {int(r["generation"]): (float(r["held_out"]), float(r["mean"]))
                for r in csv.DictReader(f) if r.get("held_out")}


def candidates(run: Path) -> list[dict]:
    """The run's CMA-ES mean at each generation it was scored on the held-out tracks."""
    scored = held_out_generations(run / "controller_metrics.csv")
    means: dict[int, np.ndarray] = {}

    def each(search: Search) -> None:
        if search.generation in scored:
            means[search.generation] = np.array(search.es.result.xfavorite, dtype=np.float64)

    try:
        Search.load(run / "controller_es.npz", progress=False, each=each)
    except BadState as e:
        raise fail(str(e)) from None
    if set(means) != set(scored):
        raise fail(f"{run}: controller_metrics.csv has held-out scores at generations "
                   f"{sorted(set(scored) - set(means))} that controller_es.npz never reached")
    ckpt = load_checkpoint(run / "controller.pt", "controller")
    best = Controller.from_checkpoint(ckpt).get_flat()
    if not any(np.allclose(best, m, atol=1e-5) for m in means.values()):
        raise fail(f"{run}: controller.pt is none of the search's scored means; "
                   f"is it the run that wrote controller_es.npz?")
    return [{"run": str(run), "generation": g, "held_out": scored[g][0], "population_dreamed": scored[g][1],
             "params": means[g], "ckpt": ckpt} for g in sorted(scored)]


def write_controllers(cands: list[dict], out: Path) -> None:
    for c in cands:
        controller = Controller.from_checkpoint(c["ckpt"])
        controller.set_flat(c["params"])
        save_derived(c["ckpt"], controller, c["run"], out / f"{Path(c['run']).name}_g{c['generation']}",
                     held_out=c["held_out"], generation=c["generation"])
    print(f"wrote {len(cands)} controllers under {out}")


def main(cfg: Config) -> dict:
    variants = parse_variants(cfg.variants)
    runs = run_dirs(cfg.runs)
    cands = [c for run in runs for c in candidates(run)]
    ckpt_dir = Path(cfg.ckpt_dir or runs[0])
    controller = Controller.from_checkpoint(cands[0]["ckpt"])
    params = np.stack([c["params"] for c in cands])
    ms = ["mdnrnn.pt", *(p.strip() for p in cfg.ensemble.split(",") if p.strip())]
    seeds = list(range(cfg.seed, cfg.seed + cfg.dreams))
    held = [c["held_out"] for c in cands]
    rhos = {"population_dreamed": spearman(held, [c["population_dreamed"] for c in cands])}
    print(f"{len(cands)} Cs from {len(runs)} runs, held-out {min(held):.1f} to {max(held):.1f}")
    print(f"  the search's own (its population's mean dreamed return): rho {rhos['population_dreamed']:+.2f}")
    results = {}  # (variant, M) -> (dreamed return, gas per frame) of each C
    for m in ms:  # each M's world once, each start step's warmed-up states once
        world = load_dream_world(ckpt_dir, mdnrnn_path="" if m == "mdnrnn.pt" else m)
        starts = {s: load_start_states(cfg.latent_dir, world.vae_fingerprint, world.mdnrnn, s)
                  for s in sorted({v[0] for v in variants})}
        for start, frames, tau in variants:
            r = Dream(world.mdnrnn, controller, starts[start], tau, frames).run(params, seeds)
            gas = r.gas.sum(1) / (r.lengths.sum(1) * world.mdnrnn.cfg.action_repeat)
            results[(start, frames, tau), m] = (r.returns.mean(1).numpy(), gas.numpy())
    for variant in variants:
        per_m = [results[variant, m] for m in ms]
        if len(ms) > 1:
            per_m.append(tuple(np.mean(x, axis=0) for x in zip(*per_m)))
        for name, (v, gas) in zip(ms + ["mean"], per_m):
            key = f"{variant[0]}:{variant[1]}:{variant[2]:g} {name}"
            rhos[key], rhos[f"{key} gas"] = spearman(held, list(v)), spearman(held, list(gas))
            for c, x, g in zip(cands, v, gas):
                c[key], c[f"{key} gas"] = float(x), float(g)
            top = np.argsort(-v)[:3]
            print(f"  {key}: rho {rhos[key]:+.2f}, its gas {rhos[f'{key} gas']:+.2f}; "
                  f"its top 3 held-out {', '.join(f'{held[i]:.1f}' for i in top)}")
    if cfg.write_dir:
        write_controllers(cands, Path(cfg.write_dir))
    if cfg.json:
        out = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "rho": rhos,
               "controllers": [{k: v for k, v in c.items() if k not in ("params", "ckpt")} for c in cands]}
        write_atomically(cfg.json, lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
        print(f"wrote {cfg.json}")
    return rhos


if __name__ == "__main__":
    with torch.no_grad():
        run_main(main, Config)
