"""Random policies for collecting V and M's training data."""

from __future__ import annotations

import numpy as np

LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)  # steer, gas, brake
HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)


class UniformPolicy:
    """Independent uniform random actions: jittery, the car barely moves."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self) -> np.ndarray:
        return self.rng.uniform(LOW, HIGH).astype(np.float32)


class BrownianPolicy:
    """A clipped random walk over actions (as in ctallec/world-models):
    a_{t+1} = clip(a_t + sqrt(dt) * N(0, 1)). Consecutive actions are close,
    so the car holds a steering angle long enough to turn, accelerates, drives
    off the road and back, which shows V and M far more of the track than
    independent random actions."""

    def __init__(self, rng: np.random.Generator, dt: float = 1 / 50):
        self.rng = rng
        self.scale = np.sqrt(dt)
        self.action = rng.uniform(LOW, HIGH)

    def __call__(self) -> np.ndarray:
        out = self.action.astype(np.float32)
        self.action = np.clip(self.action + self.scale * self.rng.standard_normal(3), LOW, HIGH)
        return out


POLICIES = {"brownian": BrownianPolicy, "uniform": UniformPolicy}
