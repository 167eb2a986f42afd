"""PPO baselines: stable-baselines3's PPO learning CarRacing-v3 from pixels,
from V's z and from [z, h], at equal budgets, beside CMA-ES's C.

Every arm gets the same algorithm, the same settings (rl-baselines3-zoo's
for CarRacing, with the zoo's values below), the same budget of game frames,
the same seeds and the same frame skip; only what the policy sees differs
(wm/ppo.py):

    --arm pixels  CnnPolicy on the preprocessed 64x64 frames, grey, the last 2 stacked
    --arm z       MlpPolicy on V's mu (reads --ckpt-dir/vae.pt), V frozen
    --arm zh      MlpPolicy on [z, h], M's memory (also mdnrnn.pt, trained at this
                  frame skip: collect_rollouts.py --action-repeat), V and M frozen

The environments are the fast twin, one process each (SB3's SubprocVecEnv);
`evaluate.py --policy ppo --ckpt-dir RUN` scores a run on the official one.
Each seed is one run, in OUT_DIR/ARM/seedN: run.json (the settings, V's and
M's fingerprints, the frames trained), ppo_last.zip and vecnormalize.pkl
(saved atomically every --save-every frames and at the end; a rerun resumes
from them and continues the step count, --restart starts over),
episodes.csv (every training episode: the game frames so far, its return),
ppo_return.png, and tensorboard/. Frames are game frames: one agent step
holds its action for --frame-skip of them. experiments/compare_ppo.py draws every arm
and CMA-ES against frames.

usage: python -m experiments.train_ppo --arm pixels --seeds 0,1,2 --frames 1000000
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.utils import LinearSchedule
from stable_baselines3.common.vec_env import SubprocVecEnv, VecNormalize

from wm.agent import check_trained_with
from wm.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT, fail, resolve_device, run_main
from wm.env import SEED_LIMIT, TRAIN_SEED
from wm.files import writable_folder, write_atomically
from wm.metrics import MetricsLog
from wm.ppo import ARMS, EPISODES_FILE, MODEL_FILE, NORM_FILE, RUN_FILE, ArmEnvMaker, make_view, read_run


@dataclass
class Config:
    arm: str = "pixels"  # pixels (CnnPolicy on the frames), z (MlpPolicy on V's mu) or zh (on [z, h], M's memory)
    seeds: str = "0,1,2"  # one run per seed, one after the other
    frames: int = 1_000_000  # each run's budget in game frames, those done before a resume included (the zoo: 8M)
    ckpt_dir: str = "checkpoints"  # where vae.pt (z, zh) and mdnrnn.pt (zh) are read
    out_dir: str = "checkpoints/ppo"  # each run goes to OUT_DIR/ARM/seedN
    n_envs: int = 8  # environments, one process each (the zoo: 8)
    frame_skip: int = 2  # game frames each action is held, the reward summed over them (the zoo: 2)
    frame_stack: int = 2  # pixels: the last frames stacked as channels (the zoo: 2)
    max_steps: int = 1000  # time limit of an episode, in frames (CarRacing-v3's own: 1000)
    n_steps: int = 512  # agent steps per environment between updates (the zoo: 512)
    batch_size: int = 128  # minibatch (the zoo: 128)
    n_epochs: int = 10  # passes over each rollout (the zoo: 10)
    lr: float = 1e-4  # Adam's learning rate, decayed linearly to 0 over --frames (the zoo: lin_1e-4)
    gamma: float = 0.99  # discount, also of the reward normaliser (the zoo: 0.99)
    gae_lambda: float = 0.95  # GAE's lambda (the zoo: 0.95)
    clip_range: float = 0.2  # PPO's clip (the zoo: 0.2)
    ent_coef: float = 0.0  # entropy bonus (the zoo: 0)
    vf_coef: float = 0.5  # value loss weight (the zoo: 0.5)
    max_grad_norm: float = 0.5  # gradient clipping (the zoo: 0.5)
    use_sde: bool = True  # generalised state-dependent exploration (the zoo: True)
    sde_sample_freq: int = 4  # new exploration noise matrix every this many steps (the zoo: 4)
    log_std_init: float = -2.0  # initial log standard deviation of the exploration (the zoo: -2)
    hidden_size: int = 256  # one GELU layer of this size for the policy and one for the value (the zoo: 256)
    save_every: int = 100_000  # frames between saves (and one at the end)
    restart: bool = False  # ignore a saved run and start it from scratch (else a rerun resumes)
    device: str = "auto"  # auto (cuda for the pixel arm where there is one, else cpu), cpu or cuda, for the policy's training (the environments use the CPU)
    progress: bool = True  # stable-baselines3's progress bar

    # The range of each number option, checked in one line before main runs.
    RANGES = {"frames": AT_LEAST_1, "n_envs": AT_LEAST_1, "frame_skip": AT_LEAST_1, "frame_stack": AT_LEAST_1,
              "max_steps": AT_LEAST_1, "n_steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "n_epochs": AT_LEAST_1,
              "lr": POSITIVE, "gamma": UNIT, "gae_lambda": UNIT, "clip_range": POSITIVE,
              "ent_coef": NON_NEGATIVE, "vf_coef": NON_NEGATIVE, "max_grad_norm": POSITIVE,
              "sde_sample_freq": AT_LEAST_1, "hidden_size": AT_LEAST_1, "save_every": AT_LEAST_1}


# What a rerun may change without starting the run over; every other field
# must match the saved run.
FREE_FIELDS = ("seeds", "frames", "ckpt_dir", "out_dir", "save_every", "restart", "device", "progress")


def check_config(cfg: Config) -> None:
    if cfg.arm not in ARMS:
        raise fail(f"--arm must be one of {', '.join(ARMS)}, got {cfg.arm!r}")
    if cfg.n_envs * cfg.n_steps < 2:
        raise fail("a rollout needs at least 2 steps: raise --n-envs or --n-steps")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise fail(f"--seeds must be a comma-separated list of seeds (0,1,2), got {text!r}")
    return seeds


def first_track(seed: int, steps: int) -> int:
    """The track seed of environment 0's first episode (environment i: + i)
    in a run that starts or resumes after `steps` agent steps: a resumed run
    does not drive its first tracks again. Drawn from C's training range
    (wm/env.py), like train_controller.py's, so they never meet evaluate.py's."""
    return int(np.random.default_rng([seed, steps]).integers(TRAIN_SEED, SEED_LIMIT - 1024))


class SaveRun(BaseCallback):
    """The run's outputs. Every rollout appends its finished episodes to
    episodes.csv; every `every` agent steps, at the start of a rollout (the
    weights just updated), and at the end, the reward normaliser, the model
    and run.json are written atomically, the model before run.json. A rerun
    resumes from the model's step count and drops the rows after it."""

    def __init__(self, run_dir: Path, run: dict, every: int, frame_skip: int):
        super().__init__()
        self.run_dir, self.run, self.every, self.k = run_dir, run, every, frame_skip
        self.episodes = MetricsLog(run_dir / EPISODES_FILE, step_key="frames")
        self.rows, self.recent = [], deque(maxlen=20)

    def _on_training_start(self) -> None:
        self.start = self.saved_at = self.model.num_timesteps
        self.t0 = time.time()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info:  # Monitor's: the game's own rewards, not the normalised ones
                self.rows.append({"frames": self.num_timesteps * self.k, "return": info["episode"]["r"],
                                  "steps": info["episode"]["l"]})
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("time/frames", self.num_timesteps * self.k)
        self.episodes.extend(self.rows)
        self.recent.extend(r["return"] for r in self.rows)
        self.rows = []

    def _on_rollout_start(self) -> None:
        if self.model.num_timesteps - self.saved_at >= self.every:
            self.save()

    def _on_training_end(self) -> None:
        self.save()

    def save(self) -> None:
        steps = self.model.num_timesteps
        write_atomically(self.run_dir / NORM_FILE, self.model.get_vec_normalize_env().save)
        write_atomically(self.run_dir / MODEL_FILE, self.model.save)
        save_run(self.run_dir, {**self.run, "frames_trained": steps * self.k})
        self.episodes.plot(self.run_dir / "ppo_return.png", ["return"], ylabel="episode return",
                           title=f"PPO on {self.run['arm']}, seed {self.run['seed']} (x: game frames)")
        self.saved_at = steps
        rate = (steps - self.start) * self.k / max(time.time() - self.t0, 1e-9)
        recent = f"  return {np.mean(self.recent):7.1f} (last {len(self.recent)} episodes)" if self.recent else ""
        print(f"{self.run['arm']} seed {self.run['seed']}  frames {steps * self.k:,}{recent}  "
              f"{rate:.0f} frames/s  saved {self.run_dir / MODEL_FILE}", flush=True)


def save_run(run_dir: Path, run: dict) -> None:
    write_atomically(run_dir / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(run, indent=1) + "\n"))


def check_same_run(saved: dict, run: dict, run_dir: Path) -> None:
    """A saved run resumes only with the V, M and settings it was trained with."""
    check_trained_with(saved, run_dir / RUN_FILE, run, "experiments/train_ppo.py --restart")
    for key, value in run.items():
        if key not in ("ckpt_dir", "vae_fingerprint", "mdnrnn_fingerprint") and saved.get(key) != value:
            raise fail(f"{run_dir} was trained with {key} = {saved.get(key)}, this run asks for {value}; "
                       f"pass --restart to start over, or match its settings")


def new_model(cfg: Config, venv, seed: int, run_dir: Path, device) -> PPO:
    """The zoo's PPO for CarRacing; the arms differ only in the policy's input network."""
    policy_kwargs = dict(log_std_init=cfg.log_std_init, ortho_init=False, activation_fn=torch.nn.GELU,
                         net_arch=dict(pi=[cfg.hidden_size], vf=[cfg.hidden_size]))
    return PPO("CnnPolicy" if cfg.arm == "pixels" else "MlpPolicy", venv,
               learning_rate=LinearSchedule(cfg.lr, 0.0, 1.0), n_steps=cfg.n_steps, batch_size=cfg.batch_size,
               n_epochs=cfg.n_epochs, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_range,
               ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm,
               use_sde=cfg.use_sde, sde_sample_freq=cfg.sde_sample_freq, policy_kwargs=policy_kwargs,
               tensorboard_log=str(run_dir / "tensorboard"), seed=seed, device=device, verbose=0)


def already_done(run_dir: Path, frames: int) -> Path:
    print(f"{run_dir} is already at {frames:,} frames; raise --frames to train further")
    return run_dir


def train_run(cfg: Config, seed: int, fingerprints: dict) -> Path:
    """Train (or resume) one seed's run up to --frames; returns its folder."""
    run_dir = Path(cfg.out_dir) / cfg.arm / f"seed{seed}"
    settings = {k: v for k, v in asdict(cfg).items() if k not in FREE_FIELDS}
    run = {**settings, "seed": seed, "ckpt_dir": cfg.ckpt_dir, **fingerprints}
    resume = not cfg.restart and (run_dir / MODEL_FILE).is_file()
    if resume:
        saved = read_run(run_dir)
        check_same_run(saved, run, run_dir)
        if saved["frames_trained"] >= cfg.frames:  # written after the model, so never ahead of it
            return already_done(run_dir, saved["frames_trained"])
    else:
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    # auto: the GPU for the pixel arm's CNN only; SB3 runs an MLP policy faster on the CPU.
    device = resolve_device("cpu" if cfg.device == "auto" and cfg.arm != "pixels" else cfg.device)
    venv = make_vec_env(ArmEnvMaker(cfg.arm, cfg.ckpt_dir, cfg.frame_skip, cfg.frame_stack, cfg.max_steps),
                        n_envs=cfg.n_envs, vec_env_cls=SubprocVecEnv)
    try:
        if resume:
            venv = VecNormalize.load(str(run_dir / NORM_FILE), venv)
            model = PPO.load(run_dir / MODEL_FILE, env=venv, device=device,
                             tensorboard_log=str(run_dir / "tensorboard"))
        else:
            # The zoo normalises rewards only: pixels are scaled by the CNN, z is V's.
            venv = VecNormalize(venv, norm_obs=False, norm_reward=True, gamma=cfg.gamma)
            model = new_model(cfg, venv, seed, run_dir, device)
        start, target = model.num_timesteps, cfg.frames // cfg.frame_skip
        MetricsLog(run_dir / EPISODES_FILE, step_key="frames").truncate_after(start * cfg.frame_skip)
        save_run(run_dir, {**run, "frames_trained": start * cfg.frame_skip})
        if start >= target:
            return already_done(run_dir, start * cfg.frame_skip)
        venv.seed(first_track(seed, start))
        print(f"{'resuming' if start else 'training'} PPO on {cfg.arm}, seed {seed}, in {run_dir}: "
              f"frames {start * cfg.frame_skip:,} -> {target * cfg.frame_skip:,}, {cfg.n_envs} environments, "
              f"each action held {cfg.frame_skip} frames", flush=True)
        # The learning rate decays over the whole budget: a resume with the same
        # --frames follows the schedule of an uninterrupted run.
        model.learn(target - start, callback=SaveRun(run_dir, run, cfg.save_every // cfg.frame_skip, cfg.frame_skip),
                    progress_bar=cfg.progress, reset_num_timesteps=False, tb_log_name="ppo")
    finally:
        venv.close()
    return run_dir


def main(cfg: Config) -> list[Path]:
    check_config(cfg)
    seeds = parse_seeds(cfg.seeds)
    # V and M are loaded here first, so that a missing one is one line before any process starts.
    view, fingerprints = make_view(cfg.arm, cfg.ckpt_dir, cfg.frame_stack)
    mdnrnn = getattr(view, "mdnrnn", None)
    if mdnrnn is not None and mdnrnn.cfg.action_repeat != cfg.frame_skip:
        k = mdnrnn.cfg.action_repeat
        raise fail(f"{Path(cfg.ckpt_dir) / 'mdnrnn.pt'} learned every {k} frames and is stepped once per agent "
                   f"step: pass --frame-skip {k}, or train M on rollouts collected with --action-repeat "
                   f"{cfg.frame_skip} (collect_rollouts.py, then train_mdnrnn.py)")
    del view
    writable_folder(cfg.out_dir, "--out-dir")
    return [train_run(cfg, seed, fingerprints) for seed in seeds]


if __name__ == "__main__":
    run_main(main, Config)
