"""The fast environment against gymnasium's own CarRacing-v3, pixel for pixel."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pygame
import pytest
from gymnasium.utils.env_checker import check_env

from wm.env import ENV_ID, FAST_ENV_ID, DrivingLog, make_env, step_repeat
from wm.fast_car_racing import FastCarRacing, rotate_like_pygame
from wm.frames import preprocess, to_image, to_model_input
from wm.policies import BrownianPolicy


def drive_off_the_map(t: int) -> np.ndarray:
    """Weave for a while (the view rotates), then go straight: the car visits
    road tiles, runs onto the grass, and leaves the playfield (termination)."""
    steer = 0.6 * math.sin(t / 15) if t < 150 else 0.0
    return np.array([steer, 1.0 if t % 3 else 0.0, 0.0], dtype=np.float32)


def compare(actions_fn, seed: int, steps: int):
    """Step both environments with the same actions; return what happened."""
    stock, fast = make_env(fast=False), make_env(fast=True)
    a, _ = stock.reset(seed=seed)
    b, _ = fast.reset(seed=seed)
    assert np.array_equal(a, b), "first frame differs"
    seen = {"on_grass": False, "terminated": False, "tiles": 0, "steps": 0}
    for t in range(steps):
        action = actions_fn(t)
        a, ra, ta, tra, ia = stock.step(action)
        b, rb, tb, trb, ib = fast.step(action)
        assert np.array_equal(a, b), f"frame {t + 1} differs in {int((a != b).any(-1).sum())} pixels"
        assert (ra, ta, tra, ia) == (rb, tb, trb, ib)
        car = fast.unwrapped.car
        seen["on_grass"] |= all(len(w.tiles) == 0 for w in car.wheels)
        seen["tiles"] = fast.unwrapped.tile_visited_count
        seen["steps"] = t + 1
        if ta or tra:
            seen["terminated"] = ta and ia.get("lap_finished") is False
            break
    return seen


def test_pixel_identical_through_zoom_tiles_grass_and_leaving_the_playfield():
    seen = compare(drive_off_the_map, seed=1, steps=1000)
    assert seen["steps"] > 50  # the zoom-in of the first second was covered
    assert seen["tiles"] > 5  # visited tiles changed colour in place
    assert seen["on_grass"]
    assert seen["terminated"]  # left the playfield: -100 and the episode ends


def test_pixel_identical_under_a_random_walk():
    policy = BrownianPolicy(np.random.default_rng(7))
    actions = [policy() for _ in range(300)]
    seen = compare(lambda t: actions[t], seed=7, steps=300)
    assert seen["steps"] == 300


def test_pixel_identical_when_a_bar_grows_above_the_dashboard():
    """A wheel spinning fast enough draws its bar above the dashboard, into
    the road rows; the fast route must notice and give the stock pixels."""
    stock, fast = make_env(fast=False), make_env(fast=True)
    for env in (stock, fast):
        env.reset(seed=3)
        for _ in range(60):
            env.step(np.array([0.0, 1.0, 0.0], dtype=np.float32))
        env.unwrapped.car.wheels[2].omega = 600.0  # a bar of 1 + 6 units: 140 px, the dashboard is 100
    assert fast.unwrapped._bars_leave_dashboard()
    a, b = stock.unwrapped._render("state_pixels"), fast.unwrapped._render("state_pixels")
    assert np.array_equal(a, b)


def test_held_actions_skip_unseen_renders_and_match_the_stock_env_frame_by_frame():
    """The fast twin holding each action for 3 frames (rendering only the 3rd)
    against the stock env stepped every frame: the same observation every 3rd
    frame, the same summed rewards, and the same end, here the time limit
    falling on the first frame of an agent step."""
    k, limit = 3, 121  # 40 full agent steps, then one frame
    stock, fast = make_env(fast=False, max_steps=limit), make_env(fast=True, max_steps=limit)
    a, _ = stock.reset(seed=1)
    b, _ = fast.reset(seed=1)
    frames = 0
    for t in range(100):
        action = drive_off_the_map(t)
        reward, n = 0.0, 0
        while n < k:
            a, r, term_a, trunc_a, _ = stock.step(action)
            reward, n = reward + r, n + 1
            if term_a or trunc_a:
                break
        b, total, term_b, trunc_b, n_b = step_repeat(fast, action, k)
        frames += n_b
        assert (n_b, total, term_b, trunc_b) == (n, reward, term_a, trunc_a), f"agent step {t}"
        if term_b or trunc_b:
            break
        assert np.array_equal(a, b), f"agent step {t}: {int((a != b).any(-1).sum())} pixels differ"
    assert (frames, t, trunc_b, n_b) == (limit, 40, True, 1)  # the limit counted frames
    assert fast.unwrapped.tile_visited_count > 3  # the car went over road tiles (6 of them)
    assert fast.unwrapped.render_observations  # the next plain step renders again


def test_held_action_stops_at_the_frame_that_ends_the_episode():
    class EndsAtFrame5:
        def __init__(self):
            self.t = 0

        def step(self, action):
            self.t += 1
            return self.t, 1.0, self.t == 5, False, {}

    env = EndsAtFrame5()
    assert step_repeat(env, None, 3) == (3, 3.0, False, False, 3)
    assert step_repeat(env, None, 3) == (5, 2.0, True, False, 2)
    with pytest.raises(ValueError):
        step_repeat(env, None, 0)


def test_rotation_matches_pygame_including_quarter_turns():
    rng = np.random.default_rng(0)
    angles = list(rng.uniform(-30, 30, 300))
    angles += [k * math.pi / 2 + d for k in range(-6, 7) for d in (0.0, 3e-7, -3e-7, 3e-6)]
    for angle in angles:
        pts = rng.uniform(-500, 500, (8, 2))
        ref = np.array([tuple(pygame.math.Vector2(tuple(p)).rotate_rad(angle)) for p in pts])
        assert np.array_equal(rotate_like_pygame(pts, angle), ref), angle


def test_passes_gymnasium_env_checker():
    check_env(gym.make(FAST_ENV_ID).unwrapped)  # via make, so render modes are checked too


def test_registered_under_its_own_id_with_the_stock_limits():
    env = gym.make(FAST_ENV_ID)
    assert isinstance(env.unwrapped, FastCarRacing)
    assert env.spec.max_episode_steps == gym.spec(ENV_ID).max_episode_steps == 1000
    assert env.action_space == gym.make(ENV_ID).action_space
    assert type(make_env(fast=False).unwrapped).__name__ == "CarRacing"


def test_time_limit_truncates():
    env = make_env(fast=True, max_steps=5)
    env.reset(seed=0)
    flags = [env.step(np.zeros(3, np.float32))[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]


def test_preprocess_drops_the_dashboard_and_resizes():
    frame = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    out = preprocess(frame)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    changed = frame.copy()
    changed[84:] = 0  # only the dashboard
    assert np.array_equal(preprocess(changed), out)
    changed[:84] = 0
    assert not np.array_equal(preprocess(changed), out)
    with pytest.raises(ValueError):
        preprocess(frame[:90])


def test_model_input_scales_to_unit_range_and_back():
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = to_model_input(frames)
    assert x.shape == (2, 3, 64, 64) and x.min() >= 0 and x.max() <= 1
    assert np.array_equal(to_image(x), frames)


def test_the_driving_log_counts_decisions_and_reads_the_game_s_speed():
    env = DrivingLog(make_env(fast=True))
    env.reset(seed=3)
    decisions = [(0.5, 1.0, 0.0), (-0.5, 1.0, 0.0), (-0.5, 1.0, 0.0), (0.0, 1.0, 0.0), (0.3, 0.0, 0.5)]
    speeds = []
    for action in decisions:
        step_repeat(env, np.array(action), 2)  # each decision held 2 frames
        vx, vy = env.unwrapped.car.hull.linearVelocity
        speeds.append(float(np.linalg.norm([vx, vy])))
    d = env.summary(action_repeat=2)
    # By hand: of the 4 pairs of decisions only (0.5, -0.5) changes sign (0 has none).
    assert d["steer_flips"] == pytest.approx(1 / 4) and d["frames"] == 10
    assert d["abs_steer"] == pytest.approx(np.mean([0.5, 0.5, 0.5, 0.0, 0.3]))
    assert d["gas"] == pytest.approx(0.8) and d["brake"] == pytest.approx(0.1)
    # Full gas from rest speeds the car up; the top speed is the fastest frame's.
    assert 0 < speeds[0] < speeds[3] and d["top_speed"] >= max(speeds)
    # Read per frame: summarised per frame, the same actions count every decision twice.
    assert env.summary(action_repeat=1)["steer_flips"] == pytest.approx(1 / 9)
    env.reset(seed=3)
    assert env.actions == [] and env.speeds == []  # a new episode starts a new log
    env.close()
