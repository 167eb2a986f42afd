"""The agent loop, in one place: training, evaluation, the benchmark and the
video all drive the car through `run_episode` and `Agent.act`.

One step, as in the paper:

    frame -> preprocess -> V's mu = z -> C's action from [z, h] -> env.step
                                      \\-> M's cell updates h with (z, action)

z is V's mean, not a sample: C should not see the encoder's noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.controller import Controller, ControllerConfig
from models.mdnrnn import MDNRNN
from models.vae import ConvVAE
from wm.checkpoint import load_checkpoint
from wm.cli import fail
from wm.env import make_env
from wm.frames import preprocess, to_model_input
from wm.latents import load_world_model
from wm.policies import UniformPolicy


class Agent:
    """V, M and C together: sees a frame, returns an action, remembers in h.

    M may be left out when C reads z alone (the paper's "V only" ablation).
    """

    def __init__(self, vae: ConvVAE, controller: Controller, mdnrnn: MDNRNN | None = None,
                 device: torch.device | str = "cpu"):
        if controller.uses_memory and mdnrnn is None:
            raise ValueError("a controller reading [z, h] needs M")
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        self.controller = controller.to(self.device).eval()
        self.mdnrnn = mdnrnn.to(self.device).eval() if mdnrnn is not None else None
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self.state = self.mdnrnn.initial_state(1, self.device) if self.mdnrnn is not None else None
        self.z = None  # (1, Z) V's code for the last frame seen
        self.prediction = None  # M's MDNOutput for the coming frame's z
        self.predicted = None  # M's prediction for the last frame seen (None at the start)

    @torch.inference_mode()
    def act(self, frame: np.ndarray) -> np.ndarray:
        """(96, 96, 3) uint8 environment frame -> action (3,) float32."""
        x = to_model_input(preprocess(frame)[None], self.device)  # (1, 3, 64, 64)
        z, _ = self.vae.encode(x)  # (1, Z)
        h = self.state[0] if self.state is not None else None  # (1, H)
        action = self.controller(z, h)  # (1, 3)
        self.z, self.predicted = z, self.prediction
        if self.mdnrnn is not None:
            self.prediction, self.state = self.mdnrnn.step(z, action, self.state)
        return action[0].float().cpu().numpy()


class RandomAgent:
    """The baseline: independent uniform random actions, seeded per episode."""

    def __init__(self):
        self.reset(0)

    def reset(self, seed: int | None = None) -> None:
        self.policy = UniformPolicy(np.random.default_rng(seed))

    def act(self, frame: np.ndarray) -> np.ndarray:
        return self.policy()


def run_episode(env, agent, seed: int,
                on_step: Callable[[np.ndarray, object, float], None] | None = None) -> tuple[float, int]:
    """Drive one episode on the track of `seed` until it ends or the env's
    time limit; returns (total reward, steps). `on_step(frame, agent, score)`
    is called after each action is chosen, before it is taken (for videos)."""
    frame, _ = env.reset(seed=int(seed))
    agent.reset(seed)
    total, steps = 0.0, 0
    while True:
        action = agent.act(frame)
        if on_step is not None:
            on_step(frame, agent, total)
        frame, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        steps += 1
        if terminated or truncated:
            return total, steps


def load_models(ckpt_dir: str | Path, with_m: bool, device: torch.device | str = "cpu"):
    """V, and M when `with_m`, from `ckpt_dir`, frozen -> (vae, mdnrnn or None,
    their fingerprints); an error names the script to run for a missing file."""
    if with_m:
        wm = load_world_model(ckpt_dir, device)  # checks that M was trained on this V
        return wm.vae, wm.mdnrnn, {"vae_fingerprint": wm.vae_fingerprint,
                                   "mdnrnn_fingerprint": wm.mdnrnn_fingerprint}
    ckpt = load_checkpoint(Path(ckpt_dir) / "vae.pt", kind="vae")
    vae = ConvVAE.from_checkpoint(ckpt).to(device).eval().requires_grad_(False)
    return vae, None, {"vae_fingerprint": ckpt["fingerprint"], "mdnrnn_fingerprint": None}


def check_controller(ckpt: dict, path, fingerprints: dict) -> None:
    """Raise one clear line when C was trained with another V or M."""
    for name, script in (("vae", "train_vae.py"), ("mdnrnn", "train_mdnrnn.py")):
        key = f"{name}_fingerprint"
        if ckpt.get(key) != fingerprints[key]:
            raise fail(f"{path} was trained with another {name}.pt (fingerprint {ckpt.get(key)}, "
                       f"this one is {fingerprints[key]}); retrain it with train_controller.py, "
                       f"or bring back the {name}.pt it was trained with")


@dataclass
class AgentSpec:
    """What a worker needs to rebuild the agent: plain values, cheap to send."""
    ckpt_dir: str | None = None  # folder of vae.pt (and mdnrnn.pt); None gives the random baseline
    controller: dict | None = None  # ControllerConfig fields
    fast: bool = True  # the fast twin (training) or the official env (evaluation)
    max_steps: int = 1000  # time limit of an episode (the paper: 1000)


def build_agent(spec: AgentSpec, device: torch.device | str = "cpu"):
    """The agent of `spec`, C's weights left at their initial values."""
    if spec.ckpt_dir is None:
        return RandomAgent()
    controller = Controller(ControllerConfig(**spec.controller))
    vae, mdnrnn, _ = load_models(spec.ckpt_dir, controller.uses_memory, device)
    return Agent(vae, controller, mdnrnn, device)


class EpisodeRunner:
    """A pool worker's state (see wm.pool): the agent and its own environment,
    built once; each task is (C's flat parameters or None, track seed)."""

    def __init__(self, spec: AgentSpec):
        self.agent = build_agent(spec)
        self.env = make_env(fast=spec.fast, max_steps=spec.max_steps)

    def __call__(self, params: np.ndarray | None, seed: int) -> tuple[float, int]:
        if params is not None:
            self.agent.controller.set_flat(params)
        return run_episode(self.env, self.agent, seed)
