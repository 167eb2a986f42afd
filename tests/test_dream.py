"""The dream: the batched controller, M as a batched environment, train_controller.py --mode dream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, FakeClock, run_script, write_tiny_world_model
from models import MDNRNN, MDNOutput, MDNRNNConfig, sample_next_z
from models.controller import Controller, ControllerConfig
from wm.checkpoint import load_checkpoint
from wm.cli import UsageError, parse_config
from wm.dream import Dream, StartStates, check_dream_heads, load_start_states, noise_seed
from wm.rollouts import rollout_path, write_rollout

Z, H = 8, 16  # the tiny sizes of conftest.write_tiny_world_model


def write_tiny_latents(latent_dir: Path, vae_fingerprint: str, n: int = 4, steps: int = 10,
                       latent_size: int = Z, seed: int = 0) -> list[Path]:
    """Latent files of wm/latents.py's schema, with random z (not encoded frames)."""
    rng = np.random.default_rng(seed)
    latent_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = rollout_path(latent_dir, i)
        write_rollout(path, mu=rng.normal(size=(steps, latent_size)).astype(np.float32),
                      logvar=np.full((steps, latent_size), -2, np.float32),
                      actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
                      rewards=rng.normal(size=steps).astype(np.float32),
                      terminated=np.arange(steps) == steps - 1, truncated=np.zeros(steps, bool),
                      vae_fingerprint=np.array(vae_fingerprint), source_bytes=np.array(0))
        paths.append(path)
    return paths


def tiny_m(seed: int = 0, **kw) -> MDNRNN:
    torch.manual_seed(seed)
    m = MDNRNN(MDNRNNConfig(latent_size=Z, hidden_size=H, n_gaussians=2, **kw))
    if m.done_head is not None:
        with torch.no_grad():  # episodes that end at different steps for different members
            m.done_head.weight.mul_(10.0)
            m.done_head.bias.fill_(-4.0)
    return m


@pytest.mark.parametrize("features", ["zh", "z", "z-hidden"])
def test_population_forward_equals_one_controller_at_a_time(features):
    c = Controller(ControllerConfig(latent_size=Z, hidden_size=H, features=features, layer_size=5))
    P, R = 4, 3
    g = torch.Generator().manual_seed(0)
    params = torch.randn(P, c.n_params, generator=g, dtype=torch.float64)
    z, h = torch.randn(P, R, Z, generator=g), torch.randn(P, R, H, generator=g)
    got = c.forward_population(params, z, h)  # (P, R, 3)
    assert got.shape == (P, R, 3)
    for p in range(P):
        c.set_flat(params[p].numpy())
        torch.testing.assert_close(got[p], c(z[p], h[p]))
    assert not torch.allclose(got[0], got[1])  # the members really differ
    assert (got[..., 0].abs() <= 1).all() and (got[..., 1:] >= 0).all() and (got[..., 1:] <= 1).all()


def test_given_noise_samples_what_the_generator_would_draw():
    g = torch.Generator().manual_seed(0)
    out = MDNOutput(*(torch.randn(3, Z, 2, generator=g) for _ in range(3)), None, None)
    drawn = sample_next_z(out, 1.3, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    u, eps = torch.rand(3, Z, 2, generator=g), torch.randn(3, Z, generator=g)
    u_copy = u.clone()
    torch.testing.assert_close(sample_next_z(out, 1.3, noise=(u, eps)), drawn)
    assert torch.equal(u, u_copy)  # the caller's noise is left as it was
    # Noise of one row broadcasts over a batch: every row uses the same draws.
    batch = MDNOutput(*(x.expand(2, 3, Z, 2) for x in out[:3]), None, None)
    shared = sample_next_z(batch, 1.3, noise=(u, eps))
    torch.testing.assert_close(shared[0], drawn)
    torch.testing.assert_close(shared[1], drawn)


def reference_episode(m: MDNRNN, c: Controller, flat, z0, noise, r, max_steps, tau):
    """One member, one rollout, step by step with the plain controller and the
    rollout's slice of the generation's noise -> (return, length, z's)."""
    c.set_flat(flat)
    z, state, total, zs = z0[None], m.initial_state(1), 0.0, [z0]
    for t in range(max_steps):
        a = c(z, state[0])  # (1, 3)
        out, state = m.step(z, a, state)
        u, eps, u_done = noise[t]
        total += float(out.reward[0])
        z = m.sample_next_z(out, tau, noise=(u[r], eps[r]))
        zs.append(z[0])
        if u_done[r] < torch.sigmoid(out.done_logit[0]):
            return total, t + 1, torch.stack(zs)
    return total, max_steps, torch.stack(zs)


@torch.no_grad()
@pytest.mark.parametrize("mixture,seed", [("dim", 0), ("frame", 3)])  # seeds where some episodes end early
def test_batched_dream_equals_stepping_members_one_at_a_time(mixture, seed):
    m = tiny_m(seed, mixture=mixture)
    c = Controller(ControllerConfig(latent_size=Z, hidden_size=H))
    starts = torch.randn(6, Z, generator=torch.Generator().manual_seed(1))
    T, tau, seeds = 25, 1.2, [11, 12, 13]
    dream = Dream(m, c, starts, temperature=tau, max_steps=T)
    params = np.random.default_rng(0).normal(0, 0.5, (5, c.n_params))
    batched = dream.run(params, seeds, record=True)
    assert batched.returns.shape == batched.lengths.shape == (5, 3)
    assert batched.lengths.min() < T  # some episodes ended early ...
    assert batched.lengths.max() == T  # ... and some ran to the time limit
    assert not torch.allclose(batched.returns[0], batched.returns[1])
    assert not torch.equal(batched.lengths[0], batched.lengths[1])  # done depends on the member

    # The same members dreamed one at a time, with the same seeds.
    for p in range(5):
        alone = dream.run(params[p:p + 1], seeds, record=True)
        torch.testing.assert_close(alone.returns[0], batched.returns[p])
        assert torch.equal(alone.lengths[0], batched.lengths[p])

    # And against a plain loop: the single controller, M's cell at batch 1.
    g = torch.Generator().manual_seed(noise_seed(seeds))
    noise = [(torch.rand(3, Z, 2, generator=g), torch.randn(3, Z, generator=g),
              torch.rand(3, generator=g)) for _ in range(T)]
    z0 = starts[dream.start_indices(seeds)]
    for p in range(5):
        for r in range(3):
            total, length, zs = reference_episode(m, c, params[p], z0[r], noise, r, T, tau)
            assert length == int(batched.lengths[p, r])
            torch.testing.assert_close(torch.tensor(total), batched.returns[p, r])
            torch.testing.assert_close(zs, batched.zs[:length + 1, p, r])


def test_bf16_dream_computes_the_same_step_to_three_digits():
    m = tiny_m()
    c = Controller(ControllerConfig(latent_size=Z, hidden_size=H))
    params = np.random.default_rng(0).normal(0, 0.5, (4, c.n_params))
    starts = torch.randn(5, Z, generator=torch.Generator().manual_seed(1))
    fp32, bf16 = (Dream(m, c, starts, max_steps=1, bf16=b).run(params, [1, 2, 3], record=True)
                  for b in (False, True))
    assert fp32.zs.dtype == bf16.zs.dtype == torch.float32
    torch.testing.assert_close(bf16.returns, fp32.returns, rtol=0.02, atol=0.02)
    torch.testing.assert_close(bf16.zs, fp32.zs, rtol=0.05, atol=0.05)
    assert not torch.equal(bf16.returns, fp32.returns)  # it really ran in bfloat16


@torch.no_grad()
def test_done_ends_an_episode_and_its_reward_stops_counting():
    m = tiny_m()
    c = Controller(ControllerConfig(latent_size=Z, hidden_size=H))
    with torch.no_grad():  # a reward of exactly 1 every step
        m.reward_head.weight.zero_()
        m.reward_head.bias.fill_(1.0)
    params = np.random.default_rng(0).normal(0, 0.5, (4, c.n_params))
    seeds = list(range(6))

    def run(done_bias):
        m.done_head.weight.zero_()
        m.done_head.bias.fill_(done_bias)
        return Dream(m, c, torch.randn(3, Z), max_steps=40).run(params, seeds, record=True)

    never = run(-100.0)
    assert (never.lengths == 40).all() and torch.equal(never.returns, torch.full((4, 6), 40.0))
    always = run(100.0)  # ends on the first step, whose reward still counts
    assert (always.lengths == 1).all() and torch.equal(always.returns, torch.ones(4, 6))
    assert len(always.zs) == 2  # and the dream stopped there
    coin = run(0.0)  # each step ends the episode with probability 1/2
    assert torch.equal(coin.returns, coin.lengths.float())  # nothing counted after the end
    assert coin.lengths.max() < 40 and len(set(coin.lengths[0].tolist())) > 1
    assert len(coin.zs) == int(coin.lengths.max()) + 1


@torch.no_grad()
def test_a_dream_step_is_m_s_action_repeat_frames(tmp_path):
    from wm.dream import save_dream_strip
    from wm.latents import load_world_model

    c = Controller(ControllerConfig(latent_size=Z, hidden_size=H))
    params = np.zeros((2, c.n_params))
    for k, max_steps, steps, frames in ((1, 31, 31, 31), (3, 31, 11, 31), (3, 30, 10, 30)):
        m = tiny_m(action_repeat=k)
        m.done_head.bias.fill_(-100.0)  # never ends: the time limit does
        dream = Dream(m, c, torch.randn(3, Z), max_steps=max_steps)
        assert (dream.run(params, [0, 1]).lengths == steps).all()
        assert dream(list(params), [0, 1])[1] == 2 * 2 * frames  # frames, the last step cut short
    # The strip's real episode holds C's actions for M's 3 frames too.
    write_tiny_world_model(tmp_path, action_repeat=3)
    world = load_world_model(tmp_path)
    shown = save_dream_strip(world.vae, world.mdnrnn, c, tmp_path / "strip.png", seed=1, max_steps=30)
    assert (shown["real_steps"], shown["real_frames"]) == (10, 30) and shown["dream_steps"] <= 10
    assert max(shown["steps_shown"]) < 10


def test_an_m_without_reward_or_done_head_is_refused():
    for kw, missing in (({"predict_done": False}, "done"), ({"predict_reward": False}, "reward")):
        with pytest.raises(UsageError, match=f"no {missing} head.*train_mdnrnn.py --reward-weight 1 --done-weight 1"):
            check_dream_heads(tiny_m(**kw))
    with pytest.raises(ValueError, match="positive"):
        Dream(tiny_m(), Controller(ControllerConfig(latent_size=Z, hidden_size=H)), torch.zeros(1, Z),
              temperature=0.0)


def test_start_states_are_first_frames_of_this_v(tmp_path):
    paths = write_tiny_latents(tmp_path / "lat", "abc", n=3)
    starts = load_start_states(tmp_path / "lat", "abc")
    np.testing.assert_array_equal(starts.z.numpy(), np.stack([np.load(p)["mu"][0] for p in paths]))
    assert starts.h is None and starts.c is None  # M's memory at zero
    with pytest.raises(UsageError, match="another V"):
        load_start_states(tmp_path / "lat", "def")
    with pytest.raises(UsageError, match="train_mdnrnn.py"):
        load_start_states(tmp_path / "nowhere", "abc")


def test_warm_starts_are_m_s_memory_after_the_real_steps_before_them(tmp_path):
    """--dream-start 5 on rollouts of 25 steps: starts at steps 5 and 15 of
    each, with the (h, c) that M's sequence model (nn.LSTM, not the step
    the dream uses) reaches over the real z's and actions before them."""
    write_tiny_latents(tmp_path / "lat", "abc", n=3, steps=25)
    short, = write_tiny_latents(tmp_path / "short", "abc", n=1, steps=12)  # one start only, at 5
    (tmp_path / "lat" / "rollout_short.npz").write_bytes(short.read_bytes())
    m = tiny_m()
    starts = load_start_states(tmp_path / "lat", "abc", m, start_step=5)
    files = sorted((tmp_path / "lat").glob("*.npz"))  # the order load_start_states reads them in
    expected = [(f, t) for t in (5, 15) for f in files if t < len(np.load(f)["mu"])]
    assert len(starts.z) == len(expected) == 7
    with torch.no_grad():
        for i, (f, t) in enumerate(expected):
            data = np.load(f)
            z, a = (torch.as_tensor(data[k][None, :t]) for k in ("mu", "actions"))
            _, (h, c) = m(z, a)
            np.testing.assert_array_equal(starts.z[i].numpy(), data["mu"][t])
            torch.testing.assert_close(starts.h[i], h[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(starts.c[i], c[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="no readable latent files longer than 30 steps.*smaller --dream-start"):
        load_start_states(tmp_path / "lat", "abc", m, start_step=30)


def test_a_dream_from_a_warm_start_acts_on_that_memory():
    m, c = tiny_m(), Controller(ControllerConfig(latent_size=Z, hidden_size=H))
    g = torch.Generator().manual_seed(0)
    starts = StartStates(torch.randn(3, Z, generator=g), torch.randn(3, H, generator=g),
                         torch.randn(3, H, generator=g))
    params = torch.randn(4, c.n_params, generator=g)
    dream = Dream(m, c, starts, max_steps=5)
    seeds = [7, 8]
    idx = dream.start_indices(seeds)
    first = dream.run(params, seeds, record=True).actions[0]  # (P, R, 3)
    P, R = len(params), len(seeds)
    want = c.forward_population(params, starts.z[idx].expand(P, R, Z), starts.h[idx].expand(P, R, H))
    torch.testing.assert_close(first, want)
    cold = Dream(m, c, starts.z, max_steps=5).run(params, seeds, record=True).actions[0]
    assert not torch.allclose(cold, want)  # memory at zero acts otherwise


def test_dream_start_and_frames_reach_the_dream(tmp_path, monkeypatch):
    import train_controller

    ckpt, latents = dream_setup(tmp_path)
    made = []
    real = train_controller.make_dream
    monkeypatch.setattr(train_controller, "make_dream", lambda *a, **kw: made.append((a, kw)) or real(*a, **kw))
    train_controller.main(dream_config(ckpt, latents, dream_start=3, dream_frames=8, dream_gas_cost=0.5,
                                       generations=1))
    ((_, _, _, _, max_frames, _, _, start_step), kw), = made
    assert (max_frames, start_step, kw["gas_cost"]) == (8, 3, 0.5)
    c = load_checkpoint(ckpt / "controller.pt", "controller")
    assert c["config"]["dream_start"] == 3 and c["config"]["dream_gas_cost"] == 0.5 and np.isfinite(c["held_out"])


@torch.no_grad()
def test_the_gas_cost_is_charged_per_frame_of_gas_and_only_in_the_fitness():
    m = tiny_m(action_repeat=2)
    c = Controller(ControllerConfig(latent_size=Z, hidden_size=H))
    starts = torch.randn(4, Z, generator=torch.Generator().manual_seed(1))
    params = np.random.default_rng(0).normal(0, 0.5, (5, c.n_params))
    seeds = [3, 4, 5]
    free, priced = (Dream(m, c, starts, max_steps=30, gas_cost=cost) for cost in (0.0, 0.7))
    run = free.run(params, seeds, record=True)
    assert run.lengths.min() < run.lengths.max()  # some dreams end early: their gas after the end is not charged
    # C's gas summed over the steps that counted, each held M's 2 frames, from the recorded actions.
    counted = torch.arange(len(run.actions))[:, None, None] < run.lengths[None]
    torch.testing.assert_close(run.gas, 2 * (run.actions[..., 1] * counted).sum(0))
    assert torch.equal(priced.run(params, seeds).returns, run.returns)  # the dreamed return is M's alone
    (fitness_free, frames), (fitness_priced, frames_priced) = free(list(params), seeds), priced(list(params), seeds)
    np.testing.assert_allclose(fitness_free - fitness_priced, 0.7 * run.gas.mean(1).numpy(), rtol=1e-5)
    assert frames == frames_priced
    # Members that press no gas pay nothing.
    no_gas = params.copy()
    c.set_flat(no_gas[0])
    c.net.weight[1] = 0.0
    c.net.bias[1] = -50.0  # (tanh + 1) / 2 = 0
    no_gas[0] = c.get_flat()
    assert priced(list(no_gas), seeds)[0][0] == pytest.approx(free(list(no_gas), seeds)[0][0])


def test_bench_dream_rates_are_dreamed_steps_over_each_variant_s_seconds(monkeypatch):
    import argparse

    from bench import speed as bench

    clock = FakeClock(monkeypatch)
    # A dream costs 1 s on one thread and 1/2 s on two, halved again in bf16.
    cost = lambda self, *_: (1 if torch.get_num_threads() == 1 else 1 / 2) / (2 if self.bf16 else 1)  # noqa: E731
    monkeypatch.setattr(Dream, "run", clock.charge(Dream.run, cost))
    args = argparse.Namespace(pop_size=3, rollouts=2, max_steps=5, repeats=2, temperature=1.0, device="cpu",
                              seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the default, which the bench sets back
    try:
        result = bench.bench_dream(args)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    steps = 3 * 2 * 5  # a dream: every member's rollouts to the time limit (the bench turns the done head off)
    assert (result["steps_per_s_1_threads"], result["steps_per_s_2_threads"], result["steps_per_s"]) == (
        steps, 2 * steps, 2 * steps)
    assert (result["steps_per_s_1_threads_bf16"], result["steps_per_s_2_threads_bf16"],
            result["steps_per_s_bf16"]) == (2 * steps, 4 * steps, 4 * steps)
    assert result["steps_per_cpu_s_1_thread"] == steps and result["steps_per_cpu_s_1_thread_bf16"] == 2 * steps
    assert result["seconds_per_generation_of_1000_steps"] == 1000 * 3 * 2 / (2 * steps)


# --- train_controller.py --mode dream ------------------------------------------------

def dream_setup(tmp_path: Path) -> tuple[Path, Path]:
    """Tiny matched V and M in tmp_path/ckpt, latents of that V in tmp_path/latents."""
    vae_path, _ = write_tiny_world_model(tmp_path / "ckpt")
    write_tiny_latents(tmp_path / "latents", load_checkpoint(vae_path, "vae")["fingerprint"])
    return tmp_path / "ckpt", tmp_path / "latents"


def dream_config(ckpt: Path, latents: Path, **kw):
    from train_controller import Config

    return Config(**{"mode": "dream", "ckpt_dir": str(ckpt), "latent_dir": str(latents), "pop_size": 8,
                     "rollouts_per_member": 2, "max_steps": 30, "workers": 1, "eval_episodes": 1,
                     "device": "cpu", **kw})


def test_one_dream_generation_as_a_subprocess(tmp_path):
    ckpt, latents = dream_setup(tmp_path)
    r = run_script("train_controller.py", "--mode", "dream", "--pop-size", "8", "--rollouts-per-member", "2",
                   "--generations", "1", "--latent-dir", str(latents), "--ckpt-dir", str(ckpt),
                   "--max-steps", "30", "--workers", "1", "--eval-episodes", "1", "--device", "cpu",
                   "--bf16")
    assert r.returncode == 0, r.stderr
    assert "generation 1  mean" in r.stdout and "held-out" in r.stdout
    c = load_checkpoint(ckpt / "controller.pt", "controller")
    assert c["generation"] == 1 and c["config"]["mode"] == "dream" and np.isfinite(c["held_out"])
    for f in ("controller_es.npz", "controller_metrics.csv", "controller_reward.png",
              "controller_dream_strip.png"):
        assert (ckpt / f).stat().st_size > 0, f
    row = (ckpt / "controller_metrics.csv").read_text().splitlines()
    assert len(row) == 2 and row[0].startswith("generation,")
    from wm.dream import plot_transfer

    plot_transfer({"dream": ckpt / "controller_metrics.csv", "again": ckpt / "controller_metrics.csv"},
                  tmp_path / "transfer.png")
    assert (tmp_path / "transfer.png").stat().st_size > 0


def test_dream_training_resumes_where_it_stopped(tmp_path):
    import train_controller

    straight_ckpt, latents = dream_setup(tmp_path / "a")
    straight = train_controller.main(dream_config(straight_ckpt, latents, generations=2, eval_every=100))
    ckpt, latents = dream_setup(tmp_path / "b")
    train_controller.main(dream_config(ckpt, latents, generations=1, eval_every=100))
    resumed = train_controller.main(dream_config(ckpt, latents, generations=2, eval_every=100))
    assert resumed["generation"] == 2 and resumed["es"].countiter == 2
    np.testing.assert_array_equal(resumed["es"].result.xfavorite, straight["es"].result.xfavorite)
    rows = [r.split(",")[:2] for r in (ckpt / "controller_metrics.csv").read_text().splitlines()]
    straight_rows = [r.split(",")[:2] for r in (straight_ckpt / "controller_metrics.csv").read_text().splitlines()]
    assert rows == straight_rows and [r[0] for r in rows] == ["generation", "1", "2"]
    # The same folder in real mode is another run: refused rather than mixed.
    with pytest.raises(UsageError, match="from a dream-mode run and this one is real-mode; pass --mode dream"):
        train_controller.main(dream_config(ckpt, latents, mode="real", generations=3))


def test_dream_mode_refuses_bad_input(tmp_path):
    import train_controller
    from dataclasses import asdict

    ckpt, latents = dream_setup(tmp_path)
    for tau in ("0", "-1"):
        with pytest.raises(UsageError, match="--temperature must be positive"):
            parse_config(train_controller.Config, ["--mode", "dream", "--temperature", tau])
    with pytest.raises(UsageError, match="no latent files"):
        train_controller.main(dream_config(ckpt, tmp_path / "nowhere"))
    # The CMA-ES state of a real-mode run (no "mode" in its signature) is not resumed in a dream.
    from wm.search import Search

    Search.start(np.zeros(75), 0.1, 8, 1).save(ckpt / "controller_es.npz", {
        "generation": 1, "best_held_out": 0.0, "signature": {"features": "zh", "n_params": 75, "pop_size": 8}})
    with pytest.raises(UsageError, match="from a real-mode run and this one is dream-mode; pass --mode real"):
        train_controller.main(dream_config(ckpt, latents))
    # An M trained with --done-weight 0 (no done head), on the same V.
    m = load_checkpoint(ckpt / "mdnrnn.pt", "mdnrnn")
    cfg = MDNRNNConfig(**{**m["model_args"], "predict_done": False})
    from wm.checkpoint import save_checkpoint

    save_checkpoint(ckpt / "mdnrnn.pt", {**m, "model": MDNRNN(cfg).state_dict(), "model_args": asdict(cfg)})
    r = run_script("train_controller.py", "--mode", "dream", "--ckpt-dir", str(ckpt), "--latent-dir",
                   str(latents), "--workers", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no done head" in r.stderr and "--done-weight" in r.stderr


def write_other_m(path: Path, ckpt: Path, seed: int, hidden_size: int = 16) -> Path:
    """Another tiny M trained with ckpt's vae.pt (other weights, or another size)."""
    from dataclasses import asdict

    from wm.checkpoint import save_checkpoint

    m = load_checkpoint(ckpt / "mdnrnn.pt", "mdnrnn")
    cfg = MDNRNNConfig(**{**m["model_args"], "hidden_size": hidden_size})
    torch.manual_seed(seed)
    save_checkpoint(path, {**m, "model": MDNRNN(cfg).state_dict(), "model_args": asdict(cfg)})
    return path


def test_an_ensemble_ranks_members_by_the_mean_of_each_m_s_dream(tmp_path, monkeypatch):
    """--dream-ensemble dreams every rollout in M and in each other M: with
    the same CMA-ES seed (the same first population and tracks), generation
    1's fitness is the mean of the runs in each M alone."""
    import shutil

    import train_controller

    monkeypatch.chdir(tmp_path)  # folders given as a user does, relative
    tmp_path = Path(".")
    ckpt, latents = dream_setup(tmp_path)
    other = write_other_m(tmp_path / "other.pt", ckpt, seed=5)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ckpt / "vae.pt", alone / "vae.pt")
    shutil.copy(other, alone / "mdnrnn.pt")
    both = tmp_path / "both"
    shutil.copytree(ckpt, both)
    runs = {}
    for name, folder, extra in [("m", ckpt, {}), ("other", alone, {}), ("both", both, {"dream_ensemble": str(other)})]:
        train_controller.main(dream_config(folder, latents, generations=1, eval_every=100, seed=3, **extra))
        runs[name] = [float(x) for x in (folder / "controller_metrics.csv").read_text().splitlines()[1].split(",")[1:4]]
    assert runs["m"] != runs["other"]
    assert runs["both"][0] == pytest.approx((runs["m"][0] + runs["other"][0]) / 2, abs=1e-4)
    assert load_checkpoint(both / "controller.pt", "controller")["config"]["dream_ensemble"] == str(other)
    # A resume without the ensemble is another run: refused.
    with pytest.raises(UsageError, match="dream_ensemble"):
        train_controller.main(dream_config(both, latents, generations=2, seed=3))
    # Bad input is one line.
    shutil.copytree(ckpt, tmp_path / "fresh")
    for value, says in [(str(tmp_path / "none.pt"), "no such file"),
                        (str(write_other_m(tmp_path / "small.pt", ckpt, seed=6, hidden_size=8)), "hidden size 8")]:
        with pytest.raises(UsageError, match=says):
            train_controller.main(dream_config(tmp_path / "fresh", latents, dream_ensemble=value))
    with pytest.raises(UsageError, match="--dream-ensemble dreams in more Ms: it needs --mode dream"):
        train_controller.main(dream_config(ckpt, latents, mode="real", dream_ensemble=str(other)))


def test_the_dream_loop_runs_its_rounds_and_counts_every_real_frame(tmp_path):
    """experiments/dream_loop.py, two tiny rounds end to end as a user runs
    it: laps of the first driver, then of round 1's C; an M and a C per
    round, round 2's C started from round 1's; a metrics row per round
    whose real frames add up. Round 2, run on with --mixture frame, fine-tunes
    a per-frame mixture head alone on the first M's LSTM."""
    import csv

    from conftest import error_line, write_tiny_controller

    driver = tmp_path / "driver"
    write_tiny_world_model(driver, action_repeat=2)
    write_tiny_controller(driver, action_repeat=2)
    out, data = tmp_path / "loop", tmp_path / "rollouts"
    flags = ["--out-dir", str(out), "--vae", str(driver / "vae.pt"), "--mdnrnn", str(driver / "mdnrnn.pt"),
             "--first-driver", str(driver), "--data-dir", str(data), "--latent-dir", str(tmp_path / "latents"),
             "--first-rollouts", "2", "--rollouts", "1", "--m-epochs", "1", "--generations", "2",
             "--pop-size", "4", "--rollouts-per-member", "2", "--dream-start", "2", "--dream-frames", "8",
             "--eval-every", "1", "--eval-episodes", "1", "--truth-episodes", "1", "--truth-scales", "0,1",
             "--replays", "2", "--carry-c", "--max-steps", "30", "--workers", "1"]
    r = run_script("-m", "experiments.dream_loop", "--rounds", "1", *flags, timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_script("-m", "experiments.dream_loop", "--rounds", "2", "--mixture", "frame", "--head-only", *flags,
                   timeout=600)
    assert r.returncode == 0, r.stderr
    with open(out / "loop_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["round"]) for row in rows] == [1, 2]
    # M learned from every lap so far and round 1's two replayed windows.
    assert [int(row["rollouts"]) for row in rows] == [2, 5]
    laps = [f"rollout_{s:07d}.npz" for s in range(10800, 10803)]
    assert sorted(p.name for p in data.glob("*.npz") if p.name in laps) == laps
    assert len([p for p in data.glob("*_w1_*.npz")]) == 2 and len([p for p in data.glob("*_w2_*.npz")]) == 2
    assert int(rows[0]["lap_frames"]) == 2 * 30 and int(rows[1]["lap_frames"]) == 30  # tiny Cs finish no lap
    for row in rows:
        assert int(row["held_out_frames"]) == 2 * 30  # the CMA-ES mean on 1 held-out track, twice
        assert int(row["truth_frames"]) > 0 and int(row["replay_frames"]) > 0
    total = sum(int(row[k]) for row in rows for k in ("lap_frames", "held_out_frames", "truth_frames", "replay_frames"))
    assert int(rows[-1]["real_frames"]) == total
    ckpt = load_checkpoint(out / "round_02" / "controller.pt", "controller")
    assert ckpt["config"]["mode"] == "dream" and ckpt["config"]["dream_start"] == 2
    assert ckpt["config"]["init_from"] == str(out / "round_01" / "controller.pt")  # --carry-c
    m = load_checkpoint(out / "round_02" / "mdnrnn.pt", "mdnrnn")
    assert ckpt["mdnrnn_fingerprint"] == m["fingerprint"] and m["config"]["init_from"] == str(driver / "mdnrnn.pt")
    assert m["model_args"]["mixture"] == "frame"
    first = load_checkpoint(driver / "mdnrnn.pt", "mdnrnn")["model"]
    assert all(torch.equal(m["model"][k], first[k]) for k in first if not k.startswith("mdn."))  # --head-only
    assert load_checkpoint(out / "round_01" / "mdnrnn.pt", "mdnrnn")["model_args"]["mixture"] == "dim"
    assert (out / "loop.png").stat().st_size > 1000 and (out / "round_02" / "vae.pt").is_symlink()

    again = run_script("-m", "experiments.dream_loop", "--rounds", "2", *flags)
    assert again.returncode == 0 and "already 2 rounds" in again.stdout
    png = tmp_path / "loops.png"
    shown = run_script("-m", "experiments.dream_loop", "--compare", f"a={out},b={out}", "--png", str(png))
    assert shown.returncode == 0 and png.stat().st_size > 1000
    assert len([line for line in shown.stdout.splitlines() if line.split()[:1] in (["a"], ["b"])]) == 4
    assert "--compare" in error_line(run_script("-m", "experiments.dream_loop", "--compare", f"a={tmp_path}"))
    assert "--first-driver" in error_line(run_script("-m", "experiments.dream_loop", "--first-driver",
                                                     str(tmp_path / "none"), "--out-dir", str(out)))
    assert error_line(run_script("-m", "experiments.dream_loop", "--mixture", "pixel", "--out-dir", str(out))) == \
        "error: --mixture must be one of dim, frame (or empty: --mdnrnn's), got 'pixel'"

def test_the_dream_recipe_picks_on_the_held_out_tracks_and_counts_every_real_frame(tmp_path):
    """experiments/dream_recipe.sh end to end at a tiny scale, from a tiny V,
    M and C: each pick (the loop's round, the ensemble's run, the scale) is the
    best held-out score of its candidates, the ensemble dreams in the picked
    round's M and the one fine-tuned from it, and frames.json adds up every
    real frame, the pick's scores included. A rerun redoes nothing, and one
    whose pick differs stops before mixing the two picks' steps."""
    import json
    import os
    import subprocess
    import sys

    from conftest import write_tiny_controller

    start = tmp_path / "from"
    write_tiny_world_model(start, action_repeat=2)
    write_tiny_controller(start, action_repeat=2)
    out, data = tmp_path / "recipe", tmp_path / "data"
    sizes = dict(GRIP_LAPS=1, FIRST_LAPS=1, LAPS=1, REPLAYS=1, ROUNDS=2, SEEDS=2, GENERATIONS=1, EVAL_EVERY=1, POP=4,
                 PER_MEMBER=2, DREAM_START=2, DREAM_FRAMES=8, M_EPOCHS=1, TRUTH_EPISODES=1, HELD_OUT=1, EPISODES=1,
                 MAX_STEPS=30, WORKERS=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "FROM": str(start),
           **{k: str(v) for k, v in sizes.items()}}

    def recipe(**more):
        return subprocess.run(["bash", "experiments/dream_recipe.sh", str(out), str(data), "10800"], cwd=ROOT,
                              env={**env, **more}, capture_output=True, text=True, timeout=900)

    r = recipe()
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "frames.json").read_text())

    def held_out(folder):
        path = Path(folder)
        if (path / "held_out.json").is_file():
            return json.loads((path / "held_out.json").read_text())["mean"]
        return load_checkpoint(path / "controller.pt", "controller")["held_out"]

    rounds = sorted((out / "loop").glob("round_*"))
    runs = sorted(out.glob("ensemble_s*"))
    assert len(rounds) == 2 and len(runs) == 2
    picked = [Path(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("picked ")]
    assert picked[0] == max(rounds, key=held_out) and picked[1] == max(runs, key=held_out)
    assert (ROOT / result["pick"]).resolve() == picked[2] == max([picked[1], out / "scaled_x0.9", out / "scaled_x1.1"],
                                                     key=held_out)
    m2 = load_checkpoint(out / "m2" / "mdnrnn.pt", "mdnrnn")
    assert m2["config"]["init_from"] == str(picked[0] / "mdnrnn.pt")
    c = load_checkpoint(runs[0] / "controller.pt", "controller")
    assert c["config"]["mode"] == "dream" and [Path(p).resolve() for p in c["config"]["dream_ensemble"].split(",")] == \
        [(out / "m2" / "mdnrnn.pt").resolve()]
    assert (runs[0] / "mdnrnn.pt").resolve() == (picked[0] / "mdnrnn.pt").resolve()
    assert not os.readlink(runs[0] / "mdnrnn.pt").startswith("/")  # the folders can move

    frames = result["real_frames"]
    assert frames["laps past the grip"] == 2 * 30  # tiny Cs finish no lap in 30 frames
    loop_rows = (out / "loop" / "loop_metrics.csv").read_text().splitlines()
    assert frames["the loop (laps, held-out scores, truth, replays)"] == int(loop_rows[-1].split(",")[
        loop_rows[0].split(",").index("real_frames")])
    assert frames["the picked round's laps"] == 30
    assert frames["the ensemble's held-out scores"] == 2 * 30  # each run's mean on 1 track, once
    assert frames["the scales' held-out scores"] == 2 * 30 and frames["the pick's scores"] == 2 * 30
    assert frames["total"] == sum(v for k, v in frames.items() if k != "total")
    scores = json.loads((ROOT / result["pick"] / "scores_unseen.json").read_text())
    assert scores["seed"] == 400 and result["scores"]["scores_unseen"] == scores["mean"]

    again = recipe()
    assert again.returncode == 0 and json.loads((out / "frames.json").read_text()) == result
    assert "already 2 rounds" in again.stdout

    # experiments/dream_gas_cost.sh: the recipe searched again, the gas priced, in its two Ms.
    def gas_cost(folder=out, **more):
        return subprocess.run(["bash", "experiments/dream_gas_cost.sh", str(folder), str(data)], cwd=ROOT,
                              env={**env, "COSTS": "0.5 2", "SEEDS": "1", **more}, capture_output=True, text=True,
                              timeout=900)

    g = gas_cost()
    assert g.returncode == 0, g.stderr[-3000:]
    priced = [out / "gas_cost_0.5" / "s1", out / "gas_cost_2" / "s1"]
    for run, cost in zip(priced, (0.5, 2)):
        c = load_checkpoint(run / "controller.pt", "controller")
        assert c["config"]["dream_gas_cost"] == cost and c["config"]["mode"] == "dream"
        assert Path(c["config"]["dream_ensemble"]).resolve() == (out / "m2" / "mdnrnn.pt").resolve()
        assert (run / "mdnrnn.pt").resolve() == (picked[0] / "mdnrnn.pt").resolve()
    picked_g = [Path(line.split()[1]) for line in g.stdout.splitlines() if line.startswith("picked ")]
    assert picked_g[0] == max(priced, key=held_out)
    assert picked_g[1] == max([picked_g[0], out / "gas_cost_x0.9", out / "gas_cost_x1.1"], key=held_out)
    counted = json.loads((out / "gas_cost_frames.json").read_text())
    assert (ROOT / counted["pick"]).resolve() == picked_g[1].resolve()
    frames_g = counted["real_frames"]
    assert frames_g["the recipe's (its frames.json)"] == frames["total"]
    assert frames_g["the gas-priced runs' held-out scores"] == 2 * 30
    assert frames_g["the scales' held-out scores"] == 2 * 30 and frames_g["the pick's scores"] == 2 * 30
    assert frames_g["total"] == sum(v for k, v in frames_g.items() if k != "total")
    assert gas_cost().returncode == 0 and json.loads((out / "gas_cost_frames.json").read_text()) == counted
    nowhere = gas_cost(tmp_path / "none")
    assert nowhere.returncode == 2 and nowhere.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'} has no picked_round; give the folder of a finished experiments/dream_recipe.sh run"]
    # Another run now scores best (as more SEEDS could make it): the scales and
    # scores made from the first pick are not mixed with it.
    from wm.checkpoint import save_checkpoint
    other = next(run for run in runs if run != picked[1])
    save_checkpoint(other / "controller.pt", {**load_checkpoint(other / "controller.pt", "controller"),
                                              "held_out": held_out(picked[1]) + 1})
    moved = recipe()
    assert moved.returncode == 2 and moved.stderr.strip().splitlines()[-1:] == [
        f"error: the run picked is now {other.name}, but the steps after it in {out.resolve()} were made from "
        f"{picked[1].name}; give a new OUT and DATA to run them from {other.name}"]
    missing = recipe(FROM=str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: FROM={tmp_path / 'none'} has no vae.pt; give the folder of the V, M and C to start from"]


def test_replays_put_the_game_back_where_the_dream_started_and_play_its_actions(tmp_path):
    """experiments/dream_replays.py: each window starts from the lap's own
    frame at its step (the lap's actions, replayed without rendering, lead
    back to that state) and plays the dream's actions from there; its file
    is a rollout M can read, and the JSON's returns are the file's."""
    import json

    import collect_rollouts
    from conftest import write_tiny_controller
    from experiments import dream_replays
    from wm.latents import encode_rollouts, load_world_model
    from wm.rollouts import list_rollouts, read_rollout

    ckpt, data, latents = tmp_path / "ckpt", tmp_path / "laps", tmp_path / "latents"
    write_tiny_world_model(ckpt, action_repeat=2)
    write_tiny_controller(ckpt, action_repeat=2)
    collect_rollouts.main(collect_rollouts.Config(rollouts=2, max_steps=40, workers=1, out_dir=str(data),
                                                  seed=10800, policy="controller", ckpt_dir=str(ckpt)))
    world = load_world_model(ckpt)
    encode_rollouts(list_rollouts(data), latents, world.vae, world.vae_fingerprint, progress=False)
    out = tmp_path / "replays.json"
    summary = dream_replays.main(dream_replays.Config(ckpt_dir=str(ckpt), data_dir=str(data),
                                                      latent_dir=str(latents), windows=4, dream_start=3,
                                                      dream_frames=10, max_steps=40, json=str(out)))
    assert json.loads(out.read_text())["windows"] == summary["windows"] and len(summary["windows"]) >= 2
    for w in summary["windows"]:
        window = read_rollout(data / w["file"])
        lap = read_rollout(data / f"rollout_{w['track']:07d}.npz")
        assert 3 <= w["step"] < len(lap["actions"])
        assert np.array_equal(window["observations"][0], lap["observations"][w["step"]])
        assert 1 <= len(window["actions"]) == w["steps"] <= 5  # 10 frames, 2 a step
        assert float(window["rewards"].astype(np.float64).sum()) == pytest.approx(w["replayed"])
    assert summary["real_frames"] >= sum(2 * (w["step"] + w["steps"]) for w in summary["windows"]) - 4
