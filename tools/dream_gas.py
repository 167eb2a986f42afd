"""C's gas, chosen in M's dream: no real frames.

A C trained in the dream may press too little gas, since M knows speed less
well than steering. This dreams --ckpt-dir's controller.pt times each of
--scales, with its own gas and with its gas fixed at each of --gases
(tools/scale_controller.py --gas), from real states of --latent-dir (as
train_controller.py --dream-start and --dream-frames start them), on
--dreams seeded dreams, every variant on the same dreams. Each --sets is
another set of dreams, so that the table shows how much of a difference is
the dream's luck. It prints the mean dreamed return of each variant, and
its gas at the real start states (the mean and the median of C's gas on
each start's z and M's warmed-up h: how C drives the real laps there), writes
them to --csv, and names the best gas at each scale (the mean over sets).

usage: python -m tools.dream_gas --ckpt-dir checkpoints/pretrained/dream_seeds --latent-dir data/probe/latents --csv checkpoints/pretrained/dream_seeds/dream_gas.csv
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.controller import Controller
from tools.scale_controller import fix_gas
from wm.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, fail, numbers, run_main
from wm.checkpoint import load_checkpoint
from wm.dream import make_dream
from wm.files import write_atomically


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"  # controller.pt, and the vae.pt and mdnrnn.pt it was trained with
    latent_dir: str = "data/latents"  # the real rollouts whose states the dreams start from
    scales: str = "0.65,0.75,0.85,1"  # C's weights times these (tools/scale_controller.py --scale)
    gases: str = "0.1,0.2,0.25,0.3,0.35,0.4,0.5"  # C's gas fixed at these, beside its own
    dream_start: int = 20  # dreams start at this step of a rollout, then every 10th, M's memory warmed up (train_controller.py --dream-start)
    dream_frames: int = 200  # a dream's length in frames (train_controller.py --dream-frames)
    dreams: int = 2048  # dreams per set, each variant on the same ones
    sets: int = 2  # sets of dreams, each with its own seeds
    seed: int = 5000  # set s dreams with seeds seed + s * dreams, ...
    temperature: float = 1.0  # the dream's tau (train_controller.py --temperature)
    csv: str = ""  # write the table here

    RANGES = {"dream_start": AT_LEAST_1, "dream_frames": AT_LEAST_1, "dreams": AT_LEAST_1, "sets": AT_LEAST_1,
              "seed": NON_NEGATIVE, "temperature": POSITIVE}


def variants(controller: Controller, scales: list[float], gases: list[float]) -> dict[tuple[float, str], np.ndarray]:
    """{(scale, "own" or the gas): flat weights} of C times each scale, its gas
    its own or fixed."""
    flat, out = controller.get_flat(), {}
    for s in scales:
        for g in [None, *gases]:
            c = Controller(controller.cfg)
            c.set_flat(s * flat)
            if g is not None:
                fix_gas(c, g)
            out[(s, "own" if g is None else f"{g:g}")] = c.get_flat()
    return out


def main(cfg: Config) -> list[dict]:
    scales, gases = numbers(cfg.scales, "--scales", "scale"), numbers(cfg.gases, "--gases", "gas")
    if not all(s > 0 for s in scales):
        raise fail(f"--scales {cfg.scales!r}: each must be above 0")
    if not all(0 < g < 1 for g in gases):
        raise fail(f"--gases {cfg.gases!r}: each must be between 0 and 1")
    path = Path(cfg.ckpt_dir) / "controller.pt"
    controller = Controller.from_checkpoint(load_checkpoint(path, "controller"))
    dream, _ = make_dream(cfg.ckpt_dir, controller, cfg.latent_dir, cfg.temperature, cfg.dream_frames,
                          start_step=cfg.dream_start)
    table = variants(controller, scales, gases)
    params = np.stack(list(table.values()))
    starts = dream.starts
    P, N = len(params), len(starts.z)
    at_starts = controller.forward_population(torch.as_tensor(params), starts.z.expand(P, N, -1),
                                              starts.h.expand(P, N, -1))[..., 1]  # (variants, starts)
    returns = []
    for s in range(cfg.sets):
        seeds = list(range(cfg.seed + s * cfg.dreams, cfg.seed + (s + 1) * cfg.dreams))
        returns.append(dream.run(params, seeds).returns.mean(1).cpu().numpy())  # (variants,)
    rows = [{"scale": scale, "gas": gas, **{f"set_{s + 1}": round(float(r[i]), 2) for s, r in enumerate(returns)},
             "mean": round(float(np.mean([r[i] for r in returns])), 2),
             "gas_mean": round(float(at_starts[i].mean()), 3),
             "gas_median": round(float(at_starts[i].median()), 3)}
            for i, (scale, gas) in enumerate(table)]
    print(f"dreamed return over {cfg.dream_frames} frames, {cfg.dreams} dreams a set, from {cfg.latent_dir}:")
    for scale in scales:
        mine = [r for r in rows if r["scale"] == scale]
        best = max(mine, key=lambda r: r["mean"])
        cells = "  ".join(f"{r['gas']} {r['mean']:.1f}" for r in mine)
        print(f"  x{scale:g}: {cells}   best gas: {best['gas']}; its own gas at the starts: "
              f"mean {mine[0]['gas_mean']:.3f}, median {mine[0]['gas_median']:.3f}")
    if cfg.csv:
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        write_atomically(cfg.csv, write)
        print(f"wrote {cfg.csv}")
    return rows


if __name__ == "__main__":
    with torch.no_grad():
        run_main(main, Config)
