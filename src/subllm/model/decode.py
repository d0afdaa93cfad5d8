"""Autoregressive decoding with the SUBLLM KV cache (design.md §3.7) and logit processing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import SubLLMError

if TYPE_CHECKING:
    from .subllm import SubLLM


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (as in transformers): divide positive logits of seen tokens by
    `penalty`, multiply negative ones. seen: (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Mask (to -inf) all but the top-k tokens and the smallest nucleus of mass top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = probs.cumsum(-1) - probs >= top_p
        drop = drop.scatter(-1, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) token ids: greedy when temperature == 0, else sampled."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _validate(model: SubLLM, input_ids: Tensor, max_new_tokens: int, temperature: float,
              top_k: int | None, top_p: float | None, repetition_penalty: float | None,
              attention_mask: Tensor | None) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise SubLLMError("input_ids must be a non-empty (batch, length) tensor")
    if max_new_tokens < 0:
        raise SubLLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < float("inf"):  # NaN fails this too
        raise SubLLMError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                          f"{temperature}")
    if top_k is not None and top_k <= 0:
        raise SubLLMError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SubLLMError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise SubLLMError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise SubLLMError("attention_mask must have the shape of input_ids")
    total = input_ids.shape[1] + max_new_tokens
    ctx = model.config.max_seq_len
    if input_ids.shape[1] > ctx:
        raise SubLLMError(
            f"prompt of {input_ids.shape[1]} tokens is longer than the model's context ({ctx}); "
            "shorten the prompt"
        )
    if total > ctx:
        raise SubLLMError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's context ({ctx}); lower max_new_tokens to {ctx - input_ids.shape[1]}"
        )
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size:
        raise SubLLMError(
            f"token ids must be in [0, {model.config.vocab_size}); is the tokenizer the model's?"
        )


def _eos_tensor(eos_token_id: int | Sequence[int] | Tensor | None,
                device: torch.device) -> Tensor | None:
    """The stop ids as a 1-D tensor (None when there are none)."""
    if eos_token_id is None:
        return None
    ids = torch.as_tensor(eos_token_id, dtype=torch.long, device=device).reshape(-1)
    return ids if ids.numel() else None


def _emit(streamer: Any, token: Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):  # transformers' BaseStreamer
        streamer.put(token)
    else:
        streamer(token)


@torch.no_grad()
def generate(model: SubLLM, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             attention_mask: Tensor | None = None,
             streamer: Callable[[Tensor], Any] | Any | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Decode up to max_new_tokens per row; returns (B, L + n) ids.

    Prompts of different lengths go in one batch left-padded, with attention_mask marking
    the real tokens. eos_token_id is one id or a list (a model's `<|eot_id|>` and
    `<|end_of_text|>`, as in its generation_config): a row stops at the first of them it
    produces, then emits the first id of the list until every row has stopped.
    `streamer` is a callable (or a transformers streamer with put/end) receiving each new
    (B,) token tensor.
    """
    _validate(model, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
              attention_mask)
    was_training = model.training
    model.eval()
    try:
        B = input_ids.shape[0]
        seen = None
        if repetition_penalty is not None and repetition_penalty != 1.0:
            real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            counts = torch.zeros(B, model.config.vocab_size, dtype=torch.long,
                                 device=input_ids.device)
            seen = counts.scatter_add_(1, input_ids, real) > 0  # padding never counts
        # prefill: the next token needs the last position's logits only, not (B, L, V)
        out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = out.logits[:, -1]
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        eos = _eos_tensor(eos_token_id, input_ids.device)
        for i in range(max_new_tokens):
            logits = logits.float()
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            tok = next_token(logits, temperature, top_k, top_p, generator)
            if eos is not None:
                tok = torch.where(finished, eos[0], tok)
                finished |= torch.isin(tok, eos)
            tokens.append(tok[:, None])
            _emit(streamer, tok)
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            if i == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
                break
            logits = model(tok[:, None], cache=cache).logits[:, -1]
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)
