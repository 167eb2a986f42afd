"""The GPU path: each model trains a step on CUDA, and a diverged V stops cleanly there.

These run only where CUDA is visible (a GPU machine); elsewhere they
are skipped with the reason. The rest of the suite also runs with CUDA visible,
since `--device auto` then picks the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_synthetic_rollouts, write_tiny_vae
from wm.checkpoint import load_checkpoint
from wm.cli import UsageError
import wm.vae_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def on_cpu_only(obj) -> bool:
    """Every tensor in a loaded checkpoint (nested dicts and lists) is on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "cpu"
    if isinstance(obj, dict):
        return all(on_cpu_only(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(on_cpu_only(v) for v in obj)
    return True


def test_v_trains_on_the_gpu_and_stops_cleanly_on_a_nan(tmp_path, monkeypatch):
    import train_vae

    make_synthetic_rollouts(tmp_path / "rollouts", n=3, steps=16)
    cfg = dict(data_dir=str(tmp_path / "rollouts"), ckpt_dir=str(tmp_path / "ckpt"), batch_size=16,
               device="cuda")
    row = train_vae.main(train_vae.Config(epochs=1, **cfg))  # precision auto: bf16 where it pays
    assert row["epoch"] == 1 and np.isfinite(row["val_loss"])
    for name in ("vae.pt", "vae_last.pt"):  # written on the GPU, loadable on a machine without one
        assert on_cpu_only(torch.load(tmp_path / "ckpt" / name, weights_only=True))

    def nan_loss(recon, x, mu, logvar, kl_floor=0.5):
        nan = torch.tensor(float("nan"), device=recon.device)
        return nan + 0 * recon.sum(), nan, nan

    before = (tmp_path / "ckpt" / "vae_last.pt").read_bytes()
    monkeypatch.setattr(wm.vae_training, "vae_loss", nan_loss)
    with pytest.raises(UsageError, match="diverged in epoch 2"):
        train_vae.main(train_vae.Config(epochs=2, **cfg))
    assert (tmp_path / "ckpt" / "vae_last.pt").read_bytes() == before


def test_m_trains_on_the_gpu(tmp_path):
    from train_mdnrnn import Config, main

    make_synthetic_rollouts(tmp_path / "rollouts", n=3, steps=40)
    write_tiny_vae(tmp_path / "ckpt")
    main(Config(data_dir=str(tmp_path / "rollouts"), latent_dir=str(tmp_path / "latents"),
                ckpt_dir=str(tmp_path / "ckpt"), epochs=1, seq_len=16, batch_size=4, hidden_size=16,
                n_gaussians=2, strip_steps=4, strip_start=10, device="cuda"))
    m = load_checkpoint(tmp_path / "ckpt" / "mdnrnn.pt", "mdnrnn")
    assert m["epoch"] == 1 and np.isfinite(m["val_loss"])
    for name in ("mdnrnn.pt", "mdnrnn_last.pt"):
        assert on_cpu_only(torch.load(tmp_path / "ckpt" / name, weights_only=True))


def test_c_evolves_in_the_dream_on_the_gpu(tmp_path):
    from test_dream import dream_config, dream_setup
    from train_controller import main

    ckpt, latents = dream_setup(tmp_path)
    main(dream_config(ckpt, latents, generations=1, device="cuda"))
    c = load_checkpoint(ckpt / "controller.pt", "controller")
    assert c["generation"] == 1 and np.isfinite(c["held_out"])


def test_v_gives_the_same_numbers_on_the_gpu_as_on_the_cpu():
    """On the GPU V calls its layers as they are; on the CPU it computes some
    in faster forms (models/vae_cpu.py). Both must give the same values and gradients."""
    from models import ConvVAE, VAEConfig

    torch.manual_seed(0)
    cpu = ConvVAE(VAEConfig())
    gpu = ConvVAE(VAEConfig()).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.rand(4, 3, 64, 64)
    results = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):  # fp32 exactly
            mu, logvar = model.encode(x.to(device))
            frames = model.decode(mu)
            (frames.sum() + logvar.sum()).backward()
        grads = [p.grad.cpu() for p in model.parameters()]
        results.append([mu.detach().cpu(), logvar.detach().cpu(), frames.detach().cpu(), *grads])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
