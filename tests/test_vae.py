"""V: the ConvVAE, its loss, and train_vae.py end to end on synthetic rollouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def test_decode_matches_the_layers_called_in_order():
    """decode computes the first transposed convolution as a matrix product;
    it must give what the plain layer gives."""
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig()).double()
    z = torch.randn(4, 32, dtype=torch.double)
    h = vae.fc_dec(z)[:, :, None, None]
    for i, deconv in enumerate(vae.dec):
        h = deconv(h)
        h = torch.sigmoid(h) if i == len(vae.dec) - 1 else F.relu(h)
    torch.testing.assert_close(vae.decode(z), h)


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
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = torch.rand(1, 3, 1, 1) * torch.ones(4, 3, 64, 64)  # four flat frames of one colour
    x[1:, :, :32] = torch.rand(3, 3, 1, 1)
    losses = []
    for _ in range(30):
        recon, mu, logvar = vae(x)
        loss, _, _ = vae_loss(recon, x, mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_from_checkpoint_rebuilds_the_model():
    from dataclasses import asdict

    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(latent_size=16))
    copy = ConvVAE.from_checkpoint({"model": vae.state_dict(), "model_args": asdict(vae.cfg)})
    assert copy.cfg == VAEConfig(latent_size=16)
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(copy.encode(x), vae.encode(x))
