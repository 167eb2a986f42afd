"""A rung of tools/dream_truth.py's ladder as a C of its own: --ckpt-dir's
controller.pt with all its weights and biases times --scale, written to
--out-dir/controller.pt for evaluate.py and the held-out tracks to score.

A smaller scale is a gentler driver: every action's pre-activation shrinks
toward zero, steering, gas and brake alike. The new file records the scale
and the C it came from (a scaled C scaled again: the product, from the
first); its held-out score is not carried over, since the scaled C has not
been scored. --gas G fixes C's gas at G instead of scaling it: the gas
row's weights 0 and its bias atanh(2G - 1), so that C steers (and brakes) as
the scaled C does, at a constant gas; tools/dream_gas.py picks G in M's
dream. --out-dir gets links to --ckpt-dir's vae.pt and mdnrnn.pt where it
has none, so that evaluate.py plays it at once; a pair already there must
be the same (evaluate.py refuses another).

usage: python -m tools.scale_controller --ckpt-dir checkpoints/pretrained/dream_seeds --scale 0.85 --out-dir checkpoints/pretrained/dream_scaled_085
       python -m tools.scale_controller --ckpt-dir checkpoints/pretrained/dream_seeds --scale 0.85 --gas 0.35 --out-dir checkpoints/dream_gas
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.controller import Controller
from wm.checkpoint import describe_controller, load_checkpoint, save_checkpoint
from wm.cli import POSITIVE, Range, fail, run_main
from wm.files import link, writable_folder


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"  # the folder of the controller.pt to scale
    scale: float = 0.85  # its weights times this (tools/dream_truth.py --scales); 1 is C itself
    gas: float = 0.0  # 0: C's own gas, scaled; between 0 and 1: C's gas fixed at this
    out_dir: str = ""  # the scaled controller.pt goes here, with links to --ckpt-dir's vae.pt and mdnrnn.pt

    RANGES = {"scale": POSITIVE, "gas": Range("from 0 up to, not including, 1", lambda v: 0 <= v < 1)}


def fix_gas(controller: Controller, gas: float) -> None:
    """C's gas, (tanh(x) + 1) / 2 of its last layer's second output, made the
    constant `gas`: that output's weights 0, its bias atanh(2 gas - 1)."""
    last = controller.net if isinstance(controller.net, torch.nn.Linear) else controller.net[-1]
    last.weight[1] = 0.0
    last.bias[1] = float(np.arctanh(2 * gas - 1))


def save_derived(ckpt: dict, controller: Controller, source_dir: str | Path, out_dir: str | Path, **fields) -> Path:
    """OUT_DIR/controller.pt: `ckpt`'s record with `controller`'s weights and
    `fields`, without the held-out score and the fixed gas of the C it came
    from (this one has not been scored), and links to SOURCE_DIR's vae.pt and
    mdnrnn.pt where it has them, so that evaluate.py plays it at once."""
    target = Path(out_dir) / "controller.pt"
    kept = {k: v for k, v in ckpt.items() if k not in ("held_out", "held_out_std", "gas")}
    save_checkpoint(target, {**kept, "model": controller.state_dict(), **fields})
    for model in ("vae.pt", "mdnrnn.pt"):
        if (Path(source_dir) / model).exists():
            link(Path(source_dir) / model, Path(out_dir))
    return target


def main(cfg: Config) -> Path:
    source = Path(cfg.ckpt_dir) / "controller.pt"
    if not cfg.out_dir:
        raise fail("give --out-dir, the folder for the scaled controller.pt")
    target = Path(cfg.out_dir) / "controller.pt"
    if target.resolve() == source.resolve():
        raise fail(f"--out-dir {cfg.out_dir} is --ckpt-dir: the scaled C would replace the one it comes from; "
                   f"pass another folder")
    ckpt = load_checkpoint(source, "controller")
    writable_folder(cfg.out_dir, "--out-dir")
    controller = Controller.from_checkpoint(ckpt)
    controller.set_flat(cfg.scale * controller.get_flat())
    gas = cfg.gas or ckpt.get("gas", 0.0)  # a fixed gas stays fixed when its C is scaled again
    if gas:
        fix_gas(controller, gas)
    # A scaled C scaled again records its scale from the C that CMA-ES wrote.
    save_derived(ckpt, controller, cfg.ckpt_dir, cfg.out_dir, scale=cfg.scale * ckpt.get("scale", 1.0),
                 scaled_from=ckpt.get("scaled_from", str(source)), **({"gas": gas} if gas else {}))
    fixed = f", gas fixed at {gas:g}" if gas else ""
    print(f"wrote {target}: {source} ({describe_controller(ckpt)}) times {cfg.scale:g}{fixed}")
    return target


if __name__ == "__main__":
    run_main(main, Config)
