"""What a PPO baseline sees, in one place: experiments/train_ppo.py trains on it (the fast
twin, one process per environment) and evaluate.py scores with it (the
official environment, through `wm.agent.run_episodes`).

Each arm is one input to the same PPO (stable-baselines3), every action held
for the same number of frames (`wm.env.step_repeat`):

    pixels  the preprocessed 64x64 frame in grey, the last 2 stacked  (2, 64, 64) uint8
    z       V's mu for the preprocessed frame                          (Z,)
    zh      [z, h], h being M's memory, stepped with (z, the action)   (Z + H,)

A view turns K frames into K observations and is told the K actions taken,
so that the same code serves the gymnasium wrapper that SB3 trains on
(K = 1 per environment) and the batched agent that evaluate.py drives.
V and M stay frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from wm.agent import check_trained_with, load_models
from wm.cli import fail
from wm.env import MAX_EPISODE_STEPS, make_env, step_repeat
from wm.frames import FRAME_SIZE, preprocess, to_grey, to_model_input

ARMS = ("pixels", "z", "zh")
RUN_FILE = "run.json"  # the run's settings and the V and M it reads
MODEL_FILE = "ppo_last.zip"  # SB3's model: weights, Adam, the step count a rerun resumes from
NORM_FILE = "vecnormalize.pkl"  # the reward normaliser's running statistics
EPISODES_FILE = "episodes.csv"  # one row per training episode: frames so far, return, agent steps


class PixelView:
    """The zoo's CarRacing input, on the frames V sees: wm.frames.preprocess,
    then grey, the last `stack` frames as channels. An episode's first frame
    also stands in for the frames before it."""

    def __init__(self, stack: int = 2):
        self.stack = stack
        self.space = spaces.Box(0, 255, (stack, FRAME_SIZE, FRAME_SIZE), np.uint8)
        self.frames = None

    def reset(self, n: int) -> None:
        self.frames = None

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(K, 96, 96, 3) uint8 -> (K, stack, 64, 64) uint8."""
        grey = to_grey(np.stack([preprocess(f) for f in frames]))[:, None]  # (K, 1, 64, 64)
        if self.frames is None:
            self.frames = np.repeat(grey, self.stack, axis=1)
        else:
            self.frames = np.concatenate([self.frames[:, 1:], grey], axis=1)
        return self.frames

    def acted(self, actions: np.ndarray) -> None:
        pass

    def keep(self, rows: Sequence[int]) -> None:
        self.frames = self.frames[list(rows)]


class LatentView:
    """V's mu for each frame (not a sample, as C sees it), and with M, M's
    memory h beside it: zeros at an episode's start, then M's one-step cell
    fed (z, the action taken) after every action."""

    def __init__(self, vae, mdnrnn=None):
        self.vae, self.mdnrnn = vae, mdnrnn
        size = vae.cfg.latent_size + (mdnrnn.cfg.hidden_size if mdnrnn is not None else 0)
        self.space = spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.reset(1)

    def reset(self, n: int) -> None:
        self.z = None  # (K, Z) for the last frames seen
        self.state = self.mdnrnn.initial_state(n, "cpu") if self.mdnrnn is not None else None

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(K, 96, 96, 3) uint8 -> (K, Z) or (K, Z + H) float32."""
        self.z, _ = self.vae.encode(to_model_input(np.stack([preprocess(f, self.vae.cfg.view) for f in frames])))  # (K, Z)
        obs = self.z if self.state is None else torch.cat([self.z, self.state[0]], dim=-1)
        return obs.numpy()

    @torch.inference_mode()
    def acted(self, actions: np.ndarray) -> None:
        if self.mdnrnn is not None:
            a = torch.as_tensor(np.asarray(actions), dtype=torch.float32)  # (K, 3)
            _, self.state = self.mdnrnn.step(self.z, a, self.state)

    def keep(self, rows: Sequence[int]) -> None:
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        self.z = self.z[idx]
        if self.state is not None:
            self.state = (self.state[0][idx], self.state[1][idx])


def make_view(arm: str, ckpt_dir: str | Path, frame_stack: int = 2):
    """The view of `arm` -> (view, the fingerprints of the V and M it reads).
    V (and M for zh) come from `ckpt_dir`, with one line naming the script
    that makes a missing one."""
    if arm not in ARMS:
        raise fail(f"--arm must be one of {', '.join(ARMS)}, got {arm!r}")
    if arm == "pixels":
        return PixelView(frame_stack), {"vae_fingerprint": None, "mdnrnn_fingerprint": None}
    vae, mdnrnn, fingerprints = load_models(ckpt_dir, with_m=arm == "zh")
    return LatentView(vae, mdnrnn), fingerprints


class HoldAction(gym.Wrapper):
    """Each action held for k frames (on the fast twin only the k-th is
    rendered), the rewards summed; info["frames"] is how many were stepped."""

    def __init__(self, env: gym.Env, k: int):
        super().__init__(env)
        self.k = k

    def step(self, action):
        obs, reward, terminated, truncated, frames = step_repeat(self.env, action, self.k)
        return obs, reward, terminated, truncated, {"frames": frames}


class ViewObservation(gym.ObservationWrapper):
    """Frames as an arm's view sees them. The view is told each action
    before it is taken, so that M's memory follows the episode."""

    def __init__(self, env: gym.Env, view):
        super().__init__(env)
        self.view = view
        self.observation_space = view.space

    def reset(self, **kwargs):
        self.view.reset(1)
        return super().reset(**kwargs)

    def step(self, action):
        self.view.acted(np.asarray(action, dtype=np.float32)[None])
        return super().step(action)

    def observation(self, frame: np.ndarray) -> np.ndarray:
        return self.view(frame[None])[0]


def make_arm_env(arm: str, ckpt_dir: str | Path, frame_skip: int = 2, frame_stack: int = 2,
                 max_steps: int = MAX_EPISODE_STEPS, fast: bool = True) -> gym.Env:
    """CarRacing-v3 (the fast twin when `fast`) as the policy of `arm` sees it."""
    view, _ = make_view(arm, ckpt_dir, frame_stack)
    return ViewObservation(HoldAction(make_env(fast=fast, max_steps=max_steps), frame_skip), view)


@dataclass
class ArmEnvMaker:
    """A picklable env_fn for SB3's SubprocVecEnv: each process builds its own
    fast environment and loads its own V (and M)."""
    arm: str
    ckpt_dir: str
    frame_skip: int
    frame_stack: int
    max_steps: int

    def __call__(self) -> gym.Env:
        torch.set_num_threads(1)  # one process per environment: threads would only fight
        return make_arm_env(self.arm, self.ckpt_dir, self.frame_skip, self.frame_stack, self.max_steps)


def read_run(run_dir: str | Path) -> dict:
    """The settings experiments/train_ppo.py recorded for a run, or one line saying what to do."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        raise fail(f"{run_dir / MODEL_FILE} not found; run experiments/train_ppo.py first "
                   f"(or point --ckpt-dir at one of its run folders, OUT_DIR/ARM/seedN)")
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError) as e:
        raise fail(f"cannot read {run_dir / RUN_FILE} ({e}); rerun experiments/train_ppo.py with --restart")


class PPOAgent:
    """A trained PPO policy as `wm.agent.run_episodes` drives it: K frames in,
    K actions out, through the arm's view, clipped to the action space. The
    policy's mean action (SB3's deterministic=True), or with `stochastic` a draw
    from the policy as in training: gSDE's noise, one draw per car, redrawn
    every `sde_sample_freq` steps and whenever a car of the batch finishes,
    seeded by the batch's first track."""

    def __init__(self, model, view, stochastic: bool = False):
        self.model, self.view, self.stochastic, self.steps = model, view, stochastic, 0

    @classmethod
    def load(cls, run_dir: str | Path, device: torch.device | str = "cpu", stochastic: bool = False) -> "PPOAgent":
        from stable_baselines3 import PPO

        run = read_run(run_dir)
        view, fingerprints = make_view(run["arm"], run["ckpt_dir"], run["frame_stack"])
        check_trained_with(run, Path(run_dir) / MODEL_FILE, fingerprints, "experiments/train_ppo.py")
        return cls(PPO.load(Path(run_dir) / MODEL_FILE, device=device), view, stochastic)

    def reset(self, seeds: Sequence[int], params: None = None) -> None:
        self.view.reset(len(seeds))
        if self.stochastic:
            torch.manual_seed(seeds[0])
            self.steps = 0

    def act(self, frames: np.ndarray) -> np.ndarray:
        """(K, 96, 96, 3) uint8 frames -> actions (K, 3) float32."""
        model = self.model
        # A loaded model's gSDE noise was drawn before its log σ was loaded; draw
        # it anew, as training does at every rollout and every sde_sample_freq steps.
        # sde_sample_freq <= 0 (SB3: only at a rollout's start) draws once, at the first step.
        freq = model.sde_sample_freq
        if self.stochastic and model.use_sde and (self.steps == 0 or freq > 0 and self.steps % freq == 0):
            model.policy.reset_noise(len(frames))
        self.steps += 1
        actions, _ = model.predict(self.view(frames), deterministic=not self.stochastic)
        actions = actions.astype(np.float32)
        self.view.acted(actions)
        return actions

    def keep(self, rows: Sequence[int]) -> None:
        self.view.keep(rows)
        self.steps = 0  # one noise draw per car still driving
