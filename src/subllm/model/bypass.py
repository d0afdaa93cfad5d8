"""The `)`: upsampling plus the learned bypass (docs/design.md §3.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .subsample import Selection, coin, linear_schedule

# --------------------------------------------------------------------------------------
# Upsampling + bypass (design.md §3.4)
# --------------------------------------------------------------------------------------


class _LimitValue(torch.autograd.Function):
    """Identity forward; backward flips gradient components that push x further outside
    [lo, hi] (so the optimizer moves it back in)."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        outward = ((x < ctx.lo) & (g > 0)) | ((x > ctx.hi) & (g < 0))
        return torch.where(outward, -g, g), None, None


class Bypass(nn.Module):
    """The `)`: upsample the segment's output into the full sequence, then bypass.

    Upsample: u = x_out, and at kept position j, u[j] = w_j * y_j + (1 - w_j) * x_out[j].
    Bypass:   z = x_out + c * (u - x_out), with c a learned per-channel scale.
    u - x_out is zero except at kept positions, where it is w_j * (y_j - x_out[j]); so z is
    x_out plus a scatter of c * w * (y - x_out[kept]) — one full-length op instead of three.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = nn.Parameter(torch.full((config.dim,), config.bypass_init))

    def min_scale(self, step: int) -> float:
        c = self.config
        return linear_schedule(step, c.bypass_min_start, c.bypass_min_end, c.bypass_min_steps)

    def forward(self, x_out: Tensor, y: Tensor, sel: Selection, step: int = 0) -> Tensor:
        c = self.scale
        if self.training and c.requires_grad and coin(self.config.bypass_limit_prob):
            c = _LimitValue.apply(c, self.min_scale(step), 1.0)
        idx = sel.idx[..., None].expand(-1, -1, x_out.shape[-1])  # (B, K, d)
        x_kept = x_out.gather(1, idx)
        w = sel.weight.to(y.dtype)[..., None]
        delta = c.to(y.dtype) * w * (y - x_kept)  # zero on unused slots (w = 0)
        return x_out.scatter_add(1, idx, delta.to(x_out.dtype))

