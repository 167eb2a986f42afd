"""V: the convolutional variational autoencoder of World Models (Ha & Schmidhuber 2018).

A 64x64x3 frame in [0, 1] is encoded to the mean and log-variance of a
diagonal Gaussian over z (32 numbers), and z is decoded back to a frame.
Later stages go through `encode`, `reparameterize` and `decode` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import vae_cpu as cpu


@dataclass
class VAEConfig:
    latent_size: int = 32  # size of z (the paper: 32)
    view: str = "road"  # what of the game's frame V sees (wm/frames.py): road (the paper's crop) or full (with the dashboard)


class ConvVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        # The paper's layers. Four are torch's own in a form CPUs run faster
        # (models/vae_cpu.py): the same parameters and the same numbers.
        # Encoder: four stride-2 convolutions, 64 -> 31 -> 14 -> 6 -> 2 pixels.
        self.enc = nn.ModuleList([
            nn.Conv2d(3, 32, 4, stride=2),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.Conv2d(64, 128, 4, stride=2),
            cpu.PatchConv2d(128, 256, 4, stride=2),
        ])
        self.fc_mu = nn.Linear(1024, cfg.latent_size)
        self.fc_logvar = nn.Linear(1024, cfg.latent_size)
        # Decoder: z -> 1024 numbers seen as a 1x1 image, then 1 -> 5 -> 13 -> 30 -> 64 pixels.
        self.fc_dec = nn.Linear(cfg.latent_size, 1024)
        self.dec = nn.ModuleList([
            cpu.PointConvTranspose2d(1024, 128, 5, stride=2),
            cpu.UnfusedBiasConvTranspose2d(128, 64, 5, stride=2),
            nn.ConvTranspose2d(64, 32, 6, stride=2),
            cpu.SubpixelConvTranspose2d(32, 3, 6, stride=2),
        ])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 64, 64) frames in [0, 1] -> mu, logvar, each (B, Z)."""
        h = x
        for conv in self.enc:
            h = F.relu(conv(h))  # (B, 256, 2, 2) after the last
        h = h.flatten(1)  # (B, 1024)
        # float32 even under bf16 autocast: z and the KL need the precision.
        return _at_least_fp32(self.fc_mu(h)), _at_least_fp32(self.fc_logvar(h))  # (B, Z) each

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A sample z ~ N(mu, exp(logvar)) that gradients flow through."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # (B, Z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) -> (B, 3, 64, 64) frames in [0, 1]."""
        h = self.fc_dec(z)[:, :, None, None]  # (B, 1024, 1, 1)
        for deconv in self.dec[:-1]:
            h = F.relu(deconv(h))  # (B, 32, 30, 30) after the third
        return torch.sigmoid(_at_least_fp32(self.dec[-1](h)))  # (B, 3, 64, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "ConvVAE":
        """Rebuild from a checkpoint dict (see wm.checkpoint.load_checkpoint)."""
        model = cls(VAEConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def vae_loss(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_floor: float = 0.5, weights: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's loss: summed squared error per image plus the KL divergence
    to N(0, I), each averaged over the batch.

    `weights` (B, 64, 64), if given, scales each pixel's squared error (all
    three channels alike): wm.frames.recon_weights, mean 1 per image, so the
    sum stays on the paper's scale. None is the paper's loss.

    Returns (loss, recon_loss, kl). `kl` is the true KL, for logging; `loss`
    uses the floored one described below.
    """
    recon, mu, logvar = _at_least_fp32(recon), _at_least_fp32(mu), _at_least_fp32(logvar)
    sq = (recon - x).pow(2)  # (B, 3, 64, 64)
    if weights is not None:
        sq = sq * weights.unsqueeze(-3)
    recon_loss = sq.flatten(1).sum(1)  # (B,)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)  # (B,)
    # Free bits, as in the paper's code (kl_tolerance = 0.5): each image's KL
    # is clamped from below at kl_floor nats per latent dimension, so once it
    # is that small the KL term has no gradient and the encoder is free to
    # spend those nats on reconstruction instead of collapsing z to the prior.
    kl_floored = kl.clamp(min=kl_floor * mu.shape[1])  # (B,)
    loss = (recon_loss + kl_floored).mean()
    return loss, recon_loss.mean(), kl.mean()


def squared_error_by_region(recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sums for per-region errors over many batches: (4,) float64 tensor of the
    squared error summed over the pixels `mask` (B, 64, 64) marks, their count
    (pixels x channels), and the same two for the other pixels. A region's
    mean squared error per value is its sum over its count."""
    sq = (_at_least_fp32(recon) - x).pow(2).sum(-3).double()  # (B, 64, 64), channels summed
    mask = mask.to(sq.device)
    n = torch.tensor(mask.numel() * x.shape[-3], dtype=torch.float64, device=sq.device)
    marked = mask.sum().double() * x.shape[-3]
    on = (sq * mask).sum()
    return torch.stack([on, marked, sq.sum() - on, n - marked])
