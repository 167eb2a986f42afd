"""Four of V's layers in the forms that CPUs run several times faster.

Each class is the torch layer it subclasses, with the same parameters, so a
checkpoint cannot tell them apart, and each computes the same numbers (tests/
test_vae.py checks values and gradients against the plain layers). On a GPU
they call the layer as it is: cuDNN's own kernels were faster there
(`python -m bench.speed vae --device cuda` on an H200, batch 100: 21,600
images/s against 17,800 with these forms). On CPUs, oneDNN's kernels are slow
for these four shapes, and V's training step takes about half as long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def applies(x: torch.Tensor) -> bool:
    """Whether to compute a layer in the form below: on CPUs only."""
    return x.device.type == "cpu"


class PatchConv2d(nn.Conv2d):
    """A convolution with a few output pixels (V's last: 6x6 in, 2x2 out), as
    one matrix product over its input patches, which CPUs run several times
    faster than oneDNN's weight gradient for this shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        n = (x.shape[-1] - k) // s + 1  # output pixels per side
        patches = torch.stack([x[..., i * s:i * s + k, j * s:j * s + k]
                               for i in range(n) for j in range(n)], dim=1)  # (B, n*n, C, k, k)
        y = patches.flatten(2) @ self.weight.flatten(1).t() + self.bias  # (B, n*n, O)
        return y.transpose(1, 2).unflatten(2, (n, n))  # (B, O, n, n)


class PointConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution of a 1x1 image (V's first), which is a matrix
    product; computed as one it is several times faster on CPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x) or x.shape[-2:] != (1, 1):
            return super().forward(x)
        y = (x.flatten(1) @ self.weight.flatten(1)).view(-1, self.out_channels, *self.kernel_size)
        return y + self.bias[:, None, None]  # (B, O, k, k)


class UnfusedBiasConvTranspose2d(nn.ConvTranspose2d):
    """A transposed convolution with its bias added after it: for V's second
    layer, oneDNN's kernel with a fused bias takes about twice as long on CPUs,
    in bf16 and in fp32 alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        return F.conv_transpose2d(x, self.weight, stride=self.stride) + self.bias[:, None, None]


class SubpixelConvTranspose2d(nn.ConvTranspose2d):
    """A stride-2 transposed convolution with an even kernel (V's last) whose
    forward pass is an ordinary convolution and a pixel shuffle: oneDNN's
    transposed kernel is slow in the forward pass for 3 output channels and
    fast in the backward one, and this keeps the best of each."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.stride == (2, 2) and self.kernel_size[0] % 2 == 0 and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not applies(x):
            return super().forward(x)
        return _Subpixel.apply(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class _Subpixel(torch.autograd.Function):
    """Output pixel (2m + r, 2n + s) sees only the kernel taps of parity
    (r, s), so each of the four phases is a plain convolution with those taps
    flipped; the backward pass is the transposed kernel's own."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        cin, cout, k, _ = weight.shape
        h = k // 2
        taps = (weight.view(cin, cout, h, 2, h, 2).flip(2, 4)  # [c, o, j, r, j', s]
                .permute(1, 3, 5, 0, 2, 4).reshape(cout * 4, cin, h, h))  # [(o, r, s), c, t, u]
        y = F.pixel_shuffle(F.conv2d(F.pad(x, (h - 1,) * 4), taps), 2)
        return y + bias[:, None, None]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = F.conv2d(grad, weight, stride=2)
        grad_w = torch.nn.grad.conv2d_weight(grad, weight.shape, x, stride=2)
        return grad_x, grad_w, grad.sum((0, 2, 3))
