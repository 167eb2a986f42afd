"""C, the agent loop, the worker pool and train_controller.py."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import pool_workers, run_script, start_script, write_tiny_world_model

from models.controller import Controller, ControllerConfig
from wm.agent import Agent, AgentSpec, EpisodeRunner, load_models, map_episodes, run_episode, run_episodes
from wm.checkpoint import load_checkpoint
from wm.cli import UsageError, parse_config
from wm.env import make_env
from wm.pool import WorkerError, WorkerPool
from wm.search import Search

import train_controller
from train_controller import Config


def tiny_run(ckpt_dir, generations: int = 1) -> list[str]:
    return ["train_controller.py", "--ckpt-dir", str(ckpt_dir), "--pop-size", "4",
            "--rollouts-per-member", "1", "--generations", str(generations), "--max-steps", "30",
            "--workers", "2", "--eval-episodes", "2"]


# --- C ----------------------------------------------------------------------

def test_parameter_counts_match_the_paper():
    assert Controller(ControllerConfig(features="zh")).n_params == 867  # (32 + 256) * 3 + 3
    assert Controller(ControllerConfig(features="z")).n_params == 99  # 32 * 3 + 3
    assert Controller(ControllerConfig(features="z-hidden")).n_params == 32 * 40 + 40 + 40 * 3 + 3


@pytest.mark.parametrize("features", ["zh", "z", "z-hidden"])
def test_actions_stay_in_range_for_any_input(features):
    torch.manual_seed(0)
    c = Controller(ControllerConfig(features=features))
    c.set_flat(np.random.default_rng(0).normal(0, 10, c.n_params))  # saturating weights
    a = c(torch.randn(500, 32) * 100, torch.randn(500, 256) * 100)
    assert a.shape == (500, 3)
    assert a[:, 0].min() >= -1 and a[:, 0].max() <= 1
    assert a[:, 1:].min() >= 0 and a[:, 1:].max() <= 1
    # Both ends are reachable: full left and right, no gas and full gas, no brake.
    assert a[:, 0].min() < -0.99 and a[:, 0].max() > 0.99
    assert a[:, 1].min() < 0.01 and a[:, 1].max() > 0.99
    assert (a[:, 2] == 0).any()


def test_flat_vector_round_trip():
    c = Controller(ControllerConfig(latent_size=8, hidden_size=16))
    flat = np.random.default_rng(1).normal(size=c.n_params)
    c.set_flat(flat)
    np.testing.assert_allclose(c.get_flat(), flat, rtol=1e-6)
    assert torch.equal(c.net.bias, torch.as_tensor(flat[-3:], dtype=torch.float32))
    c2 = Controller(c.cfg)
    c2.set_flat(c.get_flat())
    z, h = torch.randn(4, 8), torch.randn(4, 16)
    assert torch.equal(c(z, h), c2(z, h))
    with pytest.raises(ValueError, match="expected 75 parameters"):
        c.set_flat(flat[:-1])


# --- the agent loop -----------------------------------------------------------

def test_agent_acts_on_v_mu_and_m_hidden_state(tmp_path):
    write_tiny_world_model(tmp_path)
    vae, mdnrnn, _ = load_models(tmp_path, with_m=True)
    c = Controller(ControllerConfig(latent_size=8, hidden_size=16))
    c.set_flat(np.random.default_rng(0).normal(size=c.n_params))
    agent = Agent(vae, c, mdnrnn)
    env = make_env(fast=True, max_steps=5)
    frame, _ = env.reset(seed=3)
    agent.reset([3])
    state = mdnrnn.initial_state(1)
    with torch.no_grad():
        for _ in range(3):
            from wm.frames import preprocess, to_model_input

            mu, _ = vae.encode(to_model_input(preprocess(frame, vae.cfg.view)[None]))
            expected = c(mu, state[0])
            _, state = mdnrnn.step(mu, expected, state)
            action = agent.act(frame[None])[0]
            np.testing.assert_allclose(action, expected[0].numpy(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(agent.state[0], state[0])
            frame, *_ = env.step(action)
    assert not torch.equal(agent.state[0], torch.zeros_like(state[0]))  # h moved


class RecordActions:
    """An environment that remembers the actions it was given."""

    def __init__(self, env):
        self.env, self.actions = env, []

    def reset(self, **kw):
        self.actions = []
        return self.env.reset(**kw)

    def step(self, action):
        self.actions.append(np.array(action))
        return self.env.step(action)


@pytest.mark.parametrize("features", ["zh", "z-hidden"])
def test_a_batch_of_episodes_scores_exactly_as_each_one_alone(tmp_path, features):
    write_tiny_world_model(tmp_path)
    vae, mdnrnn, _ = load_models(tmp_path, with_m=True)
    c = Controller(ControllerConfig(latent_size=8, hidden_size=16, features=features))
    agent = Agent(vae, c, mdnrnn if c.uses_memory else None)
    params = np.random.default_rng(0).normal(0, 2, (4, c.n_params))  # a C per episode
    params[:, -2] += 3  # full gas: the cars reach the road's tiles
    seeds = [7, 8, 7, 9]
    # Different time limits, so that episodes leave the batch at different steps.
    limits = [35, 12, 25, 30]
    envs = [RecordActions(make_env(fast=True, max_steps=n)) for n in limits]
    batched = run_episodes(envs, agent, seeds, params)
    actions = [e.actions for e in envs]
    assert [n for _, n in batched] == limits
    alone = []
    for i in range(4):
        alone += run_episodes([envs[i]], agent, [seeds[i]], params[i:i + 1])
        # The same actions up to float rounding (the matrix library rounds a
        # product of 1 row differently from one of 4), and so the same rewards.
        np.testing.assert_allclose(np.stack(envs[i].actions), np.stack(actions[i]), atol=1e-5)
    assert batched == alone
    assert max(score for score, _ in batched) > 0  # some car touched new tiles: scores say something
    assert len({round(score, 3) for score, _ in batched}) > 2


class HoldsItsAction:
    """An agent that takes `actions[j]` on every call from the hold * j-th to
    the next: hold = 2 at action repeat 1 gives the frames what action repeat
    2 gives them with hold = 1."""

    def __init__(self, actions, hold: int):
        self.actions, self.hold = actions, hold

    def reset(self, seeds, params=None):
        self.calls = 0

    def act(self, frames):
        self.calls += 1
        return self.actions[(self.calls - 1) // self.hold][None]

    def keep(self, rows):
        pass


def test_action_repeat_counts_frames_and_scores_what_the_same_frames_score():
    actions = np.array([[np.sin(j / 5), 1.0 if j % 3 else 0.0, 0.0] for j in range(30)], np.float32)
    runs = {}
    for k in (1, 2):
        env = RecordActions(make_env(fast=True, max_steps=41))  # odd: the last agent step is 1 frame
        runs[k] = run_episodes([env], HoldsItsAction(actions, hold=3 - k), [5], action_repeat=k)[0]
        runs[k, "frames"] = np.stack(env.actions)
    np.testing.assert_array_equal(runs[1, "frames"], runs[2, "frames"])  # the same action every frame
    assert runs[1][1] == runs[2][1] == 41  # frames, not the 21 decisions of k = 2
    # The same rewards, summed two frames at a time instead of one: equal up to rounding.
    assert runs[2][0] == pytest.approx(runs[1][0], abs=1e-9) and runs[1][0] > 0
    # The early stop counts idle frames: a car that stands still is paid for the
    # start tile on frame 1, then stops at the first agent step that reaches 10
    # idle frames (11 = 1 + 10; 15 = 3 + 12 at k = 3), charged the frames left:
    # what it scores standing still to the time limit.
    still = np.zeros((41, 3), np.float32)
    (r1, n1), (r3, n3), (r_full, n_full) = (
        run_episodes([make_env(fast=True, max_steps=41)], HoldsItsAction(still, 1), [5], patience=p,
                     action_repeat=k)[0] for k, p in ((1, 10), (3, 10), (1, 0)))
    assert (n1, n3, n_full) == (11, 15, 41)
    assert r1 == pytest.approx(r_full) and r3 == pytest.approx(r_full)


def test_an_episode_runner_holds_actions_for_its_spec_s_frames():
    from wm.agent import RandomAgent

    calls = []
    runner = EpisodeRunner(AgentSpec(max_steps=9, action_repeat=3))  # the random agent, on the fast env
    act = runner.agent.act
    runner.agent.act = lambda frames: calls.append(len(frames)) or act(frames)
    assert isinstance(runner.agent, RandomAgent) and [n for _, n in runner(None, [1, 2])] == [9, 9]
    assert calls == [2, 2, 2]


class ScriptedRewards:
    """A stand-in environment that pays `rewards[t]` at step t (then -0.1), so
    that the early stop's arithmetic can be checked by hand."""

    def __init__(self, rewards, max_steps=100):
        self.rewards, self.max_steps = rewards, max_steps
        self.spec = SimpleNamespace(max_episode_steps=max_steps)  # the time limit, as gym.make records it

    def reset(self, seed=None):
        self.t = 0
        return np.zeros((96, 96, 3), np.uint8), {}

    def step(self, action):
        r = self.rewards[self.t] if self.t < len(self.rewards) else -0.1
        self.t += 1
        return np.zeros((96, 96, 3), np.uint8), r, False, self.t >= self.max_steps, {}


def test_early_stop_ends_idle_episodes_and_charges_the_steps_left():
    from wm.agent import RandomAgent

    # Episode 0 finds tiles for 5 steps then nothing; episode 1 finds one at its 15th step.
    pay0 = [3.0] * 5
    pay1 = [-0.1] * 14 + [3.0]
    envs = [ScriptedRewards(pay0), ScriptedRewards(pay1)]
    (r0, n0), (r1, n1) = run_episodes(envs, RandomAgent(), [0, 1], patience=20)
    assert n0 == 25 and r0 == pytest.approx(15.0 - 0.1 * 20 - 0.1 * 75)
    assert n1 == 35 and r1 == pytest.approx(3.0 - 0.1 * 14 - 0.1 * 20 - 0.1 * 65)
    # Without patience the same episodes run to the time limit, and a stopped
    # episode scores what it would have scored had it found no tile after the stop.
    full = run_episodes([ScriptedRewards(pay0), ScriptedRewards(pay1)], RandomAgent(), [0, 1])
    assert [n for _, n in full] == [100, 100]
    assert [r for r, _ in full] == pytest.approx([r0, r1])


def test_early_stop_flag_saves_frames_in_training_only(tmp_path):
    write_tiny_world_model(tmp_path)
    common = dict(pop_size=4, rollouts_per_member=2, generations=1, max_steps=60, workers=1,
                  eval_episodes=2)
    for patience, folder in ((0, tmp_path), (5, tmp_path / "early")):
        if patience:
            write_tiny_world_model(folder)
        train_controller.main(Config(ckpt_dir=str(folder), patience=patience, **common))
    rows = [(folder / "controller_metrics.csv").read_text().splitlines() for folder in (tmp_path, tmp_path / "early")]
    frames = [int(float(r[1].split(",")[r[0].split(",").index("frames")])) for r in rows]
    # Without the stop every episode runs its 60 steps: 4 x 2 training and 2 held-out.
    assert frames[0] == 10 * 60
    # With it the training episodes stop, but the held-out ones still run all 60 steps.
    assert 2 * 60 <= frames[1] < frames[0]


def test_race_drives_the_rest_of_the_tracks_with_the_better_half_only(monkeypatch):
    """Successive halving, with a stub for the pool: member i scores 10 i + the
    track's seed on every track, except member 1, which scores 100 on the
    first half and 0 on the rest."""
    driven = []

    def drive(pool, tasks, batch_size, what, patience=0):
        driven.extend(tasks)
        return [((100.0 if s < 12 else 0.0) if x[0] == 1 else 10.0 * x[0] + s, 7) for x, s in tasks]

    monkeypatch.setattr(train_controller, "run_in_pool", drive)
    solutions = [np.full(3, float(i)) for i in range(6)]
    fitness = train_controller.RealFitness(pool=None, batch_size=16, race=True)
    rewards, steps = fitness(solutions, [10, 11, 12, 13])
    # First half (tracks 10, 11): member 1 scores 100, the others 10 i + 10.5; the
    # better half is members 5, 1 and 4, which then drive tracks 12 and 13 too.
    assert fitness.survivors.tolist() == [False, True, False, False, True, True]
    assert sorted((int(x[0]), s) for x, s in driven if s >= 12) == [(1, 12), (1, 13), (4, 12), (4, 13),
                                                                     (5, 12), (5, 13)]
    np.testing.assert_allclose(rewards, [10.5, 50.0, 30.5, 40.5, 51.5, 61.5])
    assert steps == 7 * (6 * 2 + 3 * 2)
    # CMA-ES ranks every member that drove all tracks above the others, however
    # they scored on the rest: member 1 (50) above member 3 (40.5 on two tracks).
    assert train_controller.race_ranking(rewards, fitness.survivors).tolist() == [5, 2, 4, 3, 1, 0]


def test_race_flag_runs_the_script_and_counts_the_frames_it_drove(tmp_path, capsys):
    write_tiny_world_model(tmp_path)
    train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4, rollouts_per_member=2, generations=1,
                                 max_steps=60, workers=1, eval_episodes=1, race=True))
    assert "(racing: the better half drives the second half of them)" in capsys.readouterr().out
    rows = (tmp_path / "controller_metrics.csv").read_text().splitlines()
    frames = int(float(rows[1].split(",")[rows[0].split(",").index("frames")]))
    # 4 members on the first track, the better 2 on the second, 1 held-out track: 60 frames each.
    assert frames == (4 + 2 + 1) * 60


# --- the worker pool ------------------------------------------------------------

def test_pool_returns_results_in_task_order_as_one_process_would():
    seeds = [4, 5, 6]
    env, runner_spec = make_env(fast=True, max_steps=20), AgentSpec(max_steps=20)
    local = EpisodeRunner(runner_spec)
    expected = [run_episode(env, local.agent, s) for s in seeds]
    with WorkerPool(2, EpisodeRunner, runner_spec) as pool:
        assert pool.map([(None, [s]) for s in seeds]) == [[e] for e in expected]
        assert pool.map([(None, seeds[::-1])]) == [expected[::-1]]  # one batch of three
        for batch_size in (1, 2, 16):
            assert map_episodes(pool, [(None, s) for s in seeds], batch_size) == expected


def test_the_agent_with_v_and_m_scores_in_the_pool_what_it_scores_in_process(tmp_path):
    from dataclasses import asdict

    write_tiny_world_model(tmp_path)
    vae, mdnrnn, _ = load_models(tmp_path, with_m=True)
    c = Controller(ControllerConfig(latent_size=8, hidden_size=16))
    params = np.random.default_rng(0).normal(0, 2, (2, c.n_params))  # a C per episode, on [z, h]
    params[:, -2] += 3  # full gas: the cars reach the road's tiles
    seeds = [7, 8]
    agent = Agent(vae, c, mdnrnn)
    alone = [run_episodes([make_env(fast=True, max_steps=40)], agent, [s], p[None])[0]
             for p, s in zip(params, seeds)]
    assert alone[0][0] != alone[1][0]  # the scores say something
    # The workers load V and M from the files, and get C's weights with each task.
    spec = AgentSpec(ckpt_dir=str(tmp_path), controller=asdict(c.cfg), max_steps=40)
    with WorkerPool(1, EpisodeRunner, spec) as pool:
        assert map_episodes(pool, list(zip(params, seeds)), batch_size=1) == alone


@pytest.mark.parametrize("fault, message", [("raise", "injected fault"), ("exit", "died .*exit code 3")])
def test_pool_surfaces_a_failing_worker_within_seconds(monkeypatch, fault, message):
    monkeypatch.setenv("WM_FAULT", fault)

    def hung(*_):
        raise TimeoutError("the pool hung on a failed worker")

    # A pool that hangs would hang the test suite too: an alarm turns it into a failure.
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        with WorkerPool(2, EpisodeRunner, AgentSpec(max_steps=20)) as pool:
            t0 = time.time()
            with pytest.raises(WorkerError, match=message):
                pool.map([(None, [s]) for s in range(4)])
            assert time.time() - t0 < 10
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_worker_that_imports_torch_late_gets_one_thread(tmp_path, monkeypatch):
    """A runner whose module loads torch only when it is built (a rollout
    collector's driving C) still runs torch on one thread: two processes of
    two threads each on two cores spent half their time in the kernel."""
    (tmp_path / "late_torch.py").write_text(
        "class Threads:\n"
        "    def __init__(self):\n"
        "        import torch\n"
        "        self.torch = torch\n"
        "    def __call__(self):\n"
        "        return self.torch.get_num_threads()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers take the parent's sys.path
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    import late_torch

    with WorkerPool(2, late_torch.Threads) as pool:
        assert pool.map([(), ()]) == [1, 1]


def test_pool_surfaces_a_worker_that_fails_to_start(tmp_path):
    spec = AgentSpec(ckpt_dir=str(tmp_path), controller={"features": "z"})  # no vae.pt there
    with pytest.raises(WorkerError, match="failed while starting(.|\n)*vae.pt not found"):
        WorkerPool(1, EpisodeRunner, spec)


# --- train_controller.py ----------------------------------------------------------

def test_one_generation_then_resume(tmp_path):
    write_tiny_world_model(tmp_path)
    p = start_script(*tiny_run(tmp_path, generations=1))
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert "generation 1  mean" in out
    ckpt = load_checkpoint(tmp_path / "controller.pt", kind="controller")
    fingerprints = load_models(tmp_path, with_m=True)[2]
    assert ckpt["vae_fingerprint"] == fingerprints["vae_fingerprint"]
    assert ckpt["mdnrnn_fingerprint"] == fingerprints["mdnrnn_fingerprint"]
    assert ckpt["generation"] == 1 and ckpt["model_args"]["features"] == "zh"
    assert Controller.from_checkpoint(ckpt).n_params == (8 + 16) * 3 + 3
    assert (tmp_path / "controller_reward.png").stat().st_size > 0
    assert (tmp_path / "controller_es.npz").is_file()

    # A rerun with more generations picks up at generation 2, in process this time.
    state = train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4, rollouts_per_member=1,
                                         generations=2, max_steps=30, workers=1, eval_episodes=2))
    assert state["generation"] == 2 and state["es"].countiter == 2
    # ... and lands exactly where an uninterrupted run of two generations does.
    straight = tmp_path / "straight"
    write_tiny_world_model(straight)
    uninterrupted = train_controller.main(Config(
        ckpt_dir=str(straight), pop_size=4, rollouts_per_member=1, generations=2, max_steps=30,
        workers=1, eval_episodes=2))
    np.testing.assert_array_equal(state["es"].result.xfavorite, uninterrupted["es"].result.xfavorite)
    rows = train_controller.MetricsLog(tmp_path / "controller_metrics.csv").rows()
    assert [r["generation"] for r in rows] == ["1", "2"]
    # CMA-ES's best (it minimises) is the best member's reward, negated; and members
    # scored differently, so where it lands depends on which got which reward.
    assert state["es"].result.fbest == pytest.approx(-max(float(r["best"]) for r in rows))
    assert all(float(r["best"]) > float(r["worst"]) for r in rows)
    # A finished run has nothing left to do, and says so instead of starting over.
    state = train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4, generations=2))
    assert state["es"].countiter == 2
    # --restart starts over: the metrics of the old run are dropped.
    train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4, rollouts_per_member=1,
                                 generations=1, max_steps=30, workers=1, eval_episodes=1,
                                 restart=True))
    rows = (tmp_path / "controller_metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["generation", "1"]


def test_more_held_out_tracks_on_a_resume_score_controller_pt_again_first(tmp_path, capsys):
    """controller.pt's held-out score was on the old tracks; a resume with
    another --eval-episodes scores it on the new ones before it is compared
    with a later CMA-ES mean, and then only once."""
    write_tiny_world_model(tmp_path)

    def run(generations, eval_episodes):
        return train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4, rollouts_per_member=1,
                                            generations=generations, max_steps=30, workers=1,
                                            eval_every=1, eval_episodes=eval_episodes))

    run(1, eval_episodes=1)
    before = load_checkpoint(tmp_path / "controller.pt", kind="controller")
    capsys.readouterr()
    state = run(2, eval_episodes=3)
    # What controller.pt scores on held-out tracks 0..2, driven here with the training's own agent loop.
    c = Controller.from_checkpoint(before)
    spec = AgentSpec(ckpt_dir=str(tmp_path), controller=before["model_args"], fast=True, max_steps=30)
    expected = np.mean([r for r, _ in EpisodeRunner(spec)(c.get_flat()[None].repeat(3, 0),
                                                          [train_controller.HELD_OUT_SEED + i for i in range(3)])])
    assert f"controller.pt (generation 1) scored again on 3 held-out tracks: {expected:.1f} " \
           f"(it had {before['held_out']:.1f} on the old ones)" in capsys.readouterr().out
    rows = train_controller.MetricsLog(tmp_path / "controller_metrics.csv").rows()
    assert state["best_held_out"] == pytest.approx(max(expected, float(rows[1]["held_out"])))
    after = load_checkpoint(tmp_path / "controller.pt", kind="controller")
    assert after["generation"] == (2 if float(rows[1]["held_out"]) > expected else 1)
    # controller.pt holds the best C with its score on the new tracks: generation 1's
    # weights scored again, or generation 2's.
    assert after["held_out"] == pytest.approx(state["best_held_out"])
    if after["generation"] == 1:  # (these seeds: generation 1 stays)
        torch.testing.assert_close(after["model"], before["model"])
    run(3, eval_episodes=3)  # the same tracks: nothing to score again
    assert "scored again" not in capsys.readouterr().out


def test_cma_es_moves_c_toward_higher_rewards_each_its_own_member_s(tmp_path, monkeypatch):
    """train_controller's own loop, with a stub fitness in the pool's place
    that gives every member its own reward: -||x - target||^2."""
    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)  # C: (2 + 2) * 3 + 3 weights
    target = np.random.default_rng(0).normal(size=15)
    told = []

    def fitness(solutions, seeds):
        rewards = np.array([-np.sum((x - target) ** 2) for x in solutions])
        told.append(rewards)
        return rewards, 0

    monkeypatch.setattr(train_controller, "RealFitness", lambda *args: fitness)
    state = train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=8, sigma0=0.5, generations=10,
                                         rollouts_per_member=1, max_steps=5, workers=1, eval_episodes=1))
    es = state["es"]
    assert np.linalg.norm(es.result.xfavorite - target) < 0.5 * np.linalg.norm(target)  # it started at 0
    # The best solution CMA-ES was told of carries its own reward, the highest of all, negated.
    assert es.result.fbest == -max(r.max() for r in told)
    assert es.result.fbest == pytest.approx(np.sum((es.result.xbest - target) ** 2), rel=1e-12)


def test_reset_sigma_widens_a_resumed_search_once(tmp_path, monkeypatch):
    """--reset-sigma sets the step size of the resumed CMA-ES and keeps its mean;
    the same command rerun after an interruption goes on from the widened
    search's own step size instead of widening it again."""
    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    asked = []  # (step size, mean) that each generation's members were drawn with
    ask = Search.ask  # a resume's replay of the generations before does not go through it
    monkeypatch.setattr(Search, "ask", lambda s: asked.append((s.es.sigma, s.es.mean.copy())) or ask(s))
    monkeypatch.setattr(train_controller, "RealFitness",
                        lambda *args: lambda xs, seeds: (np.array([-np.sum((x - 1) ** 2) for x in xs]), 0))

    def run(generations, **flags):
        return train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=8, sigma0=0.5, generations=generations,
                                            rollouts_per_member=1, max_steps=5, workers=1, eval_episodes=1, **flags))

    before = run(2)["es"]
    after = run(3, reset_sigma=2.0)["es"]
    assert asked[2][0] == 2.0 != before.sigma
    np.testing.assert_array_equal(asked[2][1], before.mean)  # not a restart from zero
    assert np.abs(before.mean).max() > 0
    run(4, reset_sigma=2.0)
    assert asked[3][0] == after.sigma != 2.0
    # A fresh run has no step size to reset: --sigma0 is its own.
    run(1, reset_sigma=2.0, restart=True)
    assert asked[4][0] == 0.5


def test_init_from_starts_a_fresh_search_at_that_c_s_weights(tmp_path, monkeypatch, capsys):
    """--init-from (a warm start, e.g. from a C trained in M's dream) puts a
    fresh search's mean at that controller.pt's weights; a resume goes on from
    its own state; a C of another shape, V, M or k is refused in one line."""
    import shutil

    from conftest import write_tiny_controller

    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    warm = tmp_path / "dream"
    warm.mkdir()
    for name in ("vae.pt", "mdnrnn.pt"):
        shutil.copy(tmp_path / name, warm / name)
    warm_c = write_tiny_controller(warm, seed=3)
    x0 = Controller.from_checkpoint(load_checkpoint(warm_c, "controller")).get_flat()
    assert np.abs(x0).max() > 0
    asked = []  # the mean each generation's members were drawn around
    ask = Search.ask  # a resume's replay of the generations before does not go through it
    monkeypatch.setattr(Search, "ask", lambda s: asked.append(s.es.mean.copy()) or ask(s))
    monkeypatch.setattr(train_controller, "RealFitness",
                        lambda *args: lambda xs, seeds: (np.array([-np.sum((x - 1) ** 2) for x in xs]), 0))

    def run(generations, path=warm_c, **flags):
        return train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=8, generations=generations,
                                            rollouts_per_member=1, max_steps=5, workers=1, eval_episodes=1,
                                            init_from=str(path), **flags))

    first = run(1)["es"]
    np.testing.assert_array_equal(asked[0], x0)
    assert "warm start from" in capsys.readouterr().out
    run(2)
    np.testing.assert_array_equal(asked[1], first.mean)  # resumed, not warm-started again
    assert "--init-from applies to a fresh start only" in capsys.readouterr().out

    write_tiny_controller(warm, seed=3, action_repeat=2)
    with pytest.raises(UsageError, match="holds each action 2 frames, this run 1"):
        run(1, restart=True)
    write_tiny_controller(warm, features="z")
    with pytest.raises(UsageError, match="is a C with .*the same --features"):
        run(1, restart=True)
    other = tmp_path / "other"
    other.mkdir()
    write_tiny_world_model(other, latent_size=2, hidden_size=2, seed=1)
    with pytest.raises(UsageError, match="was trained with another vae.pt"):
        run(1, path=write_tiny_controller(other), restart=True)
    with pytest.raises(UsageError, match="--init-from .*none.pt: no such file"):
        run(1, path=tmp_path / "none.pt", restart=True)

    # A C trained beside another M of this size and V (a fine-tuned one): only with --init-from-any-m.
    from wm.checkpoint import save_checkpoint

    beside = tmp_path / "beside"
    beside.mkdir()
    shutil.copy(tmp_path / "vae.pt", beside / "vae.pt")
    m = load_checkpoint(tmp_path / "mdnrnn.pt", "mdnrnn")
    m["model"] = {k: v + 0.01 for k, v in m["model"].items()}
    save_checkpoint(beside / "mdnrnn.pt", m)
    beside_c = write_tiny_controller(beside, seed=4)
    with pytest.raises(UsageError, match="was trained with another mdnrnn.pt"):
        run(1, path=beside_c, restart=True)
    asked.clear()
    run(1, path=beside_c, restart=True, init_from_any_m=True)
    np.testing.assert_array_equal(asked[0], Controller.from_checkpoint(load_checkpoint(beside_c, "controller")).get_flat())

    # A C that tools/scale_controller.py wrote has no held-out score; it warm-starts all the same.
    scaled = write_tiny_controller(warm, seed=5)
    save_checkpoint(scaled, {k: v for k, v in load_checkpoint(scaled, "controller").items() if k != "held_out"}
                    | {"scale": 0.5})
    capsys.readouterr()
    asked.clear()
    run(1, path=scaled, restart=True)
    np.testing.assert_array_equal(asked[0], Controller.from_checkpoint(load_checkpoint(scaled, "controller")).get_flat())
    assert "times 0.5 (tools/scale_controller.py), not scored on held-out tracks" in capsys.readouterr().out


def test_a_controller_pt_without_its_es_state_is_kept_unless_restart(tmp_path):
    """A finished run committed without controller_es.npz cannot resume; a
    plain rerun says so instead of starting over on top of its controller.pt."""
    from conftest import write_tiny_controller

    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    before = write_tiny_controller(tmp_path, seed=5).read_bytes()
    with pytest.raises(UsageError, match="controller_es.npz is not, so its run cannot be resumed; pass --restart"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4, generations=1))
    assert (tmp_path / "controller.pt").read_bytes() == before
    assert not (tmp_path / "controller_es.npz").exists()


def test_another_pop_size_on_a_resume_goes_on_from_the_mean_and_step_size(tmp_path, monkeypatch, capsys):
    """A resume with another --pop-size keeps where the search stands (its
    mean and step size) and asks for the new number of members; the next
    resume at that size goes on without starting again."""
    write_tiny_world_model(tmp_path, latent_size=2, hidden_size=2)
    asked = []  # (members, step size, mean) of each generation
    ask = Search.ask  # a resume's replay of the generations before does not go through it

    def record(search):
        xs = ask(search)
        asked.append((len(xs), search.es.sigma, search.es.mean.copy()))
        return xs

    monkeypatch.setattr(Search, "ask", record)
    monkeypatch.setattr(train_controller, "RealFitness",
                        lambda *args: lambda xs, seeds: (np.array([-np.sum((x - 1) ** 2) for x in xs]), 0))

    def run(generations, pop_size):
        return train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=pop_size, sigma0=0.5,
                                            generations=generations, rollouts_per_member=1, max_steps=5,
                                            workers=1, eval_episodes=1))

    before = run(2, pop_size=4)["es"]
    capsys.readouterr()
    state = run(3, pop_size=6)
    assert f"population 4 -> 6: CMA-ES goes on from its mean at step size {before.sigma:.4f}" in capsys.readouterr().out
    assert [n for n, _, _ in asked] == [4, 4, 6]
    assert asked[2][1] == before.sigma
    np.testing.assert_array_equal(asked[2][2], before.mean)
    assert np.abs(before.mean).max() > 0  # not a restart from zero
    run(4, pop_size=6)
    assert "goes on from its mean" not in capsys.readouterr().out
    assert [n for n, _, _ in asked] == [4, 4, 6, 6]
    assert asked[3][1] == state["es"].sigma and asked[3][1] != before.sigma  # went on, not back
    rows = train_controller.MetricsLog(tmp_path / "controller_metrics.csv").rows()
    assert [r["generation"] for r in rows] == ["1", "2", "3", "4"]


def test_a_worker_that_raises_ends_the_run_with_its_error(tmp_path):
    write_tiny_world_model(tmp_path)
    p = start_script(*tiny_run(tmp_path), env={"WM_FAULT": "raise"})
    # A run that waited for good would time out here. No tighter limit: on 2
    # cores beside a training run, starting the 2 workers alone took 30-45 s.
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "RuntimeError: injected fault" in err and "error: worker" in err


def test_ctrl_c_stops_the_run_and_its_workers(tmp_path):
    write_tiny_world_model(tmp_path)
    p = start_script(*tiny_run(tmp_path, generations=1000))
    for line in p.stdout:
        if line.startswith("generation 1 "):
            break
    workers = pool_workers(p.pid)
    assert len(workers) == 2, workers
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert time.time() - t0 < 10
    time.sleep(0.5)
    assert [w for w in workers if os.path.exists(f"/proc/{w}")] == []


def test_c_acts_at_m_s_rate_and_a_contradicting_flag_is_refused(tmp_path):
    write_tiny_world_model(tmp_path, action_repeat=3)  # an M that learned every 3rd frame
    with pytest.raises(UsageError, match="--action-repeat 2 does not match mdnrnn.pt") as e:
        train_controller.main(Config(ckpt_dir=str(tmp_path), action_repeat=2))
    assert "\n" not in str(e.value)
    common = dict(pop_size=2, rollouts_per_member=1, max_steps=30, workers=1, eval_episodes=1)
    state = train_controller.main(Config(ckpt_dir=str(tmp_path), generations=1, **common))
    assert state["signature"]["action_repeat"] == 3
    ckpt = load_checkpoint(tmp_path / "controller.pt", "controller")
    assert ckpt["action_repeat"] == 3
    rows = (tmp_path / "controller_metrics.csv").read_text().splitlines()
    # 2 members and 1 held-out episode of 30 frames (10 agent steps each).
    assert int(float(rows[1].split(",")[rows[0].split(",").index("frames")])) == (2 + 1) * 30
    # The same V and M (same fingerprints) relabelled k = 1: its CMA-ES state is not resumed.
    write_tiny_world_model(tmp_path, action_repeat=1)
    with pytest.raises(UsageError, match="action_repeat = 3, this run has 1"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), generations=2, **common))


def test_bench_repeat_prints_frames_per_second_for_each_k():
    import json

    r = run_script("-m", "bench.speed", "repeat", "--json", "--action-repeat", "1,3", "--steps", "7",
                   "--batch-size", "2", "--rounds", "1", timeout=240)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["frames_k1"] == result["frames_k3"] == 2 * 7  # frames, the same budget at every k
    assert result["frames_per_s_k1"] > 0 and result["frames_per_s_k3"] > 0
    assert result["speedup_k3"] > 0 and result["speedup_cpu_k3"] > 0 and "speedup_k1" not in result


def test_bench_agent_times_the_env_alone_on_the_agent_s_actions(tmp_path):
    import argparse

    from bench import speed as bench

    agent_spec, params = bench.agent_for_bench(argparse.Namespace(ckpt_dir=None, steps=40), str(tmp_path))
    runs = {}
    for name, runner in (("agent", EpisodeRunner(agent_spec)),
                         ("env", bench.env_alone_runner(AgentSpec(max_steps=40)))):
        runner.envs = [RecordActions(make_env(fast=True, max_steps=40))]
        runs[name] = runner(params[None] if name == "agent" else None, [3]), runner.envs[0].actions
    assert runs["env"][0] == runs["agent"][0]  # the same score over the same frames
    np.testing.assert_array_equal(np.stack(runs["env"][1]), np.stack(runs["agent"][1]))


@pytest.mark.parametrize("flags, message", [
    (["--pop-size", "1"], "--pop-size must be at least 2"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--features", "zz"], "--features must be one of"),
    (["--sigma0", "0"], "--sigma0 must be positive"),
    (["--sigma0", "inf"], "--sigma0 must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--action-repeat", "-1"], "--action-repeat must be 0"),
    (["--patience", "-1"], "--patience must be non-negative"),
    (["--reset-sigma", "-1"], "--reset-sigma must be non-negative"),
    (["--race", "--rollouts-per-member", "1"], "--race splits each member's tracks in two"),
    (["--race", "--mode", "dream", "--rollouts-per-member", "4"], "--race splits each member's tracks in two"),
])
def test_bad_flags_get_one_line_errors(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        train_controller.main(parse_config(Config, ["--ckpt-dir", str(tmp_path), *flags]))


def test_an_es_state_that_fails_to_save_leaves_no_temporary_file(tmp_path):
    search = Search.start(np.zeros(5), 0.1, 4, 1)
    with pytest.raises(TypeError):
        search.save(tmp_path / "controller_es.npz", {"generation": object()})  # not JSON
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoints_name_the_script_that_makes_them(tmp_path):
    with pytest.raises(UsageError, match="vae.pt not found; run train_vae.py"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), features="z"))
    from conftest import write_tiny_vae

    write_tiny_vae(tmp_path)
    with pytest.raises(UsageError, match="mdnrnn.pt not found; run train_mdnrnn.py"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), features="zh"))


def test_resume_with_other_features_or_another_v_is_refused(tmp_path):
    write_tiny_world_model(tmp_path)
    fingerprints = load_models(tmp_path, with_m=True)[2]
    signature = {"features": "zh", "n_params": 75, "pop_size": 4, "action_repeat": 1, **fingerprints}
    Search.start(np.zeros(75), 0.1, 4, 1).save(tmp_path / "controller_es.npz", {
        "generation": 1, "best_held_out": 0.0, "signature": signature})
    with pytest.raises(UsageError, match="features = zh, this run has z"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), features="z", pop_size=4))
    write_tiny_world_model(tmp_path, seed=1)  # another V and M
    with pytest.raises(UsageError, match="vae_fingerprint"):
        train_controller.main(Config(ckpt_dir=str(tmp_path), pop_size=4))
