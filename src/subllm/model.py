"""SUBLLM and its LLaMA baseline (DESIGN 3). A structure of only "T" is a LLaMA.

Reading order: `Subsampler` (3.2) with its `ScoreBalancer` (3.5), the blocks on the kept
tokens (3.3, `modules.Block`), `Bypass` (upsampling + bypass, 3.4), the KV cache
(3.7), and `SubLLM`, whose forward walks the structure tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from subllm.config import ModelConfig, Segment
from subllm.errors import SubLLMError
from subllm.modules import Block, LayerKV, RMSNorm, Span, attention_mask_for, rope_cos_sin


def _linear_schedule(step: int, start: float, end: float, steps: int) -> float:
    if steps <= 0:
        return end
    t = min(max(step, 0) / steps, 1.0)
    return start + (end - start) * t


def _coin(p: float) -> bool:
    """A random decision from torch's CPU generator (seeded and checkpointed with it)."""
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return bool(torch.rand(()) < p)


# --------------------------------------------------------------------------------------
# Score balancer (DESIGN 3.5)
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
        # DESIGN 3.5 scales by |g| elementwise; but scores clamped outside (0, 1) get no task
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
    """Keeps P(score > 0) near the keep ratio and the score rms in [1.25, 5] (DESIGN 3.5).

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
        p = _linear_schedule(step, c.balancer_prob_start, c.balancer_prob_end,
                             c.balancer_prob_steps)
        if not (self.training and s.requires_grad and _coin(p)):
            return s
        return _BalanceScores.apply(s, valid, self.lo, self.hi, c.balancer_rms_min,
                                    c.balancer_rms_max, c.balancer_strength, self.g_rms)


# --------------------------------------------------------------------------------------
# Subsampling (DESIGN 3.2)
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


def _keep_count(keep: float, n: Tensor) -> Tensor:
    # ceil(keep * n), rounded first so that float noise (0.64 * 100 = 64.0000001) does not
    # add a token.
    return torch.ceil(torch.round(n.double() * keep, decimals=6)).long()


class Subsampler(nn.Module):
    """Scores tokens and keeps the important ones (DESIGN 3.2)."""

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
        k = _keep_count(self.keep, entered)  # (B,)
        K = int(k.max()) if valid is not None else int(k[0])
        i = torch.arange(K, device=s.device)[None, :]  # (1, K)
        used = i < k[:, None]  # (B, K)
        # Pair kept token i with discarded token k+i (or, on a random half of the steps, with
        # the discarded ones in reversed order, k + (k-1-i)): the weight c[i] - c[partner] is
        # how scores get gradient, and it punishes positive scores on discarded tokens.
        partner = k[:, None] + i if not _coin(0.5) else 2 * k[:, None] - 1 - i
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


# --------------------------------------------------------------------------------------
# Upsampling + bypass (DESIGN 3.4)
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
        return _linear_schedule(step, c.bypass_min_start, c.bypass_min_end, c.bypass_min_steps)

    def forward(self, x_out: Tensor, y: Tensor, sel: Selection, step: int = 0) -> Tensor:
        c = self.scale
        if self.training and c.requires_grad and _coin(self.config.bypass_limit_prob):
            c = _LimitValue.apply(c, self.min_scale(step), 1.0)
        idx = sel.idx[..., None].expand(-1, -1, x_out.shape[-1])  # (B, K, d)
        x_kept = x_out.gather(1, idx)
        w = sel.weight.to(y.dtype)[..., None]
        delta = c.to(y.dtype) * w * (y - x_kept)  # zero on unused slots (w = 0)
        return x_out.scatter_add(1, idx, delta.to(x_out.dtype))


# --------------------------------------------------------------------------------------
# KV cache (DESIGN 3.7)
# --------------------------------------------------------------------------------------


class LevelState:
    """Which KV slots hold real tokens, for all blocks of one nesting level."""

    def __init__(self) -> None:
        self.valid: Tensor | None = None  # (B, capacity) bool
        self.length = 0
        self.all_valid = True  # every slot so far holds a real token for every row

    def append(self, valid: Tensor | None, batch: int, n: int,
               device: torch.device) -> tuple[int, Tensor]:
        """Reserve slots for n new tokens (valid: (B, n) or None = all real).

        Returns (start slot, validity of the slots before it).
        """
        if valid is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=device)
        else:
            self.all_valid = self.all_valid and bool(valid.all())
        start = self.length
        end = start + n
        if self.valid is None or self.valid.shape[1] < end:
            cap = max(end, 2 * (self.valid.shape[1] if self.valid is not None else 0), 64)
            grown = valid.new_zeros(valid.shape[0], cap)
            if self.valid is not None:
                grown[:, :start] = self.valid[:, :start]
            self.valid = grown
        past = self.valid[:, :start]
        self.valid[:, start:end] = valid
        self.length = end
        return start, past


@dataclass
class KVCache:
    """Per-block keys/values plus per-level slot validity and each row's next position.

    Blocks inside a segment only cache the tokens their segment kept; a token no row kept
    adds nothing to them.
    """

    layers: list[LayerKV]
    levels: list[LevelState]
    next_pos: Tensor | None = None  # (B,)

    @classmethod
    def empty(cls, n_layers: int, n_levels: int) -> KVCache:
        return cls([LayerKV() for _ in range(n_layers)], [LevelState() for _ in range(n_levels)])

    @property
    def seen(self) -> int:
        """Tokens (columns, padding included) that went into the cache."""
        return self.levels[0].length

    def level_lengths(self) -> list[int]:
        return [lv.length for lv in self.levels]

    @torch.no_grad()
    def reorder(self, rows: Tensor) -> None:
        """Keep/duplicate batch rows in the order `rows` (beam search)."""
        for kv in self.layers:
            if kv.k is not None:
                kv.k, kv.v = kv.k.index_select(0, rows), kv.v.index_select(0, rows)
        for lv in self.levels:
            if lv.valid is not None:
                lv.valid = lv.valid.index_select(0, rows.to(lv.valid.device))
        if self.next_pos is not None:
            self.next_pos = self.next_pos.index_select(0, rows.to(self.next_pos.device))

    def nbytes(self, block_levels: list[int]) -> int:
        """Bytes of keys and values actually held (not buffer capacity)."""
        return sum(
            kv.nbytes(self.levels[lvl].length)
            for kv, lvl in zip(self.layers, block_levels, strict=True)
        )


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    logits: Tensor | None
    loss: Tensor | None = None
    cache: KVCache | None = None
    kept: list[Tensor] = field(default_factory=list)  # per `(`: (B,) tokens kept
    entered: list[Tensor] = field(default_factory=list)  # per `(`: (B,) tokens entering

    @property
    def kept_fractions(self) -> list[float]:
        return [
            float(k.sum()) / max(float(e.sum()), 1.0)
            for k, e in zip(self.kept, self.entered, strict=True)
        ]


class SubLLM(nn.Module):
    """A SUBLLM decoder; with a structure of only "T" it is exactly a LLaMA."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tree = config.tree
        segments = config.segments
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.subsamplers = nn.ModuleList(
            Subsampler(config, config.segment_keep(s)) for s in segments
        )
        self.bypasses = nn.ModuleList(Bypass(config) for _ in segments)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Level of each block for the KV cache: 0 = top, j + 1 = directly inside segment j.
        self.block_levels = [0] * config.n_layers
        for seg in segments:
            for c in seg.children:
                if isinstance(c, int):
                    self.block_levels[c] = seg.index + 1
        self.step = 0
        self.gradient_checkpointing = False
        self.loss_chunks: int | None = None  # set by subllm.mst.apply_mst
        self.init_weights()

    # ---- parameters -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter; call after `to_empty` on a meta-built model."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Bypass):
                nn.init.constant_(m.scale, self.config.bypass_init)
            elif isinstance(m, ScoreBalancer):
                m.g_rms.zero_()

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def set_step(self, step: int) -> None:
        """Training step for the schedules of DESIGN 3.6 (c_min, balancer probability)."""
        self.step = int(step)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.n_layers, len(self.subsamplers) + 1)

    # ---- forward ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        use_cache: bool = False,
        *,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | Tensor | None = None,
    ) -> ModelOutput:
        """input_ids: (B, L), or inputs_embeds: (B, L, dim) instead. labels: (B, L) aligned
        with the inputs (shifted inside; -100 ignored). attention_mask: (B, L) or
        (B, cached + L), 1 for real tokens (left padding for generation). cache: a KVCache
        to extend (eval mode only). logits_to_keep > 0: logits of the last positions only.
        num_items_in_batch: divide the summed loss by this (gradient accumulation) instead
        of by the number of targets."""
        if (input_ids is None) == (inputs_embeds is None):
            raise SubLLMError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.dim:
                raise SubLLMError(
                    f"inputs_embeds must be (batch, length, {self.config.dim}), got shape "
                    f"{tuple(inputs_embeds.shape)}"
                )
            B, L = inputs_embeds.shape[:2]
            device = inputs_embeds.device
        else:
            if input_ids.dim() != 2:
                raise SubLLMError(
                    f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}"
                )
            B, L = input_ids.shape
            device = input_ids.device
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and self.training:
            raise SubLLMError("the KV cache is for inference: call model.eval() first")
        past = cache.seen if cache is not None else 0
        if past + L > self.config.max_seq_len:
            raise SubLLMError(
                f"sequence of {past + L} tokens exceeds the model's context "
                f"(max_seq_len={self.config.max_seq_len}); shorten the input"
            )
        valid = None
        if attention_mask is not None:
            valid = attention_mask[:, -L:].to(device=device, dtype=torch.bool)
            if bool(valid.all()):
                valid = None
        # Positions count real tokens only, so a left-padded prompt starts at 0.
        start = cache.next_pos if cache is not None and cache.next_pos is not None else None
        if valid is None:
            pos = torch.arange(L, device=device).expand(B, L)
            n_new = torch.full((B,), L, device=device, dtype=torch.long)
        else:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            n_new = valid.sum(1)
        if start is not None:
            pos = pos + start[:, None]
        if cache is not None:
            cache.next_pos = n_new if start is None else start + n_new

        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        kept: list[Tensor | None] = [None] * len(self.subsamplers)
        entered: list[Tensor | None] = [None] * len(self.subsamplers)
        span = self._span(0, pos, valid, cache, h.dtype)
        h = self._run(self.tree, h, span, cache, kept, entered)
        h = self.norm(h)

        zeros = torch.zeros(B, dtype=torch.long, device=h.device)
        kept_t = [k if k is not None else zeros for k in kept]
        entered_t = [e if e is not None else zeros for e in entered]
        loss = logits = None
        if labels is not None and self.loss_chunks is not None:
            from subllm.mst import chunked_cross_entropy

            loss = chunked_cross_entropy(h, self.lm_head.weight, labels, chunks=self.loss_chunks,
                                         num_items_in_batch=num_items_in_batch)
        else:
            if labels is None and logits_to_keep > 0:
                h = h[:, -logits_to_keep:]
            logits = self.lm_head(h)
            if labels is not None:
                shifted = logits[:, :-1].flatten(0, 1)
                if shifted.dtype in (torch.float16, torch.bfloat16):
                    shifted = shifted.float()  # softmax in fp32 under autocast
                targets = labels[:, 1:].flatten().to(shifted.device)
                if num_items_in_batch is None:
                    loss = F.cross_entropy(shifted, targets, ignore_index=-100)
                else:
                    loss = F.cross_entropy(shifted, targets, ignore_index=-100, reduction="sum")
                    loss = loss / num_items_in_batch
        return ModelOutput(logits, loss, cache, kept_t, entered_t)

    def _span(self, level: int, pos: Tensor, valid: Tensor | None, cache: KVCache | None,
              dtype: torch.dtype) -> Span:
        cos, sin = rope_cos_sin(pos, self.config.resolved_head_dim, self.config.rope_theta, dtype)
        B, L = pos.shape
        if cache is None:
            return Span(pos, valid, cos, sin, attention_mask_for(valid, None, L, pos.device))
        state = cache.levels[level]
        past_all_valid = state.all_valid
        start, past = state.append(valid, B, L, pos.device)
        if start > 0 and L == 1 and valid is None and past_all_valid:
            # One new token, every cached slot real: attend to everything, no mask needed.
            return Span(pos, valid, cos, sin, None, start, causal=False)
        mask = attention_mask_for(valid, past if start > 0 else None, L, pos.device)
        return Span(pos, valid, cos, sin, mask, start)

    def _run(self, items: list[int | Segment], h: Tensor, span: Span, cache: KVCache | None,
             kept: list, entered: list) -> Tensor:
        for item in items:
            if isinstance(item, Segment):
                h = self._segment(item, h, span, cache, kept, entered)
                continue
            block = self.layers[item]
            layer_cache = cache.layers[item] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, span, layer_cache, use_reentrant=False)
            else:
                h = block(h, span, layer_cache)
        return h

    def _segment(self, seg: Segment, x_out: Tensor, span: Span, cache: KVCache | None,
                 kept: list, entered: list) -> Tensor:
        sel = self.subsamplers[seg.index](x_out, span.valid, self.step)
        kept[seg.index], entered[seg.index] = sel.count, sel.entered
        if sel.size == 0:  # no row kept anything: the segment's blocks do no work at all
            return x_out
        idx = sel.idx[..., None].expand(-1, -1, x_out.shape[-1])
        x_in = x_out.gather(1, idx)  # (B, K, d)
        pos_in = span.pos.gather(1, sel.idx)  # original positions (DESIGN 3.3)
        inner = self._span(seg.index + 1, pos_in, sel.valid, cache, x_out.dtype)
        y = self._run(seg.children, x_in, inner, cache, kept, entered)
        return self.bypasses[seg.index](x_out, y, sel, self.step)

    # ---- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id: int | None = None,
                 attention_mask: Tensor | None = None, streamer=None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Autoregressive decoding with the KV cache; see `subllm.generation.generate`."""
        from subllm.generation import generate

        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, repetition_penalty=repetition_penalty,
                        eos_token_id=eos_token_id, attention_mask=attention_mask,
                        streamer=streamer, generator=generator)

