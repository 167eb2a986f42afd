"""The environment, in one place: CarRacing-v3 and its faster pixel-identical twin.

`make_env(fast=False)` is gymnasium's CarRacing-v3 itself (continuous actions,
1000-step limit): evaluation scores on it. `make_env(fast=True)` is
`FastCarRacing` (wm/fast_car_racing.py, which says how), a subclass that
overrides only the rendering internals: the same observations, byte for byte,
several times faster.

Holding an action for k frames (`step_repeat`, the `--action-repeat` of the
scripts): the game's state does not depend on rendering, so on the fast twin
the k - 1 frames the agent never sees skip it (`render_observations`), and an
agent step costs about one render instead of k. On the stock environment every
frame is stepped as it comes.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np

from wm.fast_car_racing import FastCarRacing

ENV_ID = "CarRacing-v3"
FAST_ENV_ID = "FastCarRacing-v3"
MAX_EPISODE_STEPS = 1000  # as gymnasium registers CarRacing-v3

# Track seeds, in one place: each use has its own range, so no track serves two.
#   evaluation  [0, 10,000)           evaluate.py's episode i drives EVAL_SEED + i
#   collection  [10,000, 100,000)     collect_rollouts.py's rollout i drives COLLECT_SEED + i;
#                                     V and M learn from these, and dreams start from
#                                     their first frames, which show the whole track
#   held-out    [100,000, 1,000,000)  train_controller.py's held-out track i is HELD_OUT_SEED + i
#   training    [1,000,000, 2**31)    C's (and experiments/train_ppo.py's) training tracks, drawn at random
EVAL_SEED = 0
COLLECT_SEED = 10_000
HELD_OUT_SEED = 100_000
TRAIN_SEED = 1_000_000
SEED_LIMIT = 2**31

gym.register(id=FAST_ENV_ID, entry_point=FastCarRacing, max_episode_steps=MAX_EPISODE_STEPS,
             reward_threshold=900)


def step_repeat(env: gym.Env, action, k: int = 1, render: bool = True) -> tuple[np.ndarray, float, bool, bool, int]:
    """One agent step: `action` held for up to k frames -> (observation,
    summed reward, terminated, truncated, frames stepped).

    It stops early at a frame that ends the episode (the time limit of
    make_env counts frames). On the fast twin only the k-th frame is rendered;
    an episode that ends on an earlier frame returns the last rendered
    observation, up to k - 1 frames old (nothing reads the frame after an
    episode's last step: rollouts store the frame seen before each action,
    and the agent loop drops an ended episode). k = 1 is env.step itself.
    render=False renders none of them on the fast twin (a replay back to a
    state, whose frames nobody sees): the observation is then stale."""
    if k < 1:
        raise ValueError(f"an action is held for at least 1 frame, got {k}")
    game = getattr(env, "unwrapped", env)  # test stand-ins may be bare
    fast = isinstance(game, FastCarRacing)
    total = 0.0
    try:
        for n in range(1, k + 1):
            if fast:
                game.render_observations = render and n == k
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            if terminated or truncated:
                break
    finally:
        if fast:
            game.render_observations = True
    return obs, total, terminated, truncated, n


def make_env(fast: bool = True, render_mode: str | None = None,
             max_steps: int = MAX_EPISODE_STEPS) -> gym.Env:
    """CarRacing-v3 as gymnasium registers it (continuous actions, a time limit
    of `max_steps`), or its pixel-identical faster twin when `fast`."""
    return gym.make(FAST_ENV_ID if fast else ENV_ID, render_mode=render_mode,
                    max_episode_steps=max_steps)


class DrivingLog(gym.Wrapper):
    """How the car is driven, frame by frame: the action taken and the car's
    speed, for `evaluate.py --drive-stats`. A bang-bang driver (steering hard
    one way, then the other, at each decision) shows as many steering sign
    flips; a timid one as little gas and a low top speed."""

    def reset(self, **kwargs):
        self.actions, self.speeds = [], []
        return super().reset(**kwargs)

    def step(self, action):
        out = super().step(action)
        vx, vy = self.unwrapped.car.hull.linearVelocity
        self.actions.append(np.asarray(action, dtype=np.float64))
        self.speeds.append(math.hypot(vx, vy))  # the game's own speed bar reads this
        return out

    def summary(self, action_repeat: int = 1) -> dict:
        """The last episode's driving, per decision (an action held for
        `action_repeat` frames counts once): the share of decisions whose
        steering has the other sign than the one before, mean |steer|, mean
        gas and brake, and the top speed."""
        actions = np.stack(self.actions)[::action_repeat]  # (decisions, 3)
        steer, gas, brake = actions.T
        flips = np.sign(steer[1:]) * np.sign(steer[:-1]) < 0
        return {"steer_flips": float(flips.mean()) if len(flips) else 0.0,
                "abs_steer": float(np.abs(steer).mean()), "gas": float(gas.mean()),
                "brake": float(brake.mean()), "top_speed": float(max(self.speeds)),
                "frames": len(self.actions)}

    @staticmethod
    def describe(d: dict) -> str:
        """A `summary` in one line."""
        return (f"steer flips {d['steer_flips']:.0%}  |steer| {d['abs_steer']:.2f}  gas {d['gas']:.2f}  "
                f"brake {d['brake']:.2f}  top speed {d['top_speed']:.0f}")
