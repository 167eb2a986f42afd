"""C: the controller of World Models (Ha & Schmidhuber 2018).

The paper's C is one linear layer from [z, h] to the three actions, 867
parameters for z = 32 and h = 256, small enough for CMA-ES to evolve. Two of
the paper's ablations are options: z alone (V without M, 99 parameters; the
paper scored 632 +- 251 with it) and z alone through a hidden layer of 40
tanh units (788 +- 141).

No gradients ever flow here: the evolution strategy reads and writes all the
weights as one flat vector (`get_flat`, `set_flat`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

FEATURES = ("zh", "z", "z-hidden")


@dataclass
class ControllerConfig:
    latent_size: int = 32  # size of z, read from V's checkpoint
    hidden_size: int = 256  # size of M's h, read from M's checkpoint; used by "zh" only
    action_size: int = 3  # steer, gas, brake
    features: str = "zh"  # zh: [z, h] (the paper); z: V alone; z-hidden: z through a tanh layer
    layer_size: int = 40  # tanh units of "z-hidden" (the paper's ablation: 40)

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {self.features!r}")


def squash(x: torch.Tensor) -> torch.Tensor:
    """C's last layer outputs (..., 3) -> actions: steer in [-1, 1], gas and brake in [0, 1]."""
    a = torch.tanh(x)
    # As in the paper's code: gas is rescaled to [0, 1], brake is clipped, so
    # that half of C's outputs mean "no brake" and it can learn not to brake.
    return torch.stack([a[..., 0], (a[..., 1] + 1) / 2, a[..., 2].clamp(min=0)], dim=-1)


class Controller(nn.Module):
    def __init__(self, cfg: ControllerConfig):
        super().__init__()
        self.cfg = cfg
        Z, H, A = cfg.latent_size, cfg.hidden_size, cfg.action_size
        if cfg.features == "zh":
            self.net = nn.Linear(Z + H, A)
        elif cfg.features == "z":
            self.net = nn.Linear(Z, A)
        else:
            self.net = nn.Sequential(nn.Linear(Z, cfg.layer_size), nn.Tanh(),
                                     nn.Linear(cfg.layer_size, A))
        self.requires_grad_(False)

    @property
    def uses_memory(self) -> bool:
        """Whether C reads M's h (else the agent can run without M)."""
        return self.cfg.features == "zh"

    def forward(self, z: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, Z), h (B, H) -> actions (B, 3): steer in [-1, 1], gas and brake in [0, 1]."""
        x = torch.cat([z, h], dim=-1) if self.uses_memory else z
        return squash(self.net(x))  # (B, 3)

    def forward_population(self, params: torch.Tensor, z: torch.Tensor,
                           h: torch.Tensor | None = None) -> torch.Tensor:
        """Many controllers at once, one per row of `params`.

        params: (P, n_params) flat weight vectors in `get_flat` order;
        z: (P, R, Z) and h: (P, R, H), R inputs per controller.
        Returns actions (P, R, 3), row p equal to `set_flat(params[p])` then
        `forward(z[p], h[p])`, as a batched matmul per layer (no loop over P);
        this module's own weights are not used.
        """
        x = torch.cat([z, h], dim=-1) if self.uses_memory else z  # (P, R, in)
        shapes = [p.shape for p in self.parameters()]  # weight, bias of each linear layer
        chunks = params.to(x.dtype).split([s.numel() for s in shapes], dim=1)
        n_layers = len(shapes) // 2
        for i in range(n_layers):
            w = chunks[2 * i].view(-1, *shapes[2 * i])  # (P, out, in)
            b = chunks[2 * i + 1]  # (P, out)
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (P, R, out)
            if i < n_layers - 1:
                x = torch.tanh(x)
        return squash(x)  # (P, R, 3)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_flat(self) -> np.ndarray:
        """All weights as one float64 vector, in `parameters()` order."""
        return torch.cat([p.detach().flatten() for p in self.parameters()]).double().cpu().numpy()

    def set_flat(self, flat) -> None:
        """Set all weights from one vector of length `n_params`."""
        flat = torch.as_tensor(np.asarray(flat), dtype=torch.float32)
        if flat.shape != (self.n_params,):
            raise ValueError(f"expected {self.n_params} parameters for a {self.cfg.features!r} "
                             f"controller, got shape {tuple(flat.shape)}")
        i = 0
        for p in self.parameters():
            p.copy_(flat[i:i + p.numel()].view_as(p))
            i += p.numel()

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Controller":
        """Rebuild from a checkpoint dict (see wm.checkpoint.load_checkpoint)."""
        model = cls(ControllerConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model
