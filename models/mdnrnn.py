"""M: the mixture-density recurrent network of World Models (Ha & Schmidhuber 2018).

Given z_t and the action a_t, an LSTM updates its memory (h, c) and a linear
head reads h_t into a mixture of Gaussians over z_{t+1}. With mixture "dim",
as in the paper's code, each of the Z dimensions gets its own mixture of K
components (a logit, a mean and a log standard deviation each, Z * K * 3
outputs), so a sample may take dimension 1 from one mode of the future and
dimension 2 from another. With mixture "frame", the K components are whole
frames: K logits, each with a mean and a log standard deviation for every
dimension ((1 + 2Z) * K outputs), so a sample is one coherent future (the
car turns left, or right; never half of each). Two small extra
heads predict the reward of a_t and whether the episode ends after it, so that
a dream can be run with M alone.

`forward` runs whole sequences through the fused `nn.LSTM` (training); `step`
runs one step with the same weights (rollouts and dreams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn


MIXTURES = ("dim", "frame")  # a mixture per dimension of z (the paper's), or one over the whole z


@dataclass
class MDNRNNConfig:
    latent_size: int = 32  # size of z, read from V's checkpoint (the paper: 32)
    action_size: int = 3  # steer, gas, brake
    hidden_size: int = 256  # LSTM units (the paper: 256 for CarRacing)
    n_gaussians: int = 5  # mixture components (the paper: 5)
    mixture: str = "dim"  # dim: a mixture per dimension of z (the paper's code); frame: one over the whole z
    predict_reward: bool = True  # add a reward head (needed to train C in a dream)
    predict_done: bool = True  # add an episode-end head (needed to train C in a dream)
    action_repeat: int = 1  # game frames per step of M, from the rollouts: C must act at this rate (the paper: 1)

    def __post_init__(self):
        if self.mixture not in MIXTURES:
            raise ValueError(f"mixture must be one of {MIXTURES}, got {self.mixture!r}")

    @property
    def pi_rows(self) -> int:
        """Rows of mixture logits: one per dimension of z, or one for the whole z."""
        return self.latent_size if self.mixture == "dim" else 1


class MDNOutput(NamedTuple):
    """M's prediction; `...` is (B, T) from `forward` and (B,) from `step`."""
    logit_pi: torch.Tensor  # (..., Z, K) unnormalised mixture weights; (..., 1, K) for a per-frame mixture
    mu: torch.Tensor  # (..., Z, K)
    log_sigma: torch.Tensor  # (..., Z, K)
    reward: Optional[torch.Tensor]  # (...) or None when the head is off
    done_logit: Optional[torch.Tensor]  # (...) or None when the head is off


State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (B, H)


def sample_next_z(out: MDNOutput, temperature: float = 1.0,
                  generator: torch.Generator | None = None,
                  noise: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Draw z_{t+1} from M's mixture: a component per dimension of z, or
    one for the whole z when logit_pi is (..., 1, K) (a per-frame mixture).

    out: mu, log_sigma (..., Z, K), logit_pi (..., Z or 1, K). Returns z (..., Z).
    As in the paper, the temperature tau divides the mixture logits and
    multiplies the variances (sigma * sqrt(tau)): tau < 1 sharpens the choice
    of component and narrows each one, tau > 1 makes the dream more uncertain.
    tau = 0 returns the mean of the most likely component.
    noise: optional (u, eps), uniforms in [0, 1) broadcastable to (..., Z, K)
    and standard normals broadcastable to (..., Z), used instead of drawing
    them from `generator`; a dream shares them across a whole population so
    that its members are ranked on the same luck (wm/dream.py). A per-frame
    mixture reads the first row of u.
    """
    rows = out.logit_pi.shape[-2]  # Z, or 1 for a per-frame mixture
    pick = out.mu.shape[:-1] + (1,)  # (..., Z, 1): the same component for every dimension when rows = 1
    if temperature <= 0:
        k = out.logit_pi.argmax(-1, keepdim=True).expand(pick)  # (..., Z, 1)
        return out.mu.gather(-1, k).squeeze(-1)
    if noise is None:
        u = torch.rand(out.logit_pi.shape, generator=generator, device=out.logit_pi.device,
                       dtype=out.logit_pi.dtype)
    else:
        u, eps = noise
        u = u[..., :rows, :]
    # Gumbel-max picks component k with probability softmax(logit / tau)_k.
    gumbel = -torch.log((-torch.log(u.clamp(min=1e-20))).clamp_(min=1e-20))
    k = (out.logit_pi / temperature + gumbel).argmax(-1, keepdim=True).expand(pick)  # (..., Z, 1)
    mu = out.mu.gather(-1, k).squeeze(-1)  # (..., Z)
    sigma = out.log_sigma.gather(-1, k).squeeze(-1).exp() * math.sqrt(temperature)
    if noise is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + sigma * eps


class MDNRNN(nn.Module):
    def __init__(self, cfg: MDNRNNConfig):
        super().__init__()
        self.cfg = cfg
        Z, A, H, K = cfg.latent_size, cfg.action_size, cfg.hidden_size, cfg.n_gaussians
        self.rnn = nn.LSTM(Z + A, H, batch_first=True)
        self.mdn = nn.Linear(H, (cfg.pi_rows + 2 * Z) * K)  # logits, means, log std devs
        self.reward_head = nn.Linear(H, 1) if cfg.predict_reward else None
        self.done_head = nn.Linear(H, 1) if cfg.predict_done else None

    # Also a method, so that a caller holding M needs no second import.
    sample_next_z = staticmethod(sample_next_z)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.mdn.weight.device
        dtype = self.mdn.weight.dtype
        h = torch.zeros(batch_size, self.cfg.hidden_size, device=device, dtype=dtype)
        return h, h.clone()

    def heads(self, h: torch.Tensor) -> MDNOutput:
        """(..., H) hidden states -> the prediction for the next step."""
        Z, K, P = self.cfg.latent_size, self.cfg.n_gaussians, self.cfg.pi_rows
        logit_pi, mu, log_sigma = self.mdn(h).unflatten(-1, (P + 2 * Z, K)).split([P, Z, Z], dim=-2)  # (..., P|Z, K)
        reward = self.reward_head(h).squeeze(-1) if self.reward_head is not None else None
        done = self.done_head(h).squeeze(-1) if self.done_head is not None else None
        return MDNOutput(logit_pi, mu, log_sigma, reward, done)

    def forward(self, z: torch.Tensor, a: torch.Tensor,
                state: State | None = None) -> tuple[MDNOutput, State]:
        """Whole sequences: z (B, T, Z), a (B, T, A) -> (prediction for each
        t+1, final state); state is (h, c) each (B, H), zeros when None."""
        x = torch.cat([z, a], dim=-1)  # (B, T, Z + A)
        hx = None if state is None else (state[0].unsqueeze(0), state[1].unsqueeze(0))
        hs, (h, c) = self.rnn(x, hx)  # hs (B, T, H)
        return self.heads(hs), (h[0], c[0])

    def step(self, z: torch.Tensor, a: torch.Tensor, state: State) -> tuple[MDNOutput, State]:
        """One step for a batch of rows: z (B, Z), a (B, A), state (h, c) ->
        (prediction for the next step, new state), on the sequence model's weights."""
        h, c = torch.lstm_cell(torch.cat([z, a], dim=-1), state,
                               self.rnn.weight_ih_l0, self.rnn.weight_hh_l0,
                               self.rnn.bias_ih_l0, self.rnn.bias_hh_l0)  # each (B, H)
        return self.heads(h), (h, c)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "MDNRNN":
        """Rebuild from a checkpoint dict (see wm.checkpoint.load_checkpoint)."""
        model = cls(MDNRNNConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        return model


class MDNLoss(NamedTuple):
    total: torch.Tensor  # what is minimised: nll + weighted reward and done terms
    nll: torch.Tensor  # mixture negative log-likelihood of z, divided by Z: nats per dimension
    reward: torch.Tensor  # mean squared error (0 when the head is off)
    done: torch.Tensor  # binary cross-entropy (0 when the head is off)


def mixture_log_prob(out: MDNOutput, z_next: torch.Tensor) -> torch.Tensor:
    """Log density of the whole z_next under M's mixture.

    out: mu, log_sigma (..., Z, K), logit_pi (..., Z, K) per dimension or
    (..., 1, K) per frame; z_next: (..., Z). Returns (...): per dimension,
    sum_d log sum_k pi_dk N(z_d | mu_dk, sigma_dk^2); per frame,
    log sum_k pi_k prod_d N(z_d | mu_dk, sigma_dk^2). Computed with
    log-softmax and logsumexp so that no probability is ever exponentiated.
    """
    z = z_next.unsqueeze(-1)  # (..., Z, 1)
    log_normal = (-0.5 * ((z - out.mu) * torch.exp(-out.log_sigma)).pow(2)
                  - out.log_sigma - 0.5 * math.log(2 * math.pi))  # (..., Z, K)
    log_pi = F.log_softmax(out.logit_pi, dim=-1)  # (..., Z or 1, K)
    if out.logit_pi.shape[-2] == 1:  # one component for the whole frame
        return torch.logsumexp(log_pi.squeeze(-2) + log_normal.sum(-2), dim=-1)
    return torch.logsumexp(log_pi + log_normal, dim=-1).sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def mdn_loss(out: MDNOutput, z_next: torch.Tensor, reward: torch.Tensor | None = None,
             done: torch.Tensor | None = None, z_mask: torch.Tensor | None = None,
             step_mask: torch.Tensor | None = None, reward_weight: float = 1.0,
             done_weight: float = 1.0) -> MDNLoss:
    """M's training loss on a batch of steps.

    out:        M's prediction, mixture parts (B, T, Z, K) (logits (B, T, 1, K) per frame), heads (B, T)
    z_next:     (B, T, Z) the next latent each step should predict
    reward:     (B, T) reward of each step's action, used when the head is on
    done:       (B, T) 1.0 where the episode ended after the step
    z_mask:     (B, T) 1 where z_next exists (not past a rollout's last frame)
    step_mask:  (B, T) 1 where the step exists (not padding)
    The leading dims may be anything, as long as they agree.

    nll is averaged over the masked steps and divided by Z, as in the paper's
    code, so it reads in nats per dimension whatever Z is, and a per-frame
    mixture's loss compares with a per-dimension one's.
    """
    nll = -mixture_log_prob(out, z_next) / z_next.shape[-1]  # (B, T)
    nll = _masked_mean(nll, z_mask)
    zero = nll.new_zeros(())
    r_loss = d_loss = zero
    if out.reward is not None and reward is not None:
        r_loss = _masked_mean((out.reward - reward).pow(2), step_mask)
    if out.done_logit is not None and done is not None:
        bce = F.binary_cross_entropy_with_logits(out.done_logit, done.to(out.done_logit.dtype),
                                                 reduction="none")
        d_loss = _masked_mean(bce, step_mask)
    total = nll + reward_weight * r_loss + done_weight * d_loss
    return MDNLoss(total, nll, r_loss, d_loss)
