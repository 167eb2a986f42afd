"""The checkpoint format, in one place.

A checkpoint is a dict of tensors and plain Python values, loadable with
`torch.load(..., weights_only=True)`:

    {"model": state_dict, "model_args": {...}, "config": {...},
     "optimizer": ..., "epoch" or "generation": int, "fingerprint": str, ...metrics}

`fingerprint` is a hash of the model's weights. A later stage records the
fingerprints of the checkpoints it was trained on, so that pairing it with a
different V or M is caught instead of silently producing garbage.

V's and M's checkpoints also record the file names of the rollouts they
trained on and held out, `train_rollouts` and `val_rollouts`; a name holds
the track's seed (`recorded_tracks`). M holds out V's validation tracks, and
evaluate.py warns when it scores on tracks they trained on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from wm.cli import fail
from wm.files import write_atomically
from wm.rollouts import track_of

# Which script writes each checkpoint, named in the error when one is missing.
MAKERS = {
    "vae": "train_vae.py",
    "mdnrnn": "train_mdnrnn.py",
    "controller": "train_controller.py",
}


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights: equal weights, equal fingerprint."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def recorded_tracks(ckpt: dict[str, Any], key: str) -> set[int | str] | None:
    """The tracks (seeds, see `wm.rollouts.track_of`) of the rollouts that a V
    or M checkpoint lists under `key`, "train_rollouts" or "val_rollouts";
    None for a checkpoint that lists none (made before they were recorded)."""
    names = ckpt.get(key)
    return None if names is None else {track_of(name) for name in names}


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, then a rename, so a
    kill at any moment leaves the previous checkpoint whole."""
    if "model" in payload:
        payload = {**payload, "fingerprint": state_fingerprint(payload["model"])}
    # Tensors go to the CPU: a file written on a GPU then loads anywhere,
    # also with a plain torch.load (weights_only=True, no map_location).
    payload = _on_cpu(payload)
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def _on_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint, or raise one clear line saying what to do.

    `kind` ("vae", "mdnrnn", "controller") names the script that makes it in
    the error for a missing file, and is checked against the file's own kind.
    """
    path = Path(path)
    maker = MAKERS.get(kind or "", "the training script")
    if not path.is_file():
        raise fail(f"{path} not found; run {maker} first (or point --ckpt-dir at its folder)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects
        raise fail(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); "
                   f"rerun {maker} to rebuild it")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise fail(f"{path} is not a checkpoint of this repository; rerun {maker}")
    if kind is not None and ckpt.get("kind", kind) != kind:
        raise fail(f"{path} holds a {ckpt.get('kind')} checkpoint, expected {kind}")
    if kind in MAKERS:
        check_fits(path, kind, ckpt)
    return ckpt


def describe_controller(ckpt: dict[str, Any]) -> str:
    """What a controller.pt is, in a few words: its generation, the scale of a
    C written by tools/scale_controller.py (and its fixed gas), and its held-out score, which a
    scaled C does not have."""
    scaled = f" times {ckpt['scale']:g} (tools/scale_controller.py)" if "scale" in ckpt else ""
    scaled += f", gas fixed at {ckpt['gas']:g}" if "gas" in ckpt else ""
    scored = f", held-out score {ckpt['held_out']:.1f}" if "held_out" in ckpt else ", not scored on held-out tracks"
    return f"generation {ckpt.get('generation')}{scaled}{scored}"


def check_fits(path: Path, kind: str, ckpt: dict[str, Any]) -> None:
    """One line, not a traceback from deep inside torch, for a checkpoint
    whose settings or tensors are not this repository's model's: no
    `model_args`, an unknown one, or weights of another shape. The model is
    built on the meta device, without memory or weights, so a load does not
    build it twice."""
    import models  # here: the models are not needed to read a file

    cls, config = {"vae": (models.ConvVAE, models.VAEConfig), "mdnrnn": (models.MDNRNN, models.MDNRNNConfig),
                   "controller": (models.Controller, models.ControllerConfig)}[kind]
    if not isinstance(ckpt.get("model_args"), dict):
        problem = "has no model_args"
    else:
        try:
            with torch.device("meta"):
                expected = {k: tuple(v.shape) for k, v in cls(config(**ckpt["model_args"])).state_dict().items()}
            saved = {k: tuple(getattr(v, "shape", ())) for k, v in ckpt["model"].items()}
            wrong = sorted(set(expected) ^ set(saved)) or [k for k in expected if expected[k] != saved[k]]
            problem = (f"does not fit the {kind} model ({wrong[0]}: {saved.get(wrong[0])} saved, "
                       f"{expected.get(wrong[0])} in the model)") if wrong else None
        except (TypeError, ValueError, AttributeError) as e:  # an unknown setting, or a nonsense one
            problem = f"does not fit the {kind} model ({str(e).strip().splitlines()[0] or type(e).__name__})"
    if problem:
        raise fail(f"{path} {problem}; it was not written by this repository's {MAKERS[kind]}: rerun it")


def keep_finished(best: str | os.PathLike, last: str | os.PathLike, restart: bool) -> None:
    """Refuse a fresh run in a folder whose `best` file has no `last` beside
    it to resume from: a finished run (a shipped one, or one committed
    without its resume state), which the new run would overwrite."""
    best, last = Path(best), Path(last)
    if not restart and best.is_file() and not last.is_file():
        raise fail(f"{best} is there but {last.name} is not, so its run cannot be resumed; pass --restart to "
                   f"start a new run there (it replaces {best.name}), or give another --ckpt-dir")


def resume_training(path: str | os.PathLike, kind: str, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, model_args: dict,
                    restart: bool = False,
                    check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """Load a `*_last.pt` into `model` and `optimizer` to go on training.

    Returns the checkpoint, or None when there is none or `restart` is set.
    `check(ckpt)` may refuse it first (raise `fail(...)`), e.g. M trained on
    another V. A checkpoint of another model size is refused rather than
    half-loaded.
    """
    path = Path(path)
    if restart or not path.exists():
        return None
    ckpt = load_checkpoint(path, kind=kind)
    if check is not None:
        check(ckpt)
    # Read as the model reads them: a field added since it was saved has its default.
    saved = asdict(type(model.cfg)(**ckpt["model_args"]))
    if saved != model_args:
        raise fail(f"{path} was trained with {saved}, this run asks for {model_args}; "
                   f"pass --restart to start over, or match its settings")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    print(f"resuming from {path} after epoch {ckpt['epoch']}")
    return ckpt
