"""M, the MDN-RNN: model, loss, sampling, latent data set and train_mdnrnn.py."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from torch import distributions as D

from conftest import FakeClock, error_line, make_synthetic_rollouts, run_script, write_tiny_vae, write_tiny_world_model
from models import MDNRNN, ConvVAE, MDNOutput, MDNRNNConfig, mdn_loss, sample_next_z
from wm.checkpoint import load_checkpoint, save_checkpoint
from wm.cli import UsageError
from wm.latents import check_latent_size, encode_rollouts, latent_path, load_world_model


def random_output(B=3, T=5, Z=4, K=3, seed=0) -> MDNOutput:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return MDNOutput(r(B, T, Z, K) * 2, r(B, T, Z, K) * 3, r(B, T, Z, K) * 0.5, r(B, T), r(B, T))


def test_parameter_count_matches_the_paper():
    # The paper's M has 422,368 parameters with one LSTM bias vector; PyTorch keeps
    # two (4 * 256 more), and the reward and done heads add 257 each.
    bare = MDNRNN(MDNRNNConfig(predict_reward=False, predict_done=False))
    assert sum(p.numel() for p in bare.parameters()) == 422_368 + 4 * 256 == 423_392
    full = MDNRNN(MDNRNNConfig())
    assert sum(p.numel() for p in full.parameters()) == 423_392 + 2 * 257


def test_mixture_loss_matches_torch_distributions():
    out = random_output()
    z_next = torch.randn(3, 5, 4) * 3
    reward, done = torch.randn(3, 5), (torch.rand(3, 5) < 0.3).float()
    z_mask = torch.ones(3, 5)
    z_mask[0, 3:] = 0
    step_mask = torch.ones(3, 5)
    step_mask[0, 4:] = 0
    mix = D.MixtureSameFamily(D.Categorical(logits=out.logit_pi), D.Normal(out.mu, out.log_sigma.exp()))
    ref_nll = -mix.log_prob(z_next).mean(-1)  # (B, T), nats per dimension
    ref_nll = (ref_nll * z_mask).sum() / z_mask.sum()
    ref_reward = ((out.reward - reward) ** 2 * step_mask).sum() / step_mask.sum()
    ref_done = (D.Bernoulli(logits=out.done_logit).log_prob(done).neg() * step_mask).sum() / step_mask.sum()

    loss = mdn_loss(out, z_next, reward, done, z_mask, step_mask, reward_weight=0.5, done_weight=2.0)
    torch.testing.assert_close(loss.nll, ref_nll)
    torch.testing.assert_close(loss.reward, ref_reward)
    torch.testing.assert_close(loss.done, ref_done)
    torch.testing.assert_close(loss.total, ref_nll + 0.5 * ref_reward + 2.0 * ref_done)


def test_per_frame_mixture_loss_matches_torch_distributions():
    """One component for the whole z: log sum_k pi_k prod_d N(z_d), divided by Z."""
    out = random_output()
    out = out._replace(logit_pi=out.logit_pi[..., :1, :])  # (B, T, 1, K)
    z_next = torch.randn(3, 5, 4) * 3
    z_mask = torch.ones(3, 5)
    z_mask[1, 2:] = 0
    whole = D.Independent(D.Normal(out.mu.transpose(-1, -2), out.log_sigma.exp().transpose(-1, -2)), 1)  # K of (Z,)
    mix = D.MixtureSameFamily(D.Categorical(logits=out.logit_pi[..., 0, :]), whole)
    ref_nll = -mix.log_prob(z_next) / 4  # (B, T)
    ref_nll = (ref_nll * z_mask).sum() / z_mask.sum()
    torch.testing.assert_close(mdn_loss(out, z_next, z_mask=z_mask).nll, ref_nll)


def test_per_frame_sampling_draws_one_component_for_every_dimension():
    # Two whole-frame components: weight 0.7 at (-5, -5, -5), 0.3 at (+5, +5, +5).
    N, Z = 4000, 3
    logit = torch.log(torch.tensor([0.7, 0.3])).expand(N, 1, 2)
    mu = torch.tensor([-5.0, 5.0]).expand(N, Z, 2)
    out = MDNOutput(logit, mu, torch.full((N, Z, 2), -3.0), None, None)
    z = sample_next_z(out, 1.0, torch.Generator().manual_seed(0))
    assert z.shape == (N, Z)
    assert ((z < 0).all(-1) | (z > 0).all(-1)).all()  # never half of one future and half of another
    assert 0.67 < (z[:, 0] < 0).float().mean() < 0.73
    g = torch.Generator().manual_seed(1)
    u, eps = torch.rand(N, Z, 2, generator=g), torch.randn(N, Z, generator=g)  # a dream's noise: a row per dimension
    shared = sample_next_z(out, 1.0, noise=(u, eps))
    torch.testing.assert_close(shared, sample_next_z(out, 1.0, noise=(u[:, :1], eps)))  # it reads the first row
    torch.testing.assert_close(sample_next_z(out, 0.0), torch.full((N, Z), -5.0))
    with pytest.raises(ValueError, match="mixture"):
        MDNRNNConfig(mixture="pixel")


def test_mixture_loss_is_finite_far_from_every_component():
    out = random_output()
    out = out._replace(log_sigma=torch.full_like(out.mu, -5.0))
    loss = mdn_loss(out, torch.full((3, 5, 4), 1e3))  # every density underflows to 0 in float32
    assert torch.isfinite(loss.nll) and loss.nll > 1e6


def test_low_temperature_concentrates_on_the_most_likely_mode():
    # Two components per dimension: weight 0.7 at -5, 0.3 at +5, sigma 1.
    N, Z = 4000, 2
    logit = torch.log(torch.tensor([0.7, 0.3])).expand(N, Z, 2)
    mu = torch.tensor([-5.0, 5.0]).expand(N, Z, 2)
    out = MDNOutput(logit, mu, torch.zeros(N, Z, 2), None, None)
    g = torch.Generator().manual_seed(0)
    warm = sample_next_z(out, 1.0, g)
    cold = sample_next_z(out, 0.05, g)
    assert 0.65 < (warm < 0).float().mean() < 0.75  # tau = 1 follows the mixture
    assert (cold < 0).float().mean() > 0.999  # tau -> 0 picks the likely mode ...
    assert abs(cold.std() - np.sqrt(0.05)) < 0.02  # ... and narrows it by sqrt(tau)
    torch.testing.assert_close(sample_next_z(out, 0.0), torch.full((N, Z), -5.0))


def test_sequence_model_and_one_step_cell_agree():
    torch.manual_seed(0)
    m = MDNRNN(MDNRNNConfig(latent_size=6, hidden_size=16, n_gaussians=2))
    z, a = torch.randn(3, 7, 6), torch.randn(3, 7, 3)
    start = (torch.randn(3, 16), torch.randn(3, 16))
    seq, (h, c) = m(z, a, start)
    state, steps = start, []
    for t in range(7):
        out, state = m.step(z[:, t], a[:, t], state)
        steps.append(out)
    for name in MDNOutput._fields:
        torch.testing.assert_close(torch.stack([getattr(o, name) for o in steps], 1), getattr(seq, name))
    torch.testing.assert_close(state[0], h)
    torch.testing.assert_close(state[1], c)
    with torch.no_grad():  # and the cell really uses those weights
        m.rnn.weight_hh_l0.add_(0.1)
    assert not torch.allclose(m.step(z[:, 0], a[:, 0], start)[0].mu, steps[0].mu)


def test_windows_keep_the_last_step_for_reward_and_done():
    from train_mdnrnn import make_windows

    T, Z = 7, 2
    d = {"mu": np.arange(T * Z, dtype=np.float32).reshape(T, Z), "logvar": np.zeros((T, Z), np.float32),
         "actions": np.ones((T, 3), np.float32), "rewards": np.arange(T, dtype=np.float32),
         "terminated": np.arange(T) == T - 1}
    w = make_windows([d], seq_len=4)  # steps 0-3 and 4-6 (+ one pad)
    assert w["mu"].shape == (2, 5, Z) and w["actions"].shape == (2, 4, 3)
    np.testing.assert_array_equal(w["mu"][1, :3], d["mu"][4:7])  # frames 4..6, then padding
    assert w["step_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert w["z_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # no frame after step 6
    assert w["done"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]
    assert w["rewards"][1].tolist() == [4, 5, 6, 0]


def test_latents_are_reused_then_rebuilt_when_stale(tmp_path, synthetic_rollouts):
    files = sorted(synthetic_rollouts.glob("*.npz"))
    lat = tmp_path / "latents"
    vae_ckpt = load_checkpoint(write_tiny_vae(tmp_path / "v1", latent_size=8, seed=1))
    vae = ConvVAE.from_checkpoint(vae_ckpt)
    got = encode_rollouts(files, lat, vae, vae_ckpt["fingerprint"], progress=False)
    assert [p for p, _ in got] == files
    with torch.no_grad():
        expect_mu = vae.encode(torch.as_tensor(np.load(files[0])["observations"][:3]).permute(0, 3, 1, 2) / 255.0)[0]
    np.testing.assert_allclose(got[0][1]["mu"][:3], expect_mu.numpy(), rtol=1e-4, atol=1e-5)
    stamp = lambda: [os.stat(latent_path(lat, f)).st_mtime_ns for f in files]  # noqa: E731
    before = stamp()

    # Unchanged V and rollouts: nothing is rewritten.
    encode_rollouts(files, lat, vae, vae_ckpt["fingerprint"], progress=False)
    assert stamp() == before

    # A truncated file and a new rollout: only those two are (re)encoded.
    p0 = latent_path(lat, files[0])
    p0.write_bytes(p0.read_bytes()[:100])
    files += make_synthetic_rollouts(synthetic_rollouts, n=1, steps=12, seed=7)
    got = encode_rollouts(files, lat, vae, vae_ckpt["fingerprint"], progress=False)
    after = stamp()
    assert after[0] != before[0] and after[1:3] == before[1:3] and len(got) == 4
    np.testing.assert_allclose(got[0][1]["mu"][:3], expect_mu.numpy(), rtol=1e-4, atol=1e-5)

    # Another V (another latent size even): every file is rebuilt for it.
    v2 = load_checkpoint(write_tiny_vae(tmp_path / "v2", latent_size=5, seed=2))
    got = encode_rollouts(files, lat, ConvVAE.from_checkpoint(v2), v2["fingerprint"], progress=False)
    assert all(d["mu"].shape[1] == 5 and str(d["vae_fingerprint"]) == v2["fingerprint"] for _, d in got)
    with pytest.raises(UsageError, match="another V"):
        check_latent_size(got, 8)


def test_mismatched_world_model_pair_is_an_error(tmp_path):
    write_tiny_world_model(tmp_path)
    wm = load_world_model(tmp_path)
    assert wm.mdnrnn.cfg.latent_size == wm.vae.cfg.latent_size == 8
    assert not any(p.requires_grad for p in wm.mdnrnn.parameters())
    write_tiny_vae(tmp_path, latent_size=8, seed=5)  # retrained V, same size, same old M
    with pytest.raises(UsageError, match="trained on another V"):
        load_world_model(tmp_path)
    (tmp_path / "mdnrnn.pt").unlink()
    with pytest.raises(UsageError, match="train_mdnrnn.py"):
        load_world_model(tmp_path)


def tiny_config(tmp_path, **kw):
    from train_mdnrnn import Config

    return Config(**{"data_dir": str(tmp_path / "rollouts"), "latent_dir": str(tmp_path / "latents"),
                     "ckpt_dir": str(tmp_path / "ckpt"), "epochs": 1, "seq_len": 16, "batch_size": 4,
                     "hidden_size": 16, "n_gaussians": 2, "strip_steps": 4, "strip_start": 10,
                     "device": "cpu", **kw})


def test_resume_continues_exactly_where_it_stopped(tmp_path, synthetic_rollouts):
    from train_mdnrnn import main

    write_tiny_vae(tmp_path / "ckpt")
    main(tiny_config(tmp_path, epochs=2))
    straight = load_checkpoint(tmp_path / "ckpt" / "mdnrnn_last.pt", "mdnrnn")
    shutil.rmtree(tmp_path / "latents")  # (also: a missing latent set is rebuilt)
    for f in ("mdnrnn.pt", "mdnrnn_last.pt"):
        (tmp_path / "ckpt" / f).unlink()
    main(tiny_config(tmp_path, epochs=1))
    main(tiny_config(tmp_path, epochs=2))  # resumes from epoch 1
    resumed = load_checkpoint(tmp_path / "ckpt" / "mdnrnn_last.pt", "mdnrnn")
    assert resumed["epoch"] == 2
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v)
    rows = (tmp_path / "ckpt" / "mdnrnn_metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]

    new_v = load_checkpoint(write_tiny_vae(tmp_path / "ckpt", seed=3), "vae")
    with pytest.raises(UsageError, match="another V"):  # resuming the old M on a new V is refused
        main(tiny_config(tmp_path, epochs=3))
    main(tiny_config(tmp_path, epochs=1, restart=True))  # ... and --restart trains a new M on it
    fresh = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")
    assert fresh["epoch"] == 1 and fresh["vae_fingerprint"] == new_v["fingerprint"]
    assert len((tmp_path / "ckpt" / "mdnrnn_metrics.csv").read_text().splitlines()) == 2


def test_m_records_the_rollouts_action_repeat_and_never_mixes_two(tmp_path):
    from train_mdnrnn import main

    write_tiny_vae(tmp_path / "ckpt")
    rollouts, m_path = tmp_path / "rollouts", tmp_path / "ckpt" / "mdnrnn.pt"
    make_synthetic_rollouts(rollouts, steps=40)  # k = 1, as before the flag: no action_repeat array
    main(tiny_config(tmp_path))
    assert load_checkpoint(m_path, "mdnrnn")["model_args"]["action_repeat"] == 1
    # Checkpoints from before the flag have no action_repeat, and mean k = 1: they resume.
    last_path = tmp_path / "ckpt" / "mdnrnn_last.pt"
    last = load_checkpoint(last_path, "mdnrnn")
    del last["model_args"]["action_repeat"]
    save_checkpoint(last_path, last)
    assert main(tiny_config(tmp_path, epochs=2))["epoch"] == 2
    # The same tracks collected again at k = 3 (a third of the rows, same file names): the cached
    # latents are not reused, and M records k = 3.
    make_synthetic_rollouts(rollouts, steps=14, action_repeat=3)
    main(tiny_config(tmp_path, restart=True))
    assert all(len(np.load(f)["mu"]) == 14 for f in (tmp_path / "latents").glob("*.npz"))
    assert load_checkpoint(m_path, "mdnrnn")["model_args"]["action_repeat"] == 3
    assert load_world_model(tmp_path / "ckpt").mdnrnn.cfg.action_repeat == 3
    # Going on training that M on rollouts of k = 1 is refused ...
    other = tmp_path / "other"
    make_synthetic_rollouts(other, steps=40)
    with pytest.raises(UsageError, match="'action_repeat': 3}, this run asks for .*'action_repeat': 1}"):
        main(tiny_config(tmp_path, data_dir=str(other), epochs=2))
    # ... and so is a folder of both.
    make_synthetic_rollouts(rollouts, n=1, steps=40, seed=10)
    with pytest.raises(UsageError, match=r"mixes rollouts .*\(1 with --action-repeat 1, 3 with --action-repeat 3\)"):
        main(tiny_config(tmp_path, restart=True))


def test_missing_inputs_name_the_script_that_makes_them(tmp_path, synthetic_rollouts):
    from train_mdnrnn import main

    with pytest.raises(UsageError, match="train_vae.py"):
        main(tiny_config(tmp_path))
    with pytest.raises(UsageError, match="collect_rollouts.py"):
        main(tiny_config(tmp_path, data_dir=str(tmp_path / "nowhere")))


def test_a_latent_dir_that_cannot_be_written_is_one_line_before_encoding(tmp_path, synthetic_rollouts):
    write_tiny_vae(tmp_path / "ckpt")
    (tmp_path / "file").write_text("x")
    latents = tmp_path / "file" / "latents"  # its parent is a file: no one, root included, can write there
    r = run_script("train_mdnrnn.py", "--data-dir", str(synthetic_rollouts), "--latent-dir", str(latents),
                   "--ckpt-dir", str(tmp_path / "ckpt"), "--epochs", "1")
    assert error_line(r) == f"error: cannot write to --latent-dir {latents} (Not a directory); pass a writable folder"


def test_train_mdnrnn_end_to_end(tmp_path, synthetic_rollouts):
    ckpt = tmp_path / "ckpt"
    args = ["train_mdnrnn.py", "--data-dir", str(synthetic_rollouts), "--latent-dir",
            str(tmp_path / "latents"), "--ckpt-dir", str(ckpt), "--epochs", "1", "--seq-len", "16",
            "--batch-size", "4", "--hidden-size", "16", "--strip-steps", "4", "--device", "cpu"]
    write_tiny_vae(ckpt)
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    assert "epoch 1" in r.stdout
    for f in ("mdnrnn.pt", "mdnrnn_last.pt", "mdnrnn_metrics.csv", "mdnrnn_loss.png", "mdnrnn_strip.png"):
        assert (ckpt / f).stat().st_size > 0, f
    assert len(list((tmp_path / "latents").glob("rollout_*.npz"))) == 3
    m = load_checkpoint(ckpt / "mdnrnn.pt", "mdnrnn")
    assert m["vae_fingerprint"] == load_checkpoint(ckpt / "vae.pt", "vae")["fingerprint"]
    assert m["model_args"]["latent_size"] == 8 and np.isfinite(m["val_loss"])
    assert "optimizer" not in m and "optimizer" in load_checkpoint(ckpt / "mdnrnn_last.pt", "mdnrnn")
    world = load_world_model(ckpt)
    out, _ = world.mdnrnn.step(torch.zeros(2, 8), torch.zeros(2, 3), world.mdnrnn.initial_state(2))
    assert world.mdnrnn.sample_next_z(out, 1.0).shape == (2, 8)
    from PIL import Image

    w, h = Image.open(ckpt / "mdnrnn_strip.png").size
    assert h > 4 * 64 and w > 4 * 64  # four rows of four frames


def test_bench_mdnrnn_rates_are_work_done_over_seconds(monkeypatch):
    import argparse

    from bench import speed as bench
    import models

    clock = FakeClock(monkeypatch)
    # A training step costs 1/64 s (on its loss), a cell step 1/256 s on 1 row
    # and 1/16 s on 1024: powers of 2, so that the clock adds up exactly.
    monkeypatch.setattr(models, "mdn_loss", clock.charge(mdn_loss, lambda *_: 1 / 64))
    cell_cost = lambda self, z, *_: 1 / 256 if len(z) == 1 else 1 / 16  # noqa: E731
    monkeypatch.setattr(MDNRNN, "step", clock.charge(MDNRNN.step, cell_cost))
    args = argparse.Namespace(batch_size=2, seq_len=5, seconds=0.25, device="cpu", seed=0)
    result = bench.bench_mdnrnn(args)
    assert result["train_seq_per_s"] == 64 * 2  # 2 sequences a step
    assert result["cell_b1_calls_per_s"] == result["cell_b1_row_steps_per_s"] == 256
    assert result["cell_b1024_calls_per_s"] == 16 and result["cell_b1024_row_steps_per_s"] == 16 * 1024
    assert result["cell_batch_1024_vs_1_rows"] == 64



def test_m_holds_out_exactly_the_tracks_v_held_out(tmp_path, capsys):
    """V picks its validation rollouts by a seeded shuffle and vae.pt records
    them; M holds out the same tracks, also from another folder of them
    (another --action-repeat, as train_agent.sh trains M), and records its own."""
    import train_vae
    from train_mdnrnn import main
    from wm.env import COLLECT_SEED

    v_data = tmp_path / "v_rollouts"
    names = [p.name for p in make_synthetic_rollouts(v_data, n=10, steps=4, seed=COLLECT_SEED)]
    train_vae.main(train_vae.Config(data_dir=str(v_data), ckpt_dir=str(tmp_path / "ckpt"), epochs=1,
                                    batch_size=16, latent_size=8, val_fraction=0.3, precision="fp32"))
    v = load_checkpoint(tmp_path / "ckpt" / "vae.pt", "vae")
    assert len(v["val_rollouts"]) == 3 and v["val_rollouts"] != names[-3:]  # not the last files
    make_synthetic_rollouts(tmp_path / "rollouts", n=10, steps=12, seed=COLLECT_SEED, action_repeat=2)
    capsys.readouterr()
    main(tiny_config(tmp_path))
    m = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")
    assert m["val_rollouts"] == v["val_rollouts"] and m["train_rollouts"] == v["train_rollouts"]
    assert m["model_args"]["action_repeat"] == 2  # M did read the other folder
    assert "warning" not in capsys.readouterr().err

    # M's folder holds only V's validation tracks: nothing left to train on.
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    for name in v["val_rollouts"]:
        shutil.copy(tmp_path / "rollouts" / name, only_val / name)
    with pytest.raises(UsageError, match="none is left to train on"):
        main(tiny_config(tmp_path, data_dir=str(only_val), restart=True))

    # None of V's validation tracks in M's folder, or a vae.pt that records no
    # split: a warning, and the last rollouts are held out.
    other = tmp_path / "other"
    make_synthetic_rollouts(other, n=3, steps=12, seed=COLLECT_SEED + 50)
    main(tiny_config(tmp_path, data_dir=str(other), latent_dir=str(tmp_path / "other_latents"), restart=True))
    assert "none of the 3 rollouts" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")["val_rollouts"] == ["rollout_0010052.npz"]
    write_tiny_vae(tmp_path / "ckpt")
    main(tiny_config(tmp_path, data_dir=str(other), latent_dir=str(tmp_path / "other_latents"), restart=True))
    assert "does not record which rollouts V held out" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")["val_rollouts"] == ["rollout_0010052.npz"]


def test_train_mdnrnn_per_frame_mixture(tmp_path, synthetic_rollouts):
    """--mixture frame trains an M whose head has K logits; its run resumes
    only as frame, and a nonsense mixture is one line."""
    ckpt = tmp_path / "ckpt"
    args = ["train_mdnrnn.py", "--data-dir", str(synthetic_rollouts), "--latent-dir", str(tmp_path / "latents"),
            "--ckpt-dir", str(ckpt), "--epochs", "1", "--seq-len", "16", "--batch-size", "4", "--hidden-size", "16",
            "--n-gaussians", "3", "--strip-steps", "4", "--device", "cpu"]
    write_tiny_vae(ckpt)
    r = run_script(*args, "--mixture", "frame")
    assert r.returncode == 0, r.stderr
    m = load_checkpoint(ckpt / "mdnrnn.pt", "mdnrnn")
    assert m["model_args"]["mixture"] == "frame" and np.isfinite(m["val_loss"])
    assert m["model"]["mdn.weight"].shape == ((1 + 2 * 8) * 3, 16)
    world = load_world_model(ckpt)
    out, _ = world.mdnrnn.step(torch.zeros(2, 8), torch.zeros(2, 3), world.mdnrnn.initial_state(2))
    assert out.logit_pi.shape == (2, 1, 3) and out.mu.shape == (2, 8, 3)
    r = run_script(*args, "--epochs", "2")  # the default, dim, against a frame run's mdnrnn_last.pt
    last = r.stderr.strip().splitlines()[-1]  # after the synthetic V's hold-out warning
    assert r.returncode == 2 and last.startswith("error: ") and "'mixture': 'frame'" in last and "--restart" in last
    r = run_script(*args, "--mixture", "pixel")
    assert error_line(r) == "error: --mixture must be one of dim, frame, got 'pixel'"


def test_init_from_another_mixture_keeps_the_lstm_and_the_reward_and_done_heads(tmp_path, synthetic_rollouts):
    from train_mdnrnn import main

    write_tiny_vae(tmp_path / "ckpt")
    main(tiny_config(tmp_path))
    first = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")
    fine = tmp_path / "fine"
    fine.mkdir()
    shutil.copy(tmp_path / "ckpt" / "vae.pt", fine / "vae.pt")
    main(tiny_config(tmp_path, ckpt_dir=str(fine), init_from=str(tmp_path / "ckpt" / "mdnrnn.pt"), lr=1e-12,
                     mixture="frame", seed=5))
    tuned = load_checkpoint(fine / "mdnrnn.pt", "mdnrnn")
    assert tuned["model_args"]["mixture"] == "frame"
    kept = [k for k in first["model"] if not k.startswith("mdn.")]
    assert kept and all(torch.allclose(tuned["model"][k], first["model"][k], atol=1e-6) for k in kept)
    assert tuned["model"]["mdn.weight"].shape[0] == (1 + 2 * 8) * 2 != first["model"]["mdn.weight"].shape[0]
    # --head-only: at a learning rate that moves weights, only the mixture head moves.
    main(tiny_config(tmp_path, ckpt_dir=str(fine), restart=True, init_from=str(tmp_path / "ckpt" / "mdnrnn.pt"),
                     mixture="frame", head_only=True, epochs=2, seed=5))
    head = load_checkpoint(fine / "mdnrnn.pt", "mdnrnn")
    assert all(torch.equal(head["model"][k], first["model"][k]) for k in kept)
    assert not torch.allclose(head["model"]["mdn.weight"], tuned["model"]["mdn.weight"], atol=1e-4)
    with pytest.raises(UsageError, match="--head-only .* --init-from"):
        main(tiny_config(tmp_path, ckpt_dir=str(fine), restart=True, head_only=True))


def test_init_from_fine_tunes_another_m_and_refuses_a_mismatched_one(tmp_path, synthetic_rollouts):
    """--init-from starts a fresh run at that mdnrnn.pt's weights (a learning
    rate too small to move them leaves them as they were); an M of another V
    or size, or no file, is one line."""
    from train_mdnrnn import main

    write_tiny_vae(tmp_path / "ckpt")
    main(tiny_config(tmp_path))
    first = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")
    fine = tmp_path / "fine"
    fine.mkdir()
    shutil.copy(tmp_path / "ckpt" / "vae.pt", fine / "vae.pt")
    # Another seed, so that a fresh start would begin from other weights.
    main(tiny_config(tmp_path, ckpt_dir=str(fine), init_from=str(tmp_path / "ckpt" / "mdnrnn.pt"), lr=1e-12, seed=5))
    tuned = load_checkpoint(fine / "mdnrnn.pt", "mdnrnn")
    assert all(torch.allclose(tuned["model"][k], v, atol=1e-6) for k, v in first["model"].items())
    main(tiny_config(tmp_path, ckpt_dir=str(fine), restart=True, lr=1e-12, seed=5))
    fresh = load_checkpoint(fine / "mdnrnn.pt", "mdnrnn")
    assert not torch.allclose(fresh["model"]["mdn.weight"], first["model"]["mdn.weight"], atol=1e-3)

    with pytest.raises(UsageError, match="no such file"):
        main(tiny_config(tmp_path, ckpt_dir=str(fine), restart=True, init_from=str(tmp_path / "none.pt")))
    with pytest.raises(UsageError, match="an M with .*hidden_size"):
        main(tiny_config(tmp_path, ckpt_dir=str(fine), restart=True, hidden_size=8,
                         init_from=str(tmp_path / "ckpt" / "mdnrnn.pt")))
    write_tiny_vae(fine, seed=3)
    with pytest.raises(UsageError, match="another V"):
        main(tiny_config(tmp_path, ckpt_dir=str(fine), restart=True, init_from=str(tmp_path / "ckpt" / "mdnrnn.pt")))


def test_a_growing_folder_keeps_m_s_held_out_rollouts(tmp_path, capsys):
    """Without V's split, M holds out every m-th rollout: rollouts of newer
    tracks added to the folder (a loop's rounds) leave the old split as it
    was, and the newest are trained on too."""
    from train_mdnrnn import main
    from wm.env import COLLECT_SEED

    write_tiny_vae(tmp_path / "ckpt")
    ro = tmp_path / "rollouts"
    make_synthetic_rollouts(ro, n=8, steps=12, seed=COLLECT_SEED + 900)
    main(tiny_config(tmp_path, val_fraction=0.25))
    before = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")["val_rollouts"]
    assert before == ["rollout_0010903.npz", "rollout_0010907.npz"]
    make_synthetic_rollouts(ro, n=12, steps=12, seed=COLLECT_SEED + 900)  # 4 more tracks
    main(tiny_config(tmp_path, val_fraction=0.25, restart=True))
    after = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")
    assert after["val_rollouts"] == [*before, "rollout_0010911.npz"]
    assert "rollout_0010908.npz" in after["train_rollouts"] and "every 4th" in capsys.readouterr().err
