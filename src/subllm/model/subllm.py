"""SUBLLM and its LLaMA baseline (docs/design.md §3). A structure of only "T" is a LLaMA.

Reading order: `Subsampler` (§3.2, subsample.py) with its `ScoreBalancer` (§3.5), the
blocks on the kept tokens (§3.3, llama.py), `Bypass` (upsampling + bypass, §3.4,
bypass.py), the KV cache (§3.7, kv_cache.py), and `SubLLM` here, whose forward walks the
structure tree.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from .bypass import Bypass
from .config import ModelConfig, Segment, require_model_config
from .decode import generate as _generate
from .errors import SubLLMError
from .kv_cache import KVCache
from .llama import (
    Block,
    RMSNorm,
    Span,
    additive_mask,
    attention_mask_for,
    cached_attention_backends,
    rope_cos_sin,
    rope_inv_freq,
)
from .mst import chunked_cross_entropy
from .subsample import CUTOFF_BUFFERS, ScoreBalancer, Subsampler, document_starts

# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------

# From this many rows, a decoding step runs every segment on one masked slot per row (no
# host sync): with keep 0.5, a token no row keeps is then 1 step in 16 or rarer.
SYNC_FREE_ROWS = 4


def document_ids(input_ids: Tensor, end_id: int) -> Tensor:
    """(B, L) ids of the documents packed into each row, for `SubLLM.forward(...,
    document_ids=)`: documents that each end with the token `end_id` (end-of-text), a new
    one starting after each; the row's first tokens are a document of their own. On the
    device, no host sync."""
    ends = (input_ids == end_id).long()
    return ends.cumsum(1) - ends


def _param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, parameter name), the same in every process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def assign_full(p: Tensor, full: Tensor) -> None:
    """Copy the full (global-shape) tensor `full` into the parameter `p`; a DTensor `p`
    (sharded or replicated by FSDP2 / HSDP) takes only its local piece, computed here
    without communication."""
    if isinstance(p, DTensor):
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(local.to_local())
    else:
        p.copy_(full)


def _describe(x: object) -> str:
    """A tensor's shape and dtype (or what was passed instead), for an error message."""
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}, {str(x.dtype).removeprefix('torch.')}"
    return type(x).__name__


def longer_context(config: ModelConfig) -> str:
    """How to get past max_seq_len where the model's YaRN / llama3 rope scaling reaches
    further (a model converted with its max_position_embeddings, the original context, as
    its own: `subllm convert --max-seq-len`), to end a too-long-input message; else ''."""
    rs = config.rope_scaling or {}
    if rs.get("rope_type") not in ("yarn", "llama3"):
        return ""
    longer = int(rs["factor"] * rs["original_max_position_embeddings"])
    return (f", or, as its {rs['rope_type']} rope scaling reaches {longer} tokens, convert it "
            f"again with --max-seq-len {longer}" if longer > config.max_seq_len else "")


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
        require_model_config(config, "SubLLM")
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
        # And the level each subsampling module scores (its parent's).
        self.block_levels = [0] * config.n_layers
        self.score_levels = [0] * len(segments)
        for seg in segments:
            for c in seg.children:
                if isinstance(c, int):
                    self.block_levels[c] = seg.index + 1
                else:
                    self.score_levels[c.index] = seg.index + 1
        self.step = 0
        self.gradient_checkpointing = False
        self._parent_positions = config.rope_positions == "parent"
        # A segment no row kept a token of is skipped (no work at all). Sharded data-parallel
        # training sets this False: FSDP gathers each block's weights in its forward, so
        # every rank must call the same blocks; an empty segment then runs on one unused
        # slot per row instead, with the same result (docs/design.md §3.2).
        self.skip_empty_segments = True
        # Decoding steps of fewer than SYNC_FREE_ROWS rows ask the host, once per segment,
        # whether any row kept the token, and skip the segment when none did: in eager mode
        # the skipped blocks are worth more than the wait. True: never ask (CUDA graphs,
        # torch.cuda.set_sync_debug_mode), every segment runs on a masked slot per row.
        self.sync_free_decoding = False
        # rope_inv_freq's result, and the device and settings it was made for
        self._inv_freq: tuple[tuple, tuple[Tensor, float]] | None = None
        self.loss_chunks: int | None = None  # set by subllm.mst.apply_mst; 0: default rule
        self.init_weights()

    # ---- parameters -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re-)initialise every parameter; call after `to_empty` on a meta-built model.

        seed None: drawn from the global RNG, module after module. seed given: each
        parameter from its own generator, seeded with (seed, its name), so the values do
        not depend on what else is drawn nor on how the parameters are sharded: a DTensor
        parameter (FSDP2's `fully_shard`) has its full tensor drawn on the CPU, one
        parameter at a time, and keeps its local shard (docs/training.md, "Several
        processes or GPUs")."""
        self.tie_weights()
        if seed is not None:
            owners = dict(self.named_modules())
            for name, p in self.named_parameters():
                full = torch.empty(p.shape, dtype=p.dtype)  # the global shape, on the CPU
                gen = torch.Generator().manual_seed(_param_seed(seed, name))
                self._init_parameter(owners[name.rpartition(".")[0]], full, gen,
                                     bias=name.endswith(".bias"))
                assign_full(p, full)
                del full
        for m in self.modules():
            if seed is None and isinstance(m, (nn.Linear, nn.Embedding, RMSNorm, Bypass)):
                for pname, p in m.named_parameters(recurse=False):  # a tied one drawn twice
                    self._init_parameter(m, p, None, bias=pname == "bias")
            if isinstance(m, ScoreBalancer):
                m.g_rms.zero_()
            elif isinstance(m, Subsampler):
                for name in CUTOFF_BUFFERS:
                    getattr(m, name).zero_()

    def tie_weights(self) -> None:
        """With tie_embeddings, make the head's weight the embedding's again: `to_empty`
        (and any `_apply` that makes new tensors) gives each of them its own."""
        if self.config.tie_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_parameter(self, owner: nn.Module, t: Tensor, gen: torch.Generator | None,
                        bias: bool = False) -> None:
        """The initial value of a parameter of `owner`, drawn into `t` with `gen` (None: the
        global RNG): the rule of `init_weights`. Biases (Qwen2's q/k/v) start at 0."""
        if bias:
            nn.init.zeros_(t)
        elif isinstance(owner, (nn.Linear, nn.Embedding)):
            nn.init.normal_(t, mean=0.0, std=self.config.init_std, generator=gen)
        elif isinstance(owner, RMSNorm):
            nn.init.ones_(t)
        elif isinstance(owner, Bypass):
            nn.init.constant_(t, self.config.bypass_init)
        else:
            raise SubLLMError(f"init_weights: no rule for a parameter of {type(owner).__name__}")

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def set_step(self, step: int) -> None:
        """Training step for the schedules of design.md §3.6 (c_min, balancer probability);
        call it before every optimizer step. A new step also folds the cut-offs the last
        step's training passes recorded into the calibrated thresholds (design.md §3.8)."""
        if int(step) != self.step:
            for sub in self.subsamplers:
                sub.apply_pending()
        self.step = int(step)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.n_layers, len(self.subsamplers) + 1,
                             self.block_levels, self.score_levels)

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
        document_ids: Tensor | None = None,
        max_documents: int | None = None,
    ) -> ModelOutput:
        """input_ids: (B, L), or inputs_embeds: (B, L, dim) instead. labels: (B, L) aligned
        with the inputs (shifted inside; -100 ignored). attention_mask: (B, L) or
        (B, cached + L), 1 for real tokens (left padding for generation). cache: a KVCache
        to extend (eval mode only). logits_to_keep > 0: logits of the last positions only.
        num_items_in_batch: divide the summed loss by this (gradient accumulation) instead
        of by the number of targets. document_ids: (B, L) ids of the documents packed into
        each row, non-decreasing along it: attention, RoPE positions and subsampling stay
        within each document, so each gets the logits it gets alone (design.md §3.10).
        max_documents: with document_ids, an upper bound on the documents in any row, known
        on the host (`subllm.train.evaluate.packed` counts them on the CPU batch): training
        then sizes its selections from it instead of reading kept counts from the device."""
        B, L = self._check_inputs(input_ids, inputs_embeds, labels, logits_to_keep)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and self.training:
            raise SubLLMError("the KV cache is for inference: call model.eval() first")
        past = cache.seen if cache is not None else 0
        if past + L > self.config.max_seq_len:
            raise SubLLMError(
                f"sequence of {past + L} tokens exceeds the model's context "
                f"(max_seq_len={self.config.max_seq_len}); shorten the input"
                f"{longer_context(self.config)}"
            )
        if attention_mask is not None and (attention_mask.dim() != 2
                                           or attention_mask.shape[0] != B
                                           or attention_mask.shape[1] not in (L, past + L)):
            cached = f", or ({B}, {past + L}) to cover the {past} cached tokens" if past else ""
            raise SubLLMError(f"attention_mask of shape {tuple(attention_mask.shape)} does not "
                              f"match the inputs: pass (batch, length) = ({B}, {L}){cached}, "
                              "1 for real tokens and 0 for padding")
        valid = None
        # read where the mask is: a mask on the CPU costs no device sync
        if attention_mask is not None and not bool(attention_mask[:, -L:].bool().all()):
            valid = attention_mask[:, -L:].to(device=device, dtype=torch.bool)
        if document_ids is not None:
            if (not isinstance(document_ids, Tensor) or tuple(document_ids.shape) != (B, L)
                    or document_ids.is_floating_point()):
                raise SubLLMError(f"document_ids must be integer ids of the inputs' shape "
                                  f"({B}, {L}), got {_describe(document_ids)}")
            if cache is not None or valid is not None:
                raise SubLLMError("document_ids (packed rows) take neither a KV cache nor an "
                                  "attention_mask: pass one document per row for those")
            document_ids = document_ids.to(device)
            if max_documents is not None:
                if isinstance(max_documents, bool) or not isinstance(max_documents, int) or (
                        max_documents < 1):
                    raise SubLLMError(f"max_documents must be an integer >= 1, got "
                                      f"{max_documents!r}")
                # a power of two: compiled blocks see a few selection sizes, not one per batch
                max_documents = 1 << (max_documents - 1).bit_length()
        # Positions count real tokens only, so a left-padded prompt starts at 0.
        start = cache.next_pos if cache is not None and cache.next_pos is not None else None
        if document_ids is not None:  # positions restart at each document
            pos = torch.arange(L, device=device) - document_starts(document_ids)
            n_new = torch.full((B,), L, device=device, dtype=torch.long)
        elif valid is None:
            pos = torch.arange(L, device=device).expand(B, L)
            n_new = torch.full((B,), L, device=device, dtype=torch.long)
        else:
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)
            n_new = valid.sum(1)
        if start is not None:
            pos = pos + start[:, None]
        if cache is not None:
            cache.next_pos = n_new if start is None else start + n_new

        try:
            h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        except IndexError:  # an id past the vocabulary (checked on the CPU only, for free)
            raise SubLLMError(f"input_ids hold a token id outside the vocabulary [0, "
                              f"{self.config.vocab_size}); check the tokenizer matches the "
                              "model") from None
        kept: list[Tensor | None] = [None] * len(self.subsamplers)
        entered: list[Tensor | None] = [None] * len(self.subsamplers)
        span = self._span(0, pos, valid, cache, h.dtype, document_ids,
                          max_documents if document_ids is not None else None)
        with (cached_attention_backends(h.device) if cache is not None
              else contextlib.nullcontext()):
            h = self._run(self.tree, h, span, cache, kept, entered)
        h = self.norm(h)

        zeros = torch.zeros(B, dtype=torch.long, device=h.device)
        kept_t = [k if k is not None else zeros for k in kept]
        entered_t = [e if e is not None else zeros for e in entered]
        loss = logits = None
        if labels is not None and self.loss_chunks is not None:
            loss = chunked_cross_entropy(h, self.lm_head.weight, labels,
                                         chunks=self.loss_chunks or None,
                                         num_items_in_batch=num_items_in_batch)
        else:
            if labels is None and logits_to_keep > 0:
                h = h[:, -logits_to_keep:]
            logits = self.lm_head(h)
            if labels is not None:
                shifted = logits[:, :-1].flatten(0, 1)
                if shifted.dtype in (torch.float16, torch.bfloat16):
                    shifted = shifted.float()  # softmax in fp32 under autocast
                targets = labels[:, 1:].flatten().to(shifted.device, torch.long)
                reduction = "mean" if num_items_in_batch is None else "sum"
                try:
                    loss = F.cross_entropy(shifted, targets, ignore_index=-100,
                                           reduction=reduction)
                except IndexError:  # as the input ids: a label past the vocabulary
                    raise SubLLMError(f"labels hold a token id outside the vocabulary [0, "
                                      f"{self.config.vocab_size}) other than -100 (ignored)"
                                      ) from None
                if num_items_in_batch is not None:
                    loss = loss / num_items_in_batch
        return ModelOutput(logits, loss, cache, kept_t, entered_t)

    def _check_inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None,
                      labels: Tensor | None, logits_to_keep: int) -> tuple[int, int]:
        """(batch, length) of the inputs, or a SubLLMError (a ValueError) that names what
        does not fit, before any work: shapes and dtypes only, no device sync."""
        if (input_ids is None) == (inputs_embeds is None):
            raise SubLLMError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            if (not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3
                    or inputs_embeds.shape[-1] != self.config.dim
                    or not inputs_embeds.is_floating_point()):
                raise SubLLMError(
                    f"inputs_embeds must be a floating-point tensor (batch, length, "
                    f"{self.config.dim}), got {_describe(inputs_embeds)}")
            B, L = inputs_embeds.shape[:2]
        else:
            if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2
                    or input_ids.dtype not in (torch.long, torch.int)):
                raise SubLLMError(f"input_ids must be a (batch, length) tensor of token ids "
                                  f"(torch.long), got {_describe(input_ids)}")
            B, L = input_ids.shape
        if labels is not None and (
                not isinstance(labels, Tensor) or tuple(labels.shape) != (B, L)
                or labels.is_floating_point() or labels.is_complex()
                or labels.dtype == torch.bool):
            raise SubLLMError(f"labels must be token ids (torch.long) of the inputs' shape "
                              f"({B}, {L}), one per input token (-100: no target; shifted "
                              f"inside), got {_describe(labels)}")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or (
                logits_to_keep < 0):
            raise SubLLMError(f"logits_to_keep must be an integer >= 0 (0: all), got "
                              f"{logits_to_keep!r}")
        return B, L

    def _span(self, level: int, pos: Tensor, valid: Tensor | None, cache: KVCache | None,
              dtype: torch.dtype, docs: Tensor | None = None, max_docs: int | None = None
              ) -> Span:
        c = self.config
        key = (pos.device, c.resolved_head_dim, c.rope_theta, repr(c.rope_scaling))
        if self._inv_freq is None or self._inv_freq[0] != key:
            with torch.inference_mode(False):  # a plain tensor, even if made in inference
                self._inv_freq = key, rope_inv_freq(*key[1:3], c.rope_scaling, pos.device)
        cos, sin = rope_cos_sin(pos, c.resolved_head_dim, c.rope_theta, dtype, c.rope_scaling,
                                self._inv_freq[1])
        B, L = pos.shape
        # A sliding window (design.md §2.1) over this level's positions. At the top level
        # positions are consecutive, so it can only hide a key once the level holds more
        # than `window` slots; inside a segment the kept tokens' positions have gaps.
        window = c.sliding_window
        if cache is None:
            window = window if window is not None and (level > 0 or L > window) else None
            mask = attention_mask_for(valid, None, L, pos.device, window, pos, docs=docs)
            return Span(pos, valid, cos, sin, additive_mask(mask, pos.device, dtype),
                        level=level, docs=docs, max_docs=max_docs)
        state = cache.levels[level]
        past_all_valid = state.all_valid
        start, past, past_pos = state.append(valid, B, L, pos.device,
                                             pos if window is not None else None)
        window = window if window is not None and (level > 0 or start + L > window) else None
        prior = past.sum(1) if start > 0 and self._parent_positions else None
        if start > 0 and L == 1 and valid is None and past_all_valid and window is None:
            # One new token, every cached slot real: attend to everything, no mask needed.
            return Span(pos, valid, cos, sin, None, start, causal=False, prior=prior,
                        level=level)
        mask = attention_mask_for(valid, past if start > 0 else None, L, pos.device, window,
                                  pos, past_pos if start > 0 else None)
        return Span(pos, valid, cos, sin, additive_mask(mask, pos.device, dtype), start,
                    prior=prior, level=level)

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
        past = None
        if cache is not None and span.cache_start:  # the rank rule ranks against these
            scores, decisions = cache.scores[seg.index].past(span.cache_start)
            level = cache.levels[span.level]  # validity None: every slot real, as the host knows
            past = (scores, None if level.all_valid else level.valid[:, :span.cache_start],
                    decisions)
        # A decoding step of enough rows (or any, with sync_free_decoding) runs the segment
        # on one slot per row, masked where the row dropped its token, instead of asking the
        # host whether any row kept it (design.md §3.7)
        B, L = x_out.shape[:2]
        sync = not (cache is not None and L == 1
                    and (self.sync_free_decoding or B >= SYNC_FREE_ROWS))
        sel = self.subsamplers[seg.index](x_out, span.valid, self.step, past, span.docs,
                                          max_docs=span.max_docs, sync=sync)
        if cache is not None and sel.scores is not None:
            cache.scores[seg.index].update(sel.scores, sel.decisions, span.cache_start)
        kept[seg.index], entered[seg.index] = sel.count, sel.entered
        if sel.size == 0:  # no row kept anything: the segment's blocks need do no work
            if self.skip_empty_segments or cache is not None:
                return x_out
            sel = sel.placeholder()
        idx = sel.idx[..., None].expand(-1, -1, x_out.shape[-1])
        x_in = x_out.gather(1, idx)  # (B, K, d)
        docs = None if span.docs is None else span.docs.gather(1, sel.idx)
        if self._parent_positions and seg.depth >= 2:
            # `parent` (design.md §3.3): the index among the enclosing segment's kept tokens
            # (of its document), counted on from those already cached, so decoding numbers
            # them as prefill does
            pos_in = sel.idx if span.prior is None else sel.idx + span.prior[:, None]
            if span.docs is not None:
                pos_in = pos_in - document_starts(span.docs).gather(1, sel.idx)
        else:
            pos_in = span.pos.gather(1, sel.idx)  # original positions (design.md §3.3)
        inner = self._span(seg.index + 1, pos_in, sel.valid, cache, x_out.dtype, docs,
                           span.max_docs)
        y = self._run(seg.children, x_in, inner, cache, kept, entered)
        return self.bypasses[seg.index](x_out, y, sel, self.step)

    # ---- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, eos_token_id: int | None = None,
                 attention_mask: Tensor | None = None, streamer=None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Autoregressive decoding with the KV cache; see `decode.generate`."""
        return _generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, repetition_penalty=repetition_penalty,
                        eos_token_id=eos_token_id, attention_mask=attention_mask,
                        streamer=streamer, generator=generator)


