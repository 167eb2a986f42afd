"""Where the dream is wrong, in the real game: C's dreamed actions replayed
from the real states the dreams start from, saved as rollouts for M.

For --windows real states (fewer when a draw repeats one; a lap of --data-dir and a step of it, at
--dream-start or later, drawn by --seed), C (--ckpt-dir's controller.pt)
dreams --dream-frames in M from there, M's memory warmed up on the lap's
real steps before, as train_controller.py --mode dream dreams. The game is
then put back in that state (the lap's own actions from the start of its
track, not rendered) and the dream's actions are played open loop: the
frames, rewards and ends they really lead to. Each window is written to
--data-dir as a rollout (rollout_<track>_w<seed>_<step>.npz), so that M,
fine-tuned on the folder, learns what those actions do where it dreamed
otherwise. --json records the windows, the dreamed and the real returns,
and the real frames stepped (the way back included).

usage: python -m experiments.dream_replays --ckpt-dir checkpoints/dream_loop/round_01 --data-dir data/dream_loop/rollouts --latent-dir data/dream_loop/latents --json replays.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.controller import Controller
from wm.agent import check_trained_with
from wm.checkpoint import load_checkpoint
from wm.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, fail, run_main
from wm.dream import Dream, StartStates, check_dream_heads, replay_in_game, warm_starts
from wm.env import make_env
from wm.files import locked, write_atomically
from wm.latents import BadLatents, latent_path, load_world_model, read_latents
from wm.rollouts import list_rollouts, read_setting, rollout_seed, write_rollout


@dataclass
class Config:
    ckpt_dir: str = "checkpoints/dream_loop/round_01"  # vae.pt, mdnrnn.pt and the controller.pt whose dreams are replayed
    data_dir: str = "data/dream_loop/rollouts"  # real laps to start from; the windows are written here
    latent_dir: str = "data/dream_loop/latents"  # V's codes of those laps (train_mdnrnn.py writes them)
    windows: int = 100  # real states to dream and replay from
    dream_start: int = 20  # the earliest agent step of a lap a window starts at
    dream_frames: int = 200  # a dream's length in frames (train_controller.py --dream-frames)
    temperature: float = 1.0  # tau of M's sampling in the dream
    max_steps: int = 1000  # the game's time limit in frames
    seed: int = 0  # draws the laps, the steps and the dream's noise; names the files
    json: str = ""  # write the windows and their returns here

    RANGES = {"windows": AT_LEAST_1, "dream_start": NON_NEGATIVE, "dream_frames": AT_LEAST_1,
              "temperature": POSITIVE, "max_steps": AT_LEAST_1, "seed": NON_NEGATIVE}


def laps(cfg: Config, vae_fingerprint: str, first: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(track seed, V's means, actions) of the folder's laps (not its windows)
    long enough to start at `first`, from their latents."""
    found = []
    for path in list_rollouts(cfg.data_dir):
        seed = rollout_seed(path)
        if seed is None:  # a window of an earlier replay
            continue
        try:
            data = read_latents(latent_path(cfg.latent_dir, path), vae_fingerprint)
        except (BadLatents, FileNotFoundError):
            continue
        if len(data["mu"]) > first:
            found.append((seed, data["mu"], data["actions"]))
    if not found:
        raise fail(f"no lap in {cfg.data_dir} longer than {first} steps with V's codes in {cfg.latent_dir}; "
                   f"run train_mdnrnn.py --data-dir {cfg.data_dir} --latent-dir {cfg.latent_dir} to encode them")
    return found


@locked("data_dir", "--data-dir")
def main(cfg: Config) -> dict:
    t0 = time.time()
    ckpt_dir = Path(cfg.ckpt_dir)
    world = load_world_model(ckpt_dir, "cpu")
    check_dream_heads(world.mdnrnn, ckpt_dir / "mdnrnn.pt")
    path = ckpt_dir / "controller.pt"
    if not path.is_file():
        raise fail(f"{path} is not there; train C in this folder first (train_controller.py --mode dream)")
    ckpt = load_checkpoint(path, "controller")
    check_trained_with(ckpt, path, {"vae_fingerprint": world.vae_fingerprint,
                                    "mdnrnn_fingerprint": world.mdnrnn_fingerprint})
    controller = Controller.from_checkpoint(ckpt)
    k, view = world.mdnrnn.cfg.action_repeat, world.vae.cfg.view
    found = laps(cfg, world.vae_fingerprint, cfg.dream_start)
    if read_setting(list_rollouts(cfg.data_dir)[0], "action_repeat") != k:
        raise fail(f"the laps in {cfg.data_dir} hold each action another number of frames than mdnrnn.pt's {k}")

    rng = np.random.default_rng(cfg.seed)
    # One window per (lap, step): the same pair twice would write one file.
    picks = list(dict.fromkeys((int(i), int(rng.integers(cfg.dream_start, len(found[i][1]))))
                               for i in rng.integers(len(found), size=cfg.windows)))
    # M steps through each lap's prefix only, up to the window's step.
    starts = [warm_starts(world.mdnrnn, [(found[i][1][:step + 1], found[i][2][:step + 1])], step) for i, step in picks]
    starts = StartStates(*(torch.cat([s[j][:1] for s in starts]) for j in range(3)))  # (N, ...)
    dream = Dream(world.mdnrnn, controller, starts, cfg.temperature, cfg.dream_frames)
    seeds = rng.integers(2**31, size=len(picks)).tolist()
    result = dream.run(controller.get_flat()[None], seeds, z0=starts, record=True)

    env = make_env(fast=True, max_steps=cfg.max_steps)
    windows, frames = [], 0
    try:
        for w, (i, step) in enumerate(tqdm(picks, desc="replays", unit="window")):
            track, _, actions = found[i]
            n = int(result.lengths[0, w])
            dreamed_actions = result.actions[:n, 0, w].numpy()  # (n, 3)
            replay = replay_in_game(env, track, actions[:step], dreamed_actions, k, view)
            played = len(replay.frames)
            out = Path(cfg.data_dir) / f"rollout_{track:07d}_w{cfg.seed}_{step:04d}.npz"
            write_rollout(out, observations=replay.frames, actions=dreamed_actions[:played].astype(np.float32),
                          rewards=replay.rewards, terminated=replay.terminated, truncated=replay.truncated,
                          action_repeat=np.array(k, dtype=np.int64), view=np.array(view),
                          policy=np.array("replay"), max_steps=np.array(cfg.max_steps, dtype=np.int64))
            frames += replay.frames_stepped
            windows.append({"file": out.name, "track": track, "step": step, "dreamed": float(result.returns[0, w]),
                            "replayed": float(replay.rewards.astype(np.float64).sum()), "steps": played})
    finally:
        env.close()
    gap = np.mean([w["dreamed"] - w["replayed"] for w in windows])
    print(f"{len(windows)} windows replayed into {cfg.data_dir}: dreamed {np.mean([w['dreamed'] for w in windows]):.1f}, "
          f"replayed {np.mean([w['replayed'] for w in windows]):.1f} (gap {gap:.1f}), {frames:,} real frames, "
          f"{time.time() - t0:.0f} s")
    summary = {"config": asdict(cfg), "real_frames": frames, "exploit_gap": float(gap),
               "seconds": round(time.time() - t0, 1), "windows": windows}
    if cfg.json:
        write_atomically(cfg.json, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
    return summary


if __name__ == "__main__":
    run_main(main, Config)
