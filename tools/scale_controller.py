"""A rung of tools/dream_truth.py's ladder as a C of its own: --ckpt-dir's
controller.pt with all its weights and biases times --scale, written to
--out-dir/controller.pt for evaluate.py and the held-out tracks to score.

A smaller scale is a gentler driver: every action's pre-activation shrinks
toward zero, steering, gas and brake alike. The new file records the scale
and the C it came from (a scaled C scaled again: the product, from the first); its held-out score is not carried over, since the
scaled C has not been scored. --out-dir needs the same vae.pt and mdnrnn.pt
as --ckpt-dir (evaluate.py refuses another pair).

usage: python -m tools.scale_controller --ckpt-dir checkpoints/pretrained/dream_seeds --scale 0.85 --out-dir checkpoints/pretrained/dream_scaled_085
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.controller import Controller
from wm.checkpoint import describe_controller, load_checkpoint, save_checkpoint
from wm.cli import POSITIVE, fail, run_main
from wm.files import writable_folder


@dataclass
class Config:
    ckpt_dir: str = "checkpoints"  # the folder of the controller.pt to scale
    scale: float = 0.85  # its weights times this (tools/dream_truth.py --scales); 1 is C itself
    out_dir: str = ""  # the scaled controller.pt goes here, beside the same vae.pt and mdnrnn.pt

    RANGES = {"scale": POSITIVE}


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
    kept = {k: v for k, v in ckpt.items() if k not in ("held_out", "held_out_std")}
    # A scaled C scaled again records its scale from the C that CMA-ES wrote.
    save_checkpoint(target, {**kept, "model": controller.state_dict(), "scale": cfg.scale * ckpt.get("scale", 1.0),
                             "scaled_from": ckpt.get("scaled_from", str(source))})
    print(f"wrote {target}: {source} ({describe_controller(ckpt)}) times {cfg.scale:g}")
    return target


if __name__ == "__main__":
    run_main(main, Config)
