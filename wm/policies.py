"""Policies for collecting V and M's training data: two random ones, a
driver that follows the road, and a trained C with noise on its actions. A
policy is called with the environment, which only the scripted driver reads,
and the frame the agent sees, which only C reads."""

from __future__ import annotations

import numpy as np

LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)  # steer, gas, brake
HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)


class UniformPolicy:
    """Independent uniform random actions: jittery, the car barely moves."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, env=None, frame=None) -> np.ndarray:
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

    def __call__(self, env=None, frame=None) -> np.ndarray:
        out = self.action.astype(np.float32)
        self.action = np.clip(self.action + self.scale * self.rng.standard_normal(3), LOW, HIGH)
        return out


class PursuitPolicy:
    """Drives along the road's centre line by pure pursuit, at a target speed
    drawn once per episode from `speeds`, with a smoothed random wobble on the
    steering. It reads the car and the track from the game (privileged: for
    collecting data only, never for C). Slow targets give clean laps; fast
    ones take corners too fast and spin off, so V and M see the road at every
    speed, and what happens past the edge of grip, which random rollouts, mostly
    on the grass at a crawl, hardly show (lucid-dream-racer collects half its
    data this way)."""

    def __init__(self, rng: np.random.Generator, speeds: tuple[float, float] = (30.0, 90.0),
                 lookahead: int = 5, wobble: float = 0.3):
        self.rng = rng
        self.target = rng.uniform(*speeds)
        self.lookahead, self.wobble_scale = lookahead, wobble
        self.wobble = 0.0
        self.xy = None

    def __call__(self, env, frame=None) -> np.ndarray:
        game = env.unwrapped
        if self.xy is None:
            self.xy = np.array([t[2:4] for t in game.track])
        hull = game.car.hull
        pos, angle = np.array(hull.position), hull.angle
        speed = float(np.hypot(*hull.linearVelocity))
        near = int(np.argmin(((self.xy - pos) ** 2).sum(1)))
        # Aim at a point of the centre line further ahead the faster the car goes.
        to = self.xy[(near + self.lookahead + int(speed / 15)) % len(self.xy)] - pos
        right, forward = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
        aim = np.arctan2(to @ right, to @ forward)  # > 0: the point lies to the right
        self.wobble = 0.95 * self.wobble + 0.2 * self.wobble_scale * self.rng.standard_normal()
        steer = np.clip(2.0 * aim + self.wobble, -1, 1)
        # Slow down for a bend, or after a spin: the more the road turns away, the slower.
        target = self.target * max(0.1, 1 - 0.6 * abs(aim))
        gas = np.clip((target - speed) / 20, 0, 1)
        brake = np.clip((speed - 1.2 * target) / 40, 0, 0.8)
        return np.array([steer, gas, brake], dtype=np.float32)


class ControllerPolicy:
    """A trained agent (wm.agent.Agent: its V, M and C) driving, with Gaussian
    noise of std `noise` on each action: the paper's iterative procedure,
    where M learns from the states a competent driver reaches, and the noise
    shows it where that driver's mistakes lead (lucid-dream-racer: std 0.1).
    M's memory follows C's own action, as when C drives alone."""

    def __init__(self, rng: np.random.Generator, agent, noise: float):
        self.rng, self.agent, self.noise = rng, agent, noise
        agent.reset([0])

    def __call__(self, env, frame: np.ndarray) -> np.ndarray:
        action = self.agent.act(frame[None])[0]
        return np.clip(action + self.noise * self.rng.standard_normal(3), LOW, HIGH).astype(np.float32)


POLICIES = {"brownian": BrownianPolicy, "uniform": UniformPolicy, "pursuit": PursuitPolicy}
