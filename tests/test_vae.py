"""V: the ConvVAE, its loss, and train_vae.py end to end on synthetic rollouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.vae_cpu
from models import ConvVAE, VAEConfig
from models.vae import vae_loss


def test_parameter_count_matches_the_paper():
    assert sum(p.numel() for p in ConvVAE(VAEConfig()).parameters()) == 4_348_547


def test_shapes_and_ranges():
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(latent_size=8))
    x = torch.rand(5, 3, 64, 64)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, 8)
    z = vae.reparameterize(mu, logvar)
    assert z.shape == (5, 8)
    out = vae.decode(z)
    assert out.shape == (5, 3, 64, 64)
    assert out.min() >= 0 and out.max() <= 1
    recon, mu2, _ = vae(x)
    assert recon.shape == x.shape
    torch.testing.assert_close(mu2, mu)


def test_reparameterize_samples_the_posterior():
    torch.manual_seed(0)
    mu = torch.full((20000, 2), 3.0)
    logvar = torch.log(torch.tensor([0.25, 4.0])).expand(20000, 2)
    z = ConvVAE.reparameterize(mu, logvar)
    torch.testing.assert_close(z.mean(0), torch.tensor([3.0, 3.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)


@pytest.mark.parametrize("cpu_forms", [True, False], ids=["cpu-forms", "as-called-on-a-gpu"])
def test_encode_matches_the_layers_called_in_order(cpu_forms, monkeypatch):
    """On CPUs the last convolution is a matrix product over its input
    patches; values and gradients must be what torch's plain convolutions give."""
    monkeypatch.setattr(models.vae_cpu, "applies", lambda x: cpu_forms)
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig()).double()
    x = torch.rand(3, 3, 64, 64, dtype=torch.double)
    h = x
    for conv in vae.enc:
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, stride=conv.stride))
    h = h.flatten(1)
    expected = (vae.fc_mu(h), vae.fc_logvar(h))
    got = vae.encode(x)
    weights = [torch.randn_like(t) for t in expected]
    params = [p for name, p in vae.named_parameters() if not name.startswith(("dec", "fc_dec"))]
    grads = [torch.autograd.grad(sum((t * w).sum() for t, w in zip(out, weights)), params)
             for out in (got, expected)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cpu_forms", [True, False], ids=["cpu-forms", "as-called-on-a-gpu"])
def test_decode_matches_the_layers_called_in_order(cpu_forms, monkeypatch):
    """On CPUs the first transposed convolution is a matrix product, the
    second adds its bias apart and the last runs its forward pass as a
    convolution and a pixel shuffle; values and gradients must be what
    torch's plain transposed convolutions give."""
    monkeypatch.setattr(models.vae_cpu, "applies", lambda x: cpu_forms)
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig()).double()
    z = torch.randn(4, 32, dtype=torch.double)
    h = vae.fc_dec(z)[:, :, None, None]
    for i, deconv in enumerate(vae.dec):
        h = F.conv_transpose2d(h, deconv.weight, deconv.bias, stride=deconv.stride)
        h = torch.sigmoid(h) if i == len(vae.dec) - 1 else F.relu(h)
    weights = torch.randn_like(h)
    expected = torch.autograd.grad((h * weights).sum(), list(vae.parameters()), allow_unused=True)
    got = vae.decode(z)
    torch.testing.assert_close(got, h)
    grads = torch.autograd.grad((got * weights).sum(), list(vae.parameters()), allow_unused=True)
    for (name, _), a, b in zip(vae.named_parameters(), grads, expected):
        if b is None:  # the encoder's
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, msg=name)


def test_loss_against_a_reference():
    torch.manual_seed(0)
    x, recon = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    mu, logvar = torch.randn(4, 32) * 3, torch.randn(4, 32)
    loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_floor=0.0)
    ref_rec = F.mse_loss(recon, x, reduction="sum") / 4
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(32), torch.ones(32))
    ref_kl = torch.distributions.kl_divergence(q, p).sum(1).mean()
    torch.testing.assert_close(rec, ref_rec)
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(loss, ref_rec + ref_kl)


def test_weighted_loss_is_the_plain_loss_with_unit_weights_and_weights_each_pixel():
    torch.manual_seed(0)
    x, recon = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    mu, logvar = torch.randn(3, 32), torch.randn(3, 32)
    plain = vae_loss(recon, x, mu, logvar)
    ones = vae_loss(recon, x, mu, logvar, weights=torch.ones(3, 64, 64))
    for a, b in zip(plain, ones):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    w = torch.rand(3, 64, 64) * 5
    loss, rec, kl = vae_loss(recon, x, mu, logvar, kl_floor=0.0, weights=w)
    # Each pixel's squared error, summed over its channels, times its own weight.
    torch.testing.assert_close(rec, torch.einsum("bchw,bhw->b", (recon - x) ** 2, w).mean())
    torch.testing.assert_close(loss, rec + kl)


def test_squared_error_by_region_against_masked_means():
    from models.vae import squared_error_by_region

    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    mask = torch.rand(2, 64, 64) < 0.3
    on, n_on, off, n_off = squared_error_by_region(recon, x, mask).tolist()
    sq = (recon - x) ** 2
    m3 = mask[:, None].expand_as(sq)
    assert n_on == m3.sum().item() and n_off == (~m3).sum().item()
    assert abs(on / n_on - sq[m3].mean().item()) < 1e-6
    assert abs(off / n_off - sq[~m3].mean().item()) < 1e-6


def test_kl_floor_is_half_a_nat_per_dimension_per_image():
    x = torch.rand(2, 3, 64, 64)
    # Image 0 sits at the prior (KL 0, below the floor), image 1 far from it.
    mu = torch.zeros(2, 32)
    mu[1] = 3.0
    mu.requires_grad_()
    logvar = torch.zeros(2, 32, requires_grad=True)
    loss, rec, kl = vae_loss(x, x, mu, logvar, kl_floor=0.5)
    assert rec.item() == 0
    kl1 = 0.5 * 9.0 * 32  # 0.5 * mu^2 summed over 32 dimensions
    assert abs(kl.item() - kl1 / 2) < 1e-4  # logged KL is the true one
    assert abs(loss.item() - (0.5 * 32 + kl1) / 2) < 1e-4  # image 0 pays the floor, 16 nats
    loss.backward()
    assert torch.all(mu.grad[0] == 0) and torch.all(logvar.grad[0] == 0)  # no pull below the floor
    assert torch.all(mu.grad[1] > 0)  # above it, the KL still pulls toward the prior


def test_loss_drops_when_overfitting_one_batch():
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(latent_size=8))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    x = torch.rand(2, 3, 1, 1) * torch.ones(2, 3, 64, 64)  # two flat frames, one with a band
    x[1, :, :32] = torch.rand(3, 1, 1)
    losses = []
    for _ in range(15):
        recon, mu, logvar = vae(x)
        loss, _, _ = vae_loss(recon, x, mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_from_checkpoint_rebuilds_the_model():
    from dataclasses import asdict

    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(latent_size=16))
    copy = ConvVAE.from_checkpoint({"model": vae.state_dict(), "model_args": asdict(vae.cfg)})
    assert copy.cfg == VAEConfig(latent_size=16)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(copy.encode(x), vae.encode(x))


# ---------------------------------------------------------------------------
# train_vae.py

import hashlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import train_vae  # noqa: E402
import wm.vae_training  # noqa: E402
from conftest import FakeClock, error_line, make_synthetic_rollouts, run_script  # noqa: E402
from wm.checkpoint import state_fingerprint  # noqa: E402
from wm.cli import UsageError  # noqa: E402
from wm.files import temporary_path  # noqa: E402
from wm.rollouts import rollout_path, write_rollout  # noqa: E402

OUTPUTS = ("vae.pt", "vae_last.pt", "vae_metrics.csv", "vae_loss.png", "vae_recon.png",
           "vae_samples.png")


def tiny(data_dir, ckpt_dir, **kw) -> train_vae.Config:
    # fp32: bf16 has its own test, and the subprocess run uses the default
    # and a constant rate: a cosine schedule ends where --epochs says, so a resume
    # with more epochs is not the straight run (tests/test_view.py tests it)
    return train_vae.Config(**{"data_dir": str(data_dir), "ckpt_dir": str(ckpt_dir), "epochs": 1,
                               "batch_size": 16, "precision": "fp32", "lr_schedule": "constant", **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic rollouts and the checkpoint folder after one tiny epoch."""
    root = tmp_path_factory.mktemp("vae")
    make_synthetic_rollouts(root / "rollouts", n=3, steps=16)  # one batch of 16 per rollout
    train_vae.main(tiny(root / "rollouts", root / "ckpt"))
    return root


def copy_of(trained, tmp_path) -> tuple[Path, Path]:
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    return trained / "rollouts", tmp_path / "ckpt"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_round_trip_with_weights_only(trained):
    ckpt = torch.load(trained / "ckpt" / "vae.pt", weights_only=True)
    assert ckpt["kind"] == "vae" and ckpt["epoch"] == 1
    assert ckpt["model_args"] == {"latent_size": 32, "view": "full"}
    vae = ConvVAE.from_checkpoint(ckpt)
    assert state_fingerprint(vae.state_dict()) == ckpt["fingerprint"]
    assert all(torch.isfinite(torch.tensor(ckpt[k])) for k in ("val_loss", "val_recon", "val_kl"))
    assert set(ckpt["train_rollouts"]).isdisjoint(ckpt["val_rollouts"])
    assert "optimizer" not in ckpt  # weights only; Adam's state is in vae_last.pt, for resuming


def test_resume_continues_the_epoch_count(trained, tmp_path, capsys):
    data, ckpt = copy_of(trained, tmp_path)
    first = torch.load(ckpt / "vae_last.pt", weights_only=True)
    steps = first["optimizer"]["state"][0]["step"].item()
    killed = subprocess.Popen([sys.executable, "-c", ""])
    killed.wait()
    half = temporary_path(ckpt / "vae_last.pt", killed.pid)  # what a save killed half-way leaves
    half.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    train_vae.main(tiny(data, ckpt, epochs=2))
    assert not half.exists()  # the next save of vae_last.pt removed it
    out = capsys.readouterr().out
    assert "resuming" in out and "epoch 2 " in out and "epoch 1 " not in out
    last = torch.load(ckpt / "vae_last.pt", weights_only=True)
    assert last["epoch"] == 2
    assert last["optimizer"]["state"][0]["step"].item() == 2 * steps  # Adam's state came along
    rows = train_vae.MetricsLog(ckpt / "vae_metrics.csv").rows()
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # ... and lands exactly where two epochs in one run do: weights, Adam's state, losses.
    train_vae.main(tiny(data, tmp_path / "straight", epochs=2))
    straight = torch.load(tmp_path / "straight" / "vae_last.pt", weights_only=True)
    for k, v in straight["model"].items():
        assert torch.equal(last["model"][k], v), k
    for k, v in straight["optimizer"]["state"][0].items():
        assert torch.equal(last["optimizer"]["state"][0][k], v), k
    straight_rows = train_vae.MetricsLog(tmp_path / "straight" / "vae_metrics.csv").rows()
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in rows] == [r[key] for r in straight_rows], key
    # Asking for epochs already done trains nothing; --restart starts over.
    train_vae.main(tiny(data, ckpt, epochs=2))
    assert torch.load(ckpt / "vae_last.pt", weights_only=True)["epoch"] == 2
    train_vae.main(tiny(data, ckpt, epochs=1, restart=True))
    assert torch.load(ckpt / "vae_last.pt", weights_only=True)["epoch"] == 1
    assert len(train_vae.MetricsLog(ckpt / "vae_metrics.csv").rows()) == 1


def test_script_end_to_end(synthetic_rollouts, tmp_path):
    ckpt = tmp_path / "ckpt"
    r = run_script("train_vae.py", "--data-dir", str(synthetic_rollouts), "--ckpt-dir", str(ckpt),
                   "--epochs", "1", "--batch-size", "32", "--latent-size", "8", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "epoch 1 " in r.stdout and "img/s" in r.stdout
    for name in OUTPUTS:
        assert (ckpt / name).is_file(), name
    rows = train_vae.MetricsLog(ckpt / "vae_metrics.csv").rows()
    assert len(rows) == 1 and {"train_loss", "val_loss", "val_recon", "val_kl", "img_per_s"} <= set(rows[0])
    recon = Image.open(ckpt / "vae_recon.png")
    assert recon.width > 8 * 64 and recon.height >= 2 * 64  # 8 frames above 8 reconstructions
    ckpt_data = torch.load(ckpt / "vae.pt", weights_only=True)
    assert ckpt_data["model_args"] == {"latent_size": 8, "view": "full"} and ckpt_data["config"]["batch_size"] == 32


def test_a_ckpt_dir_that_cannot_be_written_is_one_line_before_training(synthetic_rollouts, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "ckpt"  # its parent is a file: no one, root included, can write there
    r = run_script("train_vae.py", "--data-dir", str(synthetic_rollouts), "--ckpt-dir", str(out), "--epochs", "1")
    assert error_line(r) == f"error: cannot write to --ckpt-dir {out} (Not a directory); pass a writable folder"
    assert "epoch" not in r.stdout


def test_missing_or_empty_data_dir_names_collect_rollouts(tmp_path):
    for data in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(UsageError, match="collect_rollouts.py"):
            train_vae.main(tiny(data, tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


def test_wrong_frame_shape_is_a_clear_error(tmp_path):
    make_synthetic_rollouts(tmp_path / "r", n=2, steps=5)
    write_rollout(rollout_path(tmp_path / "r", 9), observations=np.zeros((5, 96, 96, 3), np.uint8),
                  actions=np.zeros((5, 3), np.float32), rewards=np.zeros(5, np.float32),
                  terminated=np.zeros(5, bool), truncated=np.zeros(5, bool), view=np.array("full"))
    with pytest.raises(UsageError, match=r"rollout_0000009.npz: frames are \(5, 96, 96, 3\)"):
        train_vae.main(tiny(tmp_path / "r", tmp_path / "ckpt"))


def test_unreadable_rollouts_are_skipped_with_a_warning(tmp_path):
    data = tmp_path / "r"
    good = make_synthetic_rollouts(data, n=3, steps=16)
    truncated = rollout_path(data, 7)
    truncated.write_bytes(good[0].read_bytes()[:500])  # a kill mid-write by another tool
    no_actions = rollout_path(data, 8)  # frames fine, the rest missing: caught while streaming
    with zipfile.ZipFile(good[1]) as src, zipfile.ZipFile(no_actions, "w") as dst:
        for name in ("observations.npy", "view.npy"):
            dst.writestr(name, src.read(name))
    with pytest.warns(UserWarning) as caught:
        row = train_vae.main(tiny(data, tmp_path / "ckpt", val_fraction=0.5))
    messages = " ".join(str(w.message) for w in caught)
    assert "rollout_0000007.npz" in messages and "rollout_0000008.npz" in messages
    assert row["epoch"] == 1 and (tmp_path / "ckpt" / "vae.pt").is_file()


def test_nan_loss_stops_and_leaves_the_checkpoints_whole(trained, tmp_path, monkeypatch):
    data, ckpt = copy_of(trained, tmp_path)
    before = {name: digest(ckpt / name) for name in ("vae.pt", "vae_last.pt")}

    def nan_loss(recon, x, mu, logvar, kl_floor=0.5, weights=None):
        nan = torch.tensor(float("nan"), device=recon.device)  # on CUDA too, as the real loss is
        return nan + 0 * recon.sum(), nan, nan

    monkeypatch.setattr(wm.vae_training, "vae_loss", nan_loss)
    with pytest.raises(UsageError, match="diverged in epoch 2.*vae_last.pt is left"):
        train_vae.main(tiny(data, ckpt, epochs=2))
    assert {name: digest(ckpt / name) for name in before} == before
    assert not list(ckpt.glob(".*.tmp*"))


def test_split_is_by_rollout_and_fixed_by_the_seed():
    files = [Path(f"rollout_{i:07d}.npz") for i in range(20)]
    train, val = train_vae.split_rollouts(files, 0.1, seed=3)
    assert len(val) == 2 and sorted(train + val) == files
    assert train_vae.split_rollouts(files, 0.1, seed=3) == (train, val)
    assert any(train_vae.split_rollouts(files, 0.1, seed=s)[1] != val for s in range(4, 8))
    with pytest.raises(UsageError, match="at least 2 rollouts"):
        train_vae.split_rollouts(files[:1], 0.1, seed=0)


def test_frame_batches_stream_every_frame_once_shuffled(tmp_path):
    files = make_synthetic_rollouts(tmp_path, n=5, steps=7)
    frames = np.concatenate([np.load(f)["observations"] for f in files])
    batches = list(train_vae.frame_batches(files, 4, buffer_rollouts=2, bad=set(),
                                           rng=np.random.default_rng(0)))
    assert [len(b) for b in batches] == [4] * 8 + [3]
    streamed = np.concatenate(batches)
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(streamed) == key(frames)
    assert not np.array_equal(streamed, frames)
    in_order = np.concatenate(list(train_vae.frame_batches(files, 4, 2, set())))
    assert np.array_equal(in_order, frames)


def test_prefetch_raises_the_threads_error_and_stops_early():
    def broken():
        yield np.zeros(1)
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        list(train_vae.prefetch(broken()))
    started = threading.active_count()
    for _ in train_vae.prefetch(np.zeros((3, 1)) for _ in range(1000)):
        break
    for _ in range(50):
        if threading.active_count() <= started:
            break
        threading.Event().wait(0.05)
    assert threading.active_count() <= started


def test_bf16_step_gives_the_fp32_loss():
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig())
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), np.uint8))
    losses = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        opt = torch.optim.SGD(vae.parameters(), lr=0.0)
        losses.append(train_vae.train_step(vae, opt, frames, torch.device("cpu"), dtype, 0.5))
    assert abs(losses[1][1] / losses[0][1] - 1) < 0.01  # reconstruction term within 1%
    assert train_vae.pick_precision("fp32", torch.device("cpu")) is None
    assert train_vae.pick_precision("auto", torch.device("cuda")) is None  # bf16 measured slower there
    with pytest.raises(UsageError):
        train_vae.pick_precision("fp16", torch.device("cpu"))


def test_bench_vae_rates_are_images_over_each_step_s_median_round(monkeypatch):
    import argparse

    from bench import speed as bench
    import models.vae_cpu

    clock = FakeClock(monkeypatch)
    # The plain step costs 3 s and train_vae's 1 s (on their losses, which
    # each calls once a step); one round of the plain step stalls.
    plain = iter([3, 3] + [3, 100, 3])  # 2 warm-up steps, then 3 rounds of 1
    monkeypatch.setattr(models.vae, "vae_loss", clock.charge(vae_loss, lambda *_: next(plain)))
    monkeypatch.setattr(wm.vae_training, "vae_loss", clock.charge(vae_loss, lambda *_: 1))
    args = argparse.Namespace(batch_size=4, steps=1, rounds=3, threads=1, device="cpu", seed=0)
    threads = torch.get_num_threads()
    try:
        result = bench.bench_vae(args)
    finally:
        torch.set_num_threads(threads)  # the bench leaves its --threads set
    # 4 images a round, in 3 s (the median round: the stall is left out) and in 1 s.
    assert result["baseline_img_per_s"] == round(4 / 3, 1)
    assert result["fast_fp32_img_per_s"] == result["img_per_s"] == 4
    assert result["ratio"] == 3
