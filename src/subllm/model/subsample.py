"""The subsampling module `(` and its score balancer (docs/design.md §3.2, §3.5).

Training keeps the top-k scores of each row (k = ceil(keep * L)); inference keeps every
token whose score is positive, which is causal. The balancer is gradient-only: it pushes
the score distribution so that the fraction of positive scores matches the keep ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelConfig


def linear_schedule(step: int, start: float, end: float, steps: int) -> float:
    """Linear ramp from `start` at step 0 to `end` at `steps`, then constant (§3.6)."""
    if steps <= 0:
        return end
    t = min(max(step, 0) / steps, 1.0)
    return start + (end - start) * t


def coin(p: float) -> bool:
    """A random decision from torch's CPU generator (seeded and checkpointed with it)."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return bool(torch.rand(()) < p)


# --------------------------------------------------------------------------------------
# Score balancer (design.md §3.5)
# --------------------------------------------------------------------------------------


class _BalanceScores(torch.autograd.Function):
    """Identity forward; backward adds a gradient pushing the score distribution into range.

    lo, hi: target band of the fraction of positive scores (the kept fraction at inference).
    """

    @staticmethod
    def forward(ctx, s: Tensor, valid: Tensor | None, lo: float, hi: float, rms_min: float,
                rms_max: float, strength: float, g_rms_ema: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(s, valid)
        ctx.consts = (lo, hi, rms_min, rms_max, strength)
        ctx.g_rms_ema = g_rms_ema
        return s.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        s, valid = ctx.saved_tensors
        lo, hi, rms_min, rms_max, strength = ctx.consts
        with torch.enable_grad():
            x = s.detach().float().requires_grad_(True)
            v = x[valid] if valid is not None else x.reshape(-1)
            m = v.mean()
            sd = v.std(correction=0).clamp_min(1e-6)
            r = v.pow(2).mean().sqrt().clamp_min(1e-6)
            ratio = m / sd  # P(s > 0) = Phi(m / sd) for Gaussian scores
            # Scores are far from Gaussian (skewed), so Phi(m / sd) misjudges the kept
            # fraction: decide the direction from the measured fraction of positive scores
            # and move m / sd that way (the target band is [lo, hi] as fractions).
            frac = (v > 0).float().mean()
            direction = (frac > hi).float() - (frac < lo).float()
            penalty = direction * ratio + torch.log(r.clamp(rms_min, rms_max) / r).abs()
            (dp,) = torch.autograd.grad(penalty, x)
        n = v.numel()
        rms = (dp.pow(2).sum() / max(n, 1)).sqrt()
        # design.md §3.5 scales by |g| elementwise; but scores clamped outside (0, 1) get no task
        # gradient, so that version cannot move them and loses to the task gradient (eval
        # kept fraction stuck near 0.3 for keep 0.64 after 400 steps). Scaling by the rms of
        # g over the batch's scores moves every score and lands within 0.05 of keep.
        # When every score has run outside (0, 1) the task gradient is exactly zero and so
        # would be the push that brings them back: fall back to half the running mean of
        # the gradient rms of earlier steps (kept without host syncs).
        g_valid = g.float()[valid] if valid is not None else g.float()
        g_rms = g_valid.pow(2).mean().sqrt()
        ema = ctx.g_rms_ema
        if ema is not None:
            scale = torch.maximum(g_rms, 0.5 * ema)
            updated = torch.where(ema > 0, 0.9 * ema + 0.1 * g_rms, g_rms)
            ema.copy_(torch.where(g_rms > 0, updated, ema))
        else:
            scale = g_rms
        extra = dp / (rms + 1e-20) * (strength * scale)  # zero when in range
        return g + extra.to(g.dtype), None, None, None, None, None, None, None


class ScoreBalancer(nn.Module):
    """Keeps P(score > 0) near the keep ratio and the score rms in [1.25, 5] (design.md §3.5).

    Gradient-only: the forward pass returns the scores unchanged.
    """

    def __init__(self, keep: float, config: ModelConfig) -> None:
        super().__init__()
        self.lo = keep - config.balancer_margin  # target band of P(score > 0)
        self.hi = keep + config.balancer_margin
        self.config = config
        # running mean of the score-gradient rms (see _BalanceScores.backward); persistent,
        # so that resuming from a checkpoint is exact
        self.register_buffer("g_rms", torch.zeros(()))

    def forward(self, s: Tensor, valid: Tensor | None, step: int) -> Tensor:
        c = self.config
        p = linear_schedule(step, c.balancer_prob_start, c.balancer_prob_end,
                             c.balancer_prob_steps)
        if not (self.training and s.requires_grad and coin(p)):
            return s
        return _BalanceScores.apply(s, valid, self.lo, self.hi, c.balancer_rms_min,
                                    c.balancer_rms_max, c.balancer_strength, self.g_rms)


# --------------------------------------------------------------------------------------
# Subsampling (design.md §3.2)
# --------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The tokens a subsampling module kept, in their original order.

    idx: (B, K) positions in the module's input; weight: (B, K) upsampling weights (0 on
    unused slots); valid: (B, K) bool or None when every slot of every row is used;
    count: (B,) tokens kept per row; entered: (B,) tokens that entered the module.
    """

    idx: Tensor
    weight: Tensor
    valid: Tensor | None
    count: Tensor
    entered: Tensor

    @property
    def size(self) -> int:
        return self.idx.shape[1]

    def placeholder(self) -> Selection:
        """One unused slot per row in place of an empty selection: the segment's blocks run
        on it and change nothing (weight 0), so every rank makes the same calls."""
        B = self.count.shape[0]
        device = self.count.device
        return Selection(torch.zeros(B, 1, dtype=torch.long, device=device),
                         torch.zeros(B, 1, device=device),
                         torch.zeros(B, 1, dtype=torch.bool, device=device),
                         self.count, self.entered)


def _keep_count(keep: float, n: Tensor) -> Tensor:
    # ceil(keep * n), rounded first so that float noise (0.64 * 100 = 64.0000001) does not
    # add a token.
    return torch.ceil(torch.round(n.double() * keep, decimals=6)).long()


def keep_count(keep: float, n: int) -> int:
    """`_keep_count` for one length on the host (same rounding)."""
    return math.ceil(round(n * keep, 6))


class Subsampler(nn.Module):
    """Scores tokens and keeps the important ones (design.md §3.2)."""

    def __init__(self, config: ModelConfig, keep: float) -> None:
        super().__init__()
        self.keep = keep
        self.score = nn.Linear(config.dim, 1, bias=False)
        self.balancer = ScoreBalancer(keep, config)

    def forward(self, x: Tensor, valid: Tensor | None, step: int = 0) -> Selection:
        B, L, _ = x.shape
        s = self.score(x).squeeze(-1).float()  # (B, L)
        if valid is not None:
            entered = valid.sum(1)
        else:
            entered = torch.full((B,), L, dtype=torch.long, device=x.device)
        if self.training:
            s = self.balancer(s, valid, step)
            return self._top_k(s, valid, entered)
        return self._threshold(s, valid, entered)

    def _top_k(self, s: Tensor, valid: Tensor | None, entered: Tensor) -> Selection:
        """Training: keep the k = ceil(keep * L) highest scores of each row."""
        B, L = s.shape
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))  # padding sorts last, clamps to 0
        s_sorted, order = s.sort(dim=1, descending=True)
        c = s_sorted.clamp(0.0, 1.0)
        if valid is None:  # every row keeps the same count, known on the host: no sync
            K = keep_count(self.keep, L)
            k = torch.full((B,), K, dtype=torch.long, device=s.device)
        else:
            k = _keep_count(self.keep, entered)  # (B,)
            K = int(k.max())  # padded rows: the slot count is data-dependent
        i = torch.arange(K, device=s.device)[None, :]  # (1, K)
        used = i < k[:, None]  # (B, K)
        # Pair kept token i with discarded token k+i (or, on a random half of the steps, with
        # the discarded ones in reversed order, k + (k-1-i)): the weight c[i] - c[partner] is
        # how scores get gradient, and it punishes positive scores on discarded tokens.
        partner = k[:, None] + i if not coin(0.5) else 2 * k[:, None] - 1 - i
        c_partner = c.gather(1, partner.clamp(max=L - 1)) * (partner < L)
        w = (c[:, :K] - c_partner) * used
        # Restore the original token order; unused slots go last.
        idx = order[:, :K]
        key = torch.where(used, idx, L + i)
        key, perm = key.sort(dim=1)
        idx, w, used = idx.gather(1, perm), w.gather(1, perm), used.gather(1, perm)
        return Selection(idx, w, None if valid is None else used, k, entered)

    def _threshold(self, s: Tensor, valid: Tensor | None, entered: Tensor) -> Selection:
        """Inference: keep every token with a positive score, weight clamp(s, 0, 1).

        Causal: the decision for a token depends only on its own hidden state.
        """
        B, L = s.shape
        kept = s > 0
        if valid is not None:
            kept &= valid
        count = kept.sum(1)
        # one host sync for both: the slot count K and whether every row fills all K slots
        least, K = torch.stack(torch.aminmax(count)).tolist() if B * L else (0, 0)
        pos = torch.arange(L, device=s.device).expand(B, L)
        key = torch.where(kept, pos, L + pos)
        idx = key.sort(dim=1).values[:, :K]
        used = idx < L
        idx = torch.where(used, idx, idx - L)
        w = s.clamp(0.0, 1.0).gather(1, idx) * used
        return Selection(idx, w, None if least == K else used, count, entered)

