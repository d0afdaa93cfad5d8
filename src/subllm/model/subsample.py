"""The subsampling module `(` and its score balancer (docs/design.md §3.2, §3.5, §3.8).

Training keeps the top-k scores of each row (k = ceil(keep * L)); inference decides each
token causally: by default it keeps a token whose score ranks in the top `keep` share of
its row so far (`threshold: rank`, training's top-k made causal), or one whose score is
above the calibrated cut-off, or above 0 (the paper's rule). The balancer is gradient-only:
it keeps the scores' scale in range and (the paper's mechanism) pushes the fraction of
positive scores towards the keep ratio.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, require_model_config


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


def _penalty_grad(x: Tensor, valid: Tensor | None, rms_min: float, rms_max: float,
                  ratio_weight: Callable[[Tensor, Tensor], Tensor]
                  ) -> tuple[Tensor, Tensor | int]:
    """(d penalty / dx, count of real scores) for a balancer's penalty over the real scores
    of x (B, L): c * m / sd + |log(clamp(r, rms_min, rms_max) / r)|, with m, sd, r their
    mean, standard deviation and rms (each clamped to >= 1e-6) and c =
    ratio_weight(m / sd, fraction of positive scores), a constant of the gradient.

    In closed form, masked sums for padding: autograd through the statistics took some
    80 small kernels per subsampler per step, and picking the real scores out (x[valid])
    a host sync. d(m/sd)/dx_i = 1/(n sd) - m (x_i - m) / (n sd^3); dr/dx_i = x_i / (n r);
    d|log(clamp(r)/r)|/dr = -1/r below the range, 1/r above it. The balancers pass x in
    fp64: B * L scores are summed, and the kept fraction a few hundred steps later moved by
    up to 0.05 with the rounding of fp32 sums."""
    if valid is None:
        n: Tensor | int = max(x.numel(), 1)
        w: Tensor | float = 1.0
        m = x.mean()
        var, ms = (x - m).pow(2).mean(), x.pow(2).mean()
        frac = (x > 0).float().mean()
    else:
        w = valid.to(x.dtype)
        n = w.sum().clamp_min(1)
        m = (x * w).sum() / n
        var, ms = ((x - m).pow(2) * w).sum() / n, (x.pow(2) * w).sum() / n
        frac = ((x > 0).to(x.dtype) * w).sum() / n
    sd, r = var.sqrt(), ms.sqrt()
    sd_c, r_c = sd.clamp_min(1e-6), r.clamp_min(1e-6)
    c = ratio_weight(m / sd_c, frac)
    d_ratio = 1 / (n * sd_c) - (sd >= 1e-6) * m * (x - m) / (n * sd_c.pow(3))
    g_r = ((r_c > rms_max).to(x.dtype) - (r_c < rms_min).to(x.dtype)) / r_c
    d_r = (r >= 1e-6) * x / (n * r_c)
    return (c * d_ratio + g_r * d_r) * w, n


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
        # m / sd sets P(s > 0) = Phi(m / sd) for Gaussian scores. Scores are far from
        # Gaussian (skewed), so Phi(m / sd) misjudges the kept fraction: decide the
        # direction from the measured fraction of positive scores and move m / sd that way
        # (the target band is [lo, hi] as fractions).
        dp, n = _penalty_grad(s.detach().double(), valid, rms_min, rms_max,
                              lambda ratio, frac: (frac > hi).double() - (frac < lo).double())
        rms = (dp.pow(2).sum() / n).sqrt()
        # design.md §3.5 scales by |g| elementwise; but scores clamped outside (0, 1) get no task
        # gradient, so that version cannot move them and loses to the task gradient (eval
        # kept fraction stuck near 0.3 for keep 0.64 after 400 steps). Scaling by the rms of
        # g over the batch's scores moves every score and lands within 0.05 of keep.
        # When every score has run outside (0, 1) the task gradient is exactly zero and so
        # would be the push that brings them back: fall back to half the running mean of
        # the gradient rms of earlier steps (kept without host syncs).
        g2 = g.float().pow(2)
        g_rms = (g2.mean() if valid is None else (g2 * valid).sum() / n).sqrt()
        ema = ctx.g_rms_ema
        if ema is not None:
            scale = torch.maximum(g_rms, 0.5 * ema)
            updated = torch.where(ema > 0, 0.9 * ema + 0.1 * g_rms, g_rms)
            ema.copy_(torch.where(g_rms > 0, updated, ema))
        else:
            scale = g_rms
        extra = dp / (rms + 1e-20) * (strength * scale)  # zero when in range
        return g + extra.to(g.dtype), None, None, None, None, None, None, None


@functools.lru_cache(maxsize=64)
def _normal_quantile(p: float) -> float:
    """The standard normal quantile, computed once per keep band (not per backward)."""
    return statistics.NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


class _PaperBalance(torch.autograd.Function):
    """The published balancer (design.md §3.5 as the paper states it): m / sd into the
    Gaussian quantile band [q(keep - 0.05), q(keep + 0.05)], rms into [rms_min, rms_max];
    the penalty's gradient at unit rms, times strength * |g| elementwise."""

    @staticmethod
    def forward(ctx, s: Tensor, valid: Tensor | None, lo: float, hi: float, rms_min: float,
                rms_max: float, strength: float) -> Tensor:
        ctx.save_for_backward(s, valid)
        ctx.consts = (lo, hi, rms_min, rms_max, strength)
        return s.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        s, valid = ctx.saved_tensors
        lo, hi, rms_min, rms_max, strength = ctx.consts
        q_lo, q_hi = _normal_quantile(lo), _normal_quantile(hi)
        # penalty |m/sd - clamp(m/sd, q_lo, q_hi)| + |log(clamp(r, rms_min, rms_max) / r)|
        dp, n = _penalty_grad(s.detach().double(), valid, rms_min, rms_max,
                              lambda ratio, frac: ((ratio > q_hi).double()
                                                   - (ratio < q_lo).double()))
        rms = (dp.pow(2).sum() / n).sqrt()
        extra = dp / (rms + 1e-20) * (strength * g.float().abs())
        return g + extra.to(g.dtype), None, None, None, None, None, None


class ScoreBalancer(nn.Module):
    """Keeps P(score > 0) near the keep ratio and the score rms in [1.25, 5] (design.md §3.5).

    Gradient-only: the forward pass returns the scores unchanged.
    """

    def __init__(self, keep: float, config: ModelConfig) -> None:
        require_model_config(config, "ScoreBalancer")
        super().__init__()
        self.keep = keep
        self.lo = keep - config.balancer_margin  # target band of P(score > 0)
        self.hi = keep + config.balancer_margin
        self.config = config
        # running mean of the score-gradient rms (see _BalanceScores.backward); persistent,
        # so that resuming from a checkpoint is exact
        self.register_buffer("g_rms", torch.zeros(()))

    def forward(self, s: Tensor, valid: Tensor | None, step: int) -> Tensor:
        c = self.config
        if c.balancer == "none":
            return s
        p = linear_schedule(step, c.balancer_prob_start, c.balancer_prob_end,
                             c.balancer_prob_steps)
        if not (self.training and s.requires_grad and coin(p)):
            return s
        if c.balancer == "paper":
            return _PaperBalance.apply(s, valid, self.keep - 0.05, self.keep + 0.05,
                                       c.balancer_rms_min, c.balancer_rms_max,
                                       c.balancer_strength)
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
    scores: (B, L) the (shifted) scores the decision was made on, detached, and decisions:
    (B, L) bool, which tokens were kept; the KV cache keeps both, so that the rank rule can
    rank later tokens against the scores and its band count the kept ones.
    """

    idx: Tensor
    weight: Tensor
    valid: Tensor | None
    count: Tensor
    entered: Tensor
    scores: Tensor | None = None
    decisions: Tensor | None = None

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
                         self.count, self.entered, self.scores, self.decisions)


# the calibrated cut-off's running mean and the batch cut-offs recorded since its last
# update (all zero in a state dict from before them: exactly the rule it was trained with)
CUTOFF_BUFFERS = ("cutoff", "cutoff_updates", "pending_sum", "pending_count")
# buffers of retired mechanisms (config.RETIRED), dropped when an old state dict loads
RETIRED_BUFFERS = ("quota_shift",)


def _keep_count(keep: float, n: Tensor) -> Tensor:
    # ceil(keep * n), rounded first so that float noise (0.64 * 100 = 64.0000001) does not
    # add a token.
    return torch.ceil(torch.round(n.double() * keep, decimals=6)).long()


def keep_count(keep: float, n: int) -> int:
    """`_keep_count` for one length on the host (same rounding)."""
    return math.ceil(round(n * keep, 6))


def document_starts(docs: Tensor) -> Tensor:
    """(B, L): the index of the first token of each token's document, for rows whose
    documents are contiguous runs of equal ids (packed rows, design.md §3.10)."""
    t = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return torch.where(first, t, 0).cummax(1).values


def _real_in_document(v: Tensor, docs: Tensor | None) -> Tensor:
    """(B, L): real tokens up to and including t, counted from the start of t's document
    (of its row without `docs`)."""
    n = v.long().cumsum(1)
    if docs is None:
        return n
    start = document_starts(docs)
    return n - (n.gather(1, start) - v.long().gather(1, start))


def causal_rank_keep(s: Tensor, valid: Tensor | None, keep: float,
                     past: Tensor | None = None, past_valid: Tensor | None = None,
                     docs: Tensor | None = None) -> Tensor:
    """The rank rule (design.md §3.8): keep token t of a row iff fewer than
    round(keep * n_t) of the row's real tokens before t score higher, n_t counting those
    and t itself. It is training's top-k made causal: it keeps the share `keep` of a row
    wherever its scores sit (another text, a scorer that moved, training vs inference
    hidden states), and the decision for t uses only tokens up to t, so prefill and
    token-by-token decoding agree.

    s: (B, L) scores; valid: (B, L) bool or None (all real); past / past_valid: (B, P) the
    row's earlier scores and their validity (KV-cached decoding); docs: (B, L) document
    ids of packed rows (no past): each token is ranked within its document's prefix.
    Returns (B, L) bool.
    """
    L = s.shape[1]
    v = torch.ones_like(s, dtype=torch.bool) if valid is None else valid
    n = _real_in_document(v, docs)  # (B, L) real tokens up to and including t
    if docs is None:
        above = _earlier_above(s.masked_fill(~v, float("-inf")), s)
    else:  # rank by (document, score): an earlier document's tokens rank below t's
        rank = s.masked_fill(~v, float("-inf")).argsort(dim=1, stable=True).argsort(dim=1)
        key = (docs.double() - docs[:, :1].double()) * L + rank.double()
        above = _earlier_above(key.masked_fill(~v, float("-inf")), key)
    if past is not None and past.shape[1] > 0:
        pv = torch.ones_like(past, dtype=torch.bool) if past_valid is None else past_valid
        n = n + pv.sum(1, keepdim=True)
        if L <= 16:  # decoding: comparing with each cached score is cheaper than sorting them
            above += ((past[:, None, :] > s[:, :, None]) & pv[:, None, :]).sum(-1)
        else:
            ordered = past.to(s.dtype).masked_fill(~pv, float("-inf")).sort(dim=1).values
            above += past.shape[1] - torch.searchsorted(ordered, s.contiguous(), right=True)
    quota = torch.floor(n.double() * keep + 0.5).long()  # round(keep * n_t), halves up
    return (above < quota) & v


def _earlier_above(key: Tensor, s: Tensor) -> Tensor:
    """(B, L): for each t, how many j < t have key[j] > s[t] (padding's key is -inf).

    A bottom-up merge count in O(L log^2 L) vectorised work and O(L) memory instead of
    comparing all L^2 pairs (which took 11-14 % of a `subllm-tiny` forward at 32k tokens): at
    level b the row is cut into blocks of 2^b tokens, and each token of a right-hand block
    counts, by binary search in its sorted left-hand sibling, the higher keys there. Every
    earlier j lies in the left sibling of t's block at exactly one level, so the levels'
    counts sum to the answer. (torch has no inversion count; sort and searchsorted are its
    vectorised pieces.)
    """
    B, L = s.shape
    size = 1 << max(0, (L - 1).bit_length())  # a power of two >= L
    key = F.pad(key, (0, size - L), value=float("-inf"))
    q = F.pad(s, (0, size - L), value=float("-inf"))
    above = torch.zeros(B, size, dtype=torch.long, device=s.device)
    half = 1
    while half < size:  # sibling pairs of blocks of `half` tokens: (B, pairs, 2, half)
        left = key.reshape(B, -1, 2, half)[:, :, 0].sort(dim=-1).values
        right = q.reshape(B, -1, 2, half)[:, :, 1].contiguous()
        counts = half - torch.searchsorted(left, right, right=True)  # (B, pairs, half)
        above.view(B, -1, 2, half)[:, :, 1] += counts
        half *= 2
    return above[:, :L]


# An unbounded end of a clamp (see `keep_within_band`): far beyond any count, far from
# int64's limits after adding a row's length.
_FREE = 1 << 40


def _clamp(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.minimum(torch.maximum(x, lo), hi)


def keep_within_band(rank: Tensor, valid: Tensor | None, keep: float, band: float,
                     past_kept: Tensor | None = None, past_valid: Tensor | None = None,
                     docs: Tensor | None = None) -> Tensor:
    """The rank rule's budget band (design.md §3.8): token t keeps the decision `rank[t]`
    while the row's kept count c_t stays in [lo_t, hi_t] = [floor((keep - band) n_t),
    min(n_t, ceil((keep + band) n_t))], n_t the row's real tokens up to t; a token that would
    take c_t above hi_t is dropped, one that would leave it below lo_t is kept. Causal: the
    decision for t reads the decisions before it, so a row keeps keep +- band (+ one token)
    of its tokens at every prefix, on any text.

    rank: (B, L) bool, the rank rule's decisions; valid: (B, L) bool or None; past_kept /
    past_valid: (B, P) the row's earlier final decisions and their validity (KV-cached
    decoding); docs: (B, L) document ids of packed rows (no past): the count restarts at
    each document. Returns (B, L) bool.

    The count follows c_t = f_t(c_{t-1}) with f_t(c) = min(c + 1, hi_t) where the rank rule
    keeps t, max(c, lo_t) where it drops it (lo and hi grow by at most one token per token,
    so these are the rule above), the identity on padding. Each f is a clamp of a shift,
    x -> clamp(x + a, l, h), and such maps compose into one of the same form, so all c_t
    come from a prefix scan in log2(L) vectorised steps instead of a loop over positions
    (no library offers a scan over this composition).
    """
    B, L = rank.shape
    v = torch.ones_like(rank) if valid is None else valid
    n = _real_in_document(v, docs)
    c0 = torch.zeros(B, dtype=torch.long, device=rank.device)
    if past_kept is not None and past_kept.shape[1] > 0:
        pv = torch.ones_like(past_kept) if past_valid is None else past_valid
        n = n + pv.sum(1, keepdim=True)
        c0 = (past_kept & pv).sum(1)
    nd = n.double()
    lo = torch.floor(torch.round(nd * (keep - band), decimals=6)).long().clamp(min=0)
    hi = torch.minimum(torch.ceil(torch.round(nd * (keep + band), decimals=6)).long(), n)
    r = rank & v
    a = r.long()
    low = torch.where(v & ~r, lo, -_FREE)
    high = torch.where(r, hi, _FREE)
    start = None
    if docs is not None:  # a document's first token starts its count afresh: a constant map
        start = torch.arange(L, device=rank.device) == document_starts(docs)
        low, high = torch.where(start, a, low), torch.where(start, a, high)
    d = 1
    while d < L:  # Hillis-Steele: position t comes to hold f_t o f_{t-1} o ... o f_0
        ga, gl, gh = a[:, d:], low[:, d:], high[:, d:]  # the later map g, after f = [t - d]
        a = torch.cat([a[:, :d], a[:, :-d] + ga], 1)
        low, high = (torch.cat([low[:, :d], _clamp(low[:, :-d] + ga, gl, gh)], 1),
                     torch.cat([high[:, :d], _clamp(high[:, :-d] + ga, gl, gh)], 1))
        d *= 2
    c = _clamp(c0[:, None] + a, low, high)
    before = torch.cat([c0[:, None], c[:, :-1]], 1)
    if start is not None:
        before = before.masked_fill(start, 0)
    return (c > before) & v


def rank_rule_table(keep: float, band: float | None, max_len: int) -> Tensor:
    """(max_len + 2, 3) long: for each count n of real tokens, the rank rule's quota
    round(keep * n) and the band's [lo, hi] (`causal_rank_keep`, `keep_within_band`), the
    same arithmetic, for `rank_keep_one` to look up."""
    n = torch.arange(max_len + 2, dtype=torch.float64)
    quota = torch.floor(n * keep + 0.5)
    if band is None:
        lo, hi = torch.full_like(n, -1), n
    else:
        lo = torch.floor(torch.round(n * (keep - band), decimals=6))
        hi = torch.minimum(torch.ceil(torch.round(n * (keep + band), decimals=6)), n)
    return torch.stack([quota, lo, hi], 1).long()


def rank_keep_one(s: Tensor, valid: Tensor | None, table: Tensor, past: Tensor,
                  past_valid: Tensor | None, past_kept: Tensor | None) -> Tensor:
    """`causal_rank_keep` then `keep_within_band` for one new token per row (a decoding
    step; s, valid: (B, 1); past, past_valid, past_kept: (B, P); `table` from
    `rank_rule_table`): the same decisions in a handful of operations instead of the
    general scans' dozens, which a decoding step pays in kernel launches. With every past
    slot real (past_valid None) the row's count is known on the host, and so are its quota
    and band when `table` is on the CPU."""
    if past_valid is None:
        n = past.shape[1] + 1  # real tokens up to and including the new one
        quota, lo, hi = table[n].tolist() if table.device.type == "cpu" else table[n]
        kept = (past > s).sum(1) < quota  # fewer than the quota score higher
        c0 = None if past_kept is None else past_kept.sum(1)
    else:
        n = past_valid.sum(1) + 1
        quota, lo, hi = table[n].unbind(-1)
        kept = ((past > s) & past_valid).sum(1) < quota
        c0 = None if past_kept is None else (past_kept & past_valid).sum(1)
    if c0 is not None:  # the band's step from the row's kept count c0 (see there)
        kept = torch.where(kept, c0 < hi, c0 < lo)
    kept = kept[:, None]
    return kept if valid is None else kept & valid


class Subsampler(nn.Module):
    """Scores tokens and keeps the important ones (design.md §3.2, §3.8).

    Inference keeps tokens by `threshold`: `rank` (the default) by the rank rule of
    `causal_rank_keep`, `calibrated` by the shifted score below, `zero` by score > 0.
    With `threshold: calibrated` (and `rank`, whose upsampling weights use it) the score a
    token is kept on is `score(x) - cutoff`, where `cutoff` is a running mean of the
    training batches' top-k cut-off score: training keeps the top k of the shifted scores
    (the same tokens as of the raw ones) and the calibrated rule keeps the shifted scores
    above 0, so both keep the fraction `keep` of the tokens, and the upsampling weights
    clamp(shifted, 0, 1) are the same function in both modes. Training forward passes (with
    gradients on) record their batch's cut-off; `apply_pending`, which `SubLLM.set_step`
    calls once per optimizer step, folds them into the running mean, so every micro-batch
    of a step sees the same cut-off (gradient accumulation equals one big batch). All of it
    is buffers (saved with the weights: resuming is exact) updated by tensor ops (no host
    sync).
    """

    def __init__(self, config: ModelConfig, keep: float) -> None:
        require_model_config(config, "Subsampler")
        super().__init__()
        self.keep = keep
        self.calibrated = config.threshold in ("calibrated", "rank")
        self.ranked = config.threshold == "rank"
        self.band = getattr(config, "rank_band", None) if self.ranked else None
        self.decay = config.threshold_decay
        self.score = nn.Linear(config.dim, 1, bias=False)
        self.balancer = ScoreBalancer(keep, config)
        for name in CUTOFF_BUFFERS:
            self.register_buffer(name, torch.zeros(()))
        # None: top-k in training mode, threshold in eval mode; "top_k" / "threshold" force
        # one (`selection_rule`: measuring the train / inference gap on the same batches)
        self.rule: str | None = None
        self.max_len = config.max_seq_len
        self._tables: dict = {}  # rank_rule_table on the CPU, and on the device last used

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the calibrated threshold: cut-off 0 is exactly the old rule
        for name in CUTOFF_BUFFERS:
            state_dict.setdefault(prefix + name, torch.zeros(()))
        for name in RETIRED_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True) -> Subsampler:
        # entering eval mode ends the training step: its cut-offs count from now on (the
        # next `set_step` would fold them in identically; nothing trains in between)
        if not mode and self.training:
            self.apply_pending()
        return super().train(mode)

    @torch.no_grad()
    def apply_pending(self) -> None:
        """Fold the cut-offs recorded since the last call into the running mean (bias-
        corrected: the first updates weigh more, as tf.train.ExponentialMovingAverage's
        num_updates does)."""
        has = self.pending_count > 0
        batch = self.pending_sum / self.pending_count.clamp(min=1)
        n = self.cutoff_updates
        decay = torch.minimum(torch.full_like(n, self.decay), (1 + n) / (10 + n))
        step = torch.where(has, (1 - decay) * (batch - self.cutoff), torch.zeros_like(batch))
        self.cutoff.add_(step)
        self.cutoff_updates.add_(has.to(n.dtype))
        self.pending_sum.zero_()
        self.pending_count.zero_()

    def forward(self, x: Tensor, valid: Tensor | None, step: int = 0,
                past: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
                docs: Tensor | None = None, *, max_docs: int | None = None,
                sync: bool = True) -> Selection:
        """x: (B, L, dim); valid: (B, L) or None; past: the scores (B, P) this module gave
        the row's earlier tokens, their validity and whether it kept them (KV-cached
        decoding, rank rule); docs: (B, L) document ids of packed rows: each document keeps
        its own share (design.md §3.10).

        The selection has as many slots per row as the fullest row needs; where that
        depends on the data it is read back from the device (one host sync), unless a
        bound known on the host sizes it instead, unused slots masked: `max_docs`, at least
        the number of documents in any packed row (training's top-k keeps at most
        ceil(keep * L) + max_docs - 1 tokens of a row), or `sync=False`: the row's length
        (a decoding step's one token: one slot)."""
        B, L, _ = x.shape
        s = self.score(x).squeeze(-1).float()  # (B, L)
        if self.calibrated:
            s = s - self.cutoff
        if valid is not None:
            entered = valid.sum(1)
        else:
            entered = torch.full((B,), L, dtype=torch.long, device=x.device)
        if self.training:
            if self.calibrated and torch.is_grad_enabled():
                self._record_cutoff(s.detach(), valid, entered)
            s = self.balancer(s, valid, step)
        if (self.training and self.rule != "threshold") or self.rule == "top_k":
            if docs is not None:
                bound = None if sync else L
                if max_docs is not None:
                    bound = keep_count(self.keep, L) + max_docs
                return self._top_k_documents(s, valid, entered, docs, bound)
            return self._top_k(s, valid, entered)
        kept = None
        if self.ranked:
            scores, past_valid, past_kept = past or (None, None, None)
            if L == 1 and scores is not None and scores.shape[1] > 0:
                table = self._rank_table(s.device if past_valid is not None else "cpu")
                kept = rank_keep_one(s, valid, table, scores, past_valid,
                                     past_kept if self.band is not None else None)
            else:
                kept = causal_rank_keep(s, valid, self.keep, scores, past_valid, docs)
                if self.band is not None:
                    kept = keep_within_band(kept, valid, self.keep, self.band, past_kept,
                                            past_valid, docs)
        return self._threshold(s, valid, entered, kept, None if sync else L)

    def _rank_table(self, device: torch.device | str) -> Tensor:
        """`rank_rule_table` on `device`: kept on the CPU (read there for a row whose count
        the host knows) and on the device last asked for."""
        device, cpu = torch.device(device), torch.device("cpu")
        with torch.inference_mode(False):  # plain tensors, even if made in inference
            if cpu not in self._tables:
                self._tables = {cpu: rank_rule_table(self.keep, self.band, self.max_len)}
            if device not in self._tables:
                self._tables = {cpu: self._tables[cpu], device: self._tables[cpu].to(device)}
        return self._tables[device]

    @torch.no_grad()
    def _record_cutoff(self, s: Tensor, valid: Tensor | None, entered: Tensor) -> None:
        """Record this batch's top-k cut-off of the shifted scores: midway between the lowest
        kept and the highest dropped score of the whole batch; with padding, the mean of the
        rows' cut-offs."""
        B, L = s.shape
        if valid is None:
            n, kept = B * L, B * keep_count(self.keep, L)
            if kept >= n:
                return
            flat = s.reshape(-1)
            batch = 0.5 * (flat.kthvalue(n - kept + 1).values + flat.kthvalue(n - kept).values)
            rows = torch.ones((), device=s.device)
        else:
            k = _keep_count(self.keep, entered)
            ordered = s.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
            both = (k > 0) & (k < entered)
            a = ordered.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
            b = ordered.gather(1, k.clamp(max=L - 1)[:, None]).squeeze(1)
            mid = torch.where(both, 0.5 * (a + b), torch.zeros_like(a))
            rows = (both.sum() > 0).float()
            batch = mid.sum() / both.sum().clamp(min=1)
        # relative to the cut-off in use (the scores are shifted by it)
        self.pending_sum.add_(rows * (batch + self.cutoff))
        self.pending_count.add_(rows)

    def _top_k(self, s: Tensor, valid: Tensor | None, entered: Tensor) -> Selection:
        """Training: keep the k = ceil(keep * L) highest scores of each row."""
        B, L = s.shape
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))  # padding sorts last, clamps to 0
        s_sorted, order = s.sort(dim=1, descending=True)
        c = s_sorted.clamp(0.0, 1.0)
        # K slots per row, known on the host (no sync, one shape per length for compiled
        # blocks): every row keeps ceil(keep * L) tokens, a padded row fewer (unused slots)
        K = keep_count(self.keep, L)
        if valid is None:
            k = torch.full((B,), K, dtype=torch.long, device=s.device)
        else:
            k = _keep_count(self.keep, entered)  # (B,), each <= K
        i = torch.arange(K, device=s.device)[None, :]  # (1, K)
        used = i < k[:, None]  # (B, K)
        # Pair kept token i with discarded token k+i (or, on a random half of the steps, with
        # the discarded ones in reversed order, k + (k-1-i)): the weight c[i] - c[partner] is
        # how scores get gradient, and it punishes positive scores on discarded tokens.
        reverse = self.training and coin(0.5)  # outside training: the plain pairing
        partner = 2 * k[:, None] - 1 - i if reverse else k[:, None] + i
        c_partner = c.gather(1, partner.clamp(max=L - 1)) * (partner < L)
        w = (c[:, :K] - c_partner) * used
        # Restore the original token order; unused slots go last.
        idx = order[:, :K]
        key = torch.where(used, idx, L + i)
        key, perm = key.sort(dim=1)
        idx, w, used = idx.gather(1, perm), w.gather(1, perm), used.gather(1, perm)
        return Selection(idx, w, None if valid is None else used, k, entered)

    def _top_k_documents(self, s: Tensor, valid: Tensor | None, entered: Tensor,
                         docs: Tensor, slots: int | None = None) -> Selection:
        """Training on packed rows: `_top_k` within each document, k_d = ceil(keep * n_d)
        of its real tokens, each kept token paired with one its document dropped, so a
        document keeps the tokens, and gets the weights, it gets alone (design.md §3.10)."""
        B, L = s.shape
        none = torch.iinfo(torch.long).max  # padding: a group of its own that keeps nothing
        d = docs.long() if valid is None else torch.where(valid, docs.long(), none)
        if valid is not None:
            s = s.masked_fill(~valid, float("-inf"))
        by_score = s.argsort(dim=1, descending=True, stable=True)
        order = by_score.gather(1, d.gather(1, by_score).argsort(dim=1, stable=True))
        sd, c = d.gather(1, order), s.gather(1, order).clamp(0.0, 1.0)  # (document, -score)
        first = torch.searchsorted(sd, sd)  # where each token's document starts in `order`
        n = torch.searchsorted(sd, sd, right=True) - first
        r = torch.arange(L, device=s.device) - first  # rank within the document
        k = _keep_count(self.keep, n).masked_fill(sd == none, 0)
        used = r < k
        reverse = self.training and coin(0.5)  # the pairing of `_top_k`, per document
        partner = 2 * k - 1 - r if reverse else k + r
        c_partner = c.gather(1, (first + partner).clamp(max=L - 1)) * (partner < n)
        w = (c - c_partner) * used
        count = used.sum(1)
        if slots is None:
            least, K = torch.stack(torch.aminmax(count)).tolist()  # one host sync
        else:  # a bound: unused slots stay masked; checked on the device, not read back
            least, K = -1, min(slots, L)
            torch._assert_async((count <= K).all(), "max_documents is below the number of "
                                "documents in a row: pass an upper bound (or none)")
        perm = torch.where(used, order, L + order).argsort(dim=1)[:, :K]  # kept, in order
        used = used.gather(1, perm)
        return Selection(order.gather(1, perm), w.gather(1, perm), None if least == K else used,
                         count, entered)

    def _threshold(self, s: Tensor, valid: Tensor | None, entered: Tensor,
                   kept: Tensor | None = None, slots: int | None = None) -> Selection:
        """Inference: keep the tokens `kept` (default: a positive score), weight clamp(s, 0, 1).

        Causal: the decision for a token depends only on its own hidden state (threshold)
        or on the scores up to it (rank rule).
        """
        B, L = s.shape
        kept = s > 0 if kept is None else kept
        if valid is not None:
            kept &= valid
        count = kept.sum(1)
        if slots is not None:  # a bound known on the host: no sync, unused slots masked
            least, K = -1, min(slots, L)
        elif B == 1 and L:  # one row: its count is both (one host sync)
            least = K = int(count)
        else:  # one host sync for both: the slot count and whether every row fills it
            least, K = torch.stack(torch.aminmax(count)).tolist() if B * L else (0, 0)
        if L == 1:  # a decoding step: the one token, in its slot if there is one
            idx = torch.zeros(B, K, dtype=torch.long, device=s.device)
            used = kept[:, :K]
        else:  # the kept tokens in order, then unused slots
            pos = torch.arange(L, device=s.device).expand(B, L)
            key = torch.where(kept, pos, L + pos)
            idx = key.sort(dim=1).values[:, :K]
            used = idx < L
            idx = torch.where(used, idx, idx - L)
        w = s.clamp(0.0, 1.0).gather(1, idx) * used
        return Selection(idx, w, None if least == K else used, count, entered, s.detach(),
                         kept)



@contextmanager
def selection_rule(model: nn.Module, rule: str | None):
    """Within the block, every subsampler of `model` (any wrapper: DDP, FSDP, PEFT, HF)
    selects by `rule` whatever the mode: "top_k" (training's), "threshold" (inference's,
    whichever `threshold` the model has: rank, calibrated or zero), or None (by mode)."""
    if rule not in (None, "top_k", "threshold"):
        raise ValueError(f"rule must be None, 'top_k' or 'threshold', got {rule!r}")
    subs = [m for m in model.modules() if isinstance(m, Subsampler)]
    before = [m.rule for m in subs]
    for m in subs:
        m.rule = rule
    try:
        yield subs
    finally:
        for m, r in zip(subs, before, strict=True):
            m.rule = r
