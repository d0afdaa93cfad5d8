"""Mini-Sequence Transformer (MsT): chunked MLP and chunked LM-head cross-entropy (design.md §4).

Long-sequence training runs out of memory on two activations that grow with the
sequence length times a wide dimension: the (L x ffn) MLP intermediates and the
(L x vocab) logits. MsT (Luo et al. 2024, "Mini-Sequence Transformer") processes both
in mini-sequences (chunks of tokens), so only one chunk's worth of either exists at a
time, and relies on block-level activation checkpointing for everything else.

- `chunked_cross_entropy`: LM head + next-token cross-entropy; per chunk it forms the
  fp32 logits, the loss and at once the gradients (softmax - onehot) for the hidden
  states and the head weight, so no (tokens x vocab) tensor outlives its chunk.
- `MiniSequenceMLP`: runs any MLP on chunks of the sequence, recomputing each chunk's
  intermediates in backward, so the (L x ffn) intermediate exists for one chunk only.
- `apply_mst`: one call that patches a model in place (our `SubLLM` or its Hugging Face
  wrapper `SubLLMForCausalLM`, or a Hugging Face causal LM of a supported family), in the
  manner of Liger-Kernel's `apply_liger_kernel_to_*`.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import default_loss_chunk_tokens
from .errors import SubLLMError

__all__ = [
    "HF_FAMILIES",
    "MiniSequenceMLP",
    "apply_mst",
    "check_compile_available",
    "compile_blocks",
    "chunked_cross_entropy",
    "default_loss_chunk_tokens",
    "default_loss_chunks",
    "default_mlp_chunks",
    "enable_checkpointing",
]


# --------------------------------------------------------------------------------------
# Chunked LM head + cross-entropy
# --------------------------------------------------------------------------------------


def default_loss_chunks(vocab_size: int, dim: int) -> int:
    """design.md §4: M = ceil(vocab / d) chunks, so a chunk's logits are about the size of L x d."""
    return max(1, math.ceil(vocab_size / dim))


def _ce_chunk(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    softcap: float | None,
    acc_dtype: torch.dtype,
    need_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Summed loss and d(summed loss)/d(logits) for one chunk of tokens.

    h: (c, d), weight: (V, d), target: (c,) all valid. Returns (loss_sum (scalar, acc_dtype),
    grad_logits (c, V) in acc_dtype or None). The caller turns grad_logits into the hidden
    and weight gradients and drops it before the next chunk. Without soft-capping one
    (c, V) buffer holds the logits, then exp, then the gradient (every step in place; no
    logsumexp temporary); soft-capping keeps a second one for tanh.
    """
    logits = (h @ weight.t()).to(acc_dtype)  # (c, V) in >= fp32
    if bias is not None:
        logits += bias.to(acc_dtype)
    tanh = None
    if softcap is not None:
        # Gemma-2 final-logit soft-capping: s = cap * tanh(z / cap), ds/dz = 1 - tanh^2
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    target_logit = logits.gather(1, target[:, None]).squeeze(1)  # (c,)
    top = logits.amax(dim=-1, keepdim=True)  # (c, 1)
    expd = logits.sub_(top).exp_()  # (c, V): exp(z - max), in place
    sum_exp = expd.sum(dim=-1)  # (c,)
    lse = sum_exp.log() + top.squeeze(1)  # (c,) logsumexp
    loss_sum = (lse - target_logit).sum()
    if not need_grad:
        return loss_sum, None
    # d loss / d logits = softmax - onehot, in the same buffer
    grad = expd.div_(sum_exp[:, None])
    grad.scatter_add_(1, target[:, None], torch.full_like(target_logit[:, None], -1.0))
    if tanh is not None:
        grad.mul_(1.0 - tanh.square_())
    return loss_sum, grad


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss of the LM head + cross-entropy with the gradients computed during forward.

    Computing the gradients in forward (rather than recomputing logits in backward, the
    paper's way) costs no extra matmuls; backward only scales the stored gradients, in
    place. No (V x d) buffer but the weight-gradient accumulator itself ever exists: it is
    scaled by 1/denom in place at the end of forward and by grad_out in place in backward,
    then handed to autograd as the gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # (N, d) valid tokens only
        weight: Tensor,  # (V, d)
        bias: Tensor | None,  # (V,)
        target: Tensor,  # (N,)
        denom: Tensor,  # scalar: what the summed loss is divided by
        chunk_size: int,
        softcap: float | None,
        compute_dtype: torch.dtype,
        grad_flags: tuple[bool, bool, bool],
    ) -> Tensor:
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        need_h, need_w, need_b = grad_flags
        need_grad = need_h or need_w or need_b
        n, d = hidden.shape
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            grad_h = torch.empty(n, d, dtype=acc_dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_w else None
            grad_b = torch.zeros(w.shape[0], dtype=acc_dtype, device=w.device) if need_b else None
            # the loss is accumulated in fp64: it is one scalar per chunk, and the sum must not
            # drift from the unchunked mean by more than fp32 rounding
            loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(compute_dtype)  # (c, d)
                loss_c, g = _ce_chunk(
                    h, w, bias, target[start : start + chunk_size], softcap, acc_dtype, need_grad
                )
                loss += loss_c
                if g is None:
                    continue
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(compute_dtype)
                if grad_h is not None and g.dtype == grad_h.dtype:
                    torch.mm(g, w, out=grad_h[start : start + chunk_size])  # (c, V) @ (V, d)
                elif grad_h is not None:
                    grad_h[start : start + chunk_size] = g @ w
                if grad_w is not None and g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), h)  # (V, c) @ (c, d), accumulated in place
                elif grad_w is not None:
                    grad_w += g.t() @ h  # low-precision product, fp32 accumulator
                del g
            scale = 1.0 / denom.to(acc_dtype)
            out = (loss / denom.to(torch.float64)).to(acc_dtype)
            # the gradients of the normalised loss: scaled in place, then in the inputs'
            # dtypes (a no-op when they are the accumulators' dtype)
            grads = []
            for g, dtype in ((grad_h, hidden.dtype), (grad_w, weight.dtype),
                             (grad_b, None if bias is None else bias.dtype)):
                grads.append(None if g is None else g.mul_(scale).to(dtype))
            ctx.grads = tuple(grads)
            del grad_h, grad_w, grad_b, grads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("chunked_cross_entropy: backward through the loss twice; its "
                               "gradients are computed once, in forward")
        # in place: the stored gradients belong to this call alone
        grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
        return (*grads, None, None, None, None, None, None)


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunks: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    bias: Tensor | None = None,
    shift: bool = True,
    min_chunk_tokens: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, in chunks of tokens.

    hidden: (B, L, d) or (N, d); weight: (V, d) (the LM head, possibly tied to the
    embedding); labels: (B, L) or (N,) integer ids, `ignore_index` for positions without
    a target. With `shift=True` (Hugging Face convention) labels are aligned with the
    input ids and position t is scored against labels[t + 1]; with `shift=False` they
    are already the targets of each position.

    reduction "mean" divides the summed loss by the number of non-ignored targets, or by
    `num_items_in_batch` when given (Hugging Face's normaliser under gradient
    accumulation); "sum" returns the sum. `softcap` applies cap * tanh(logits / cap)
    (Gemma-2's final-logit soft-capping). Chunking: exactly pieces of `chunk_size`
    tokens; or `chunks` pieces; or by default `default_loss_chunk_tokens(vocab, d, N)`
    tokens per piece (d at a large vocabulary: a chunk's logits no larger than the head's
    weight gradient). `min_chunk_tokens`, when given, is a floor on the last two.

    impl: "subllm" (this module's loop), "native" (PyTorch >= 2.13's
    `F.linear_cross_entropy` with the same chunk size; it has no soft-capping) or "auto"
    (this module's loop: measured ahead of the native one on CPU in fp32, see
    docs/benchmarks.md; on CUDA not measured yet, `subllm bench gpu` compares them).

    Logits and softmax are computed in (at least) fp32; the matmuls run in the autocast
    dtype when autocast is on. Returns a scalar fp32 (fp64 for fp64 inputs) loss.
    """
    if hidden.dim() not in (2, 3) or hidden.shape[:-1] != labels.shape:
        raise SubLLMError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and labels "
            f"{tuple(labels.shape)} do not match; pass hidden (B, L, d) with labels (B, L), "
            "or hidden (N, d) with labels (N,)"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise SubLLMError(
            f"chunked_cross_entropy: weight {tuple(weight.shape)} must be (vocab, "
            f"{hidden.shape[-1]}) to match the hidden size"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise SubLLMError(f"chunked_cross_entropy: bias must have shape ({weight.shape[0]},)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise SubLLMError("chunked_cross_entropy: labels must be integer token ids")
    if chunks is not None and chunk_size is not None:
        raise SubLLMError("chunked_cross_entropy: pass either chunks or chunk_size, not both")
    if impl not in ("auto", "subllm", "native"):
        raise SubLLMError(f"chunked_cross_entropy: impl must be 'auto', 'subllm' or 'native', "
                          f"got {impl!r}")
    if impl == "native" and (softcap is not None or not hasattr(F, "linear_cross_entropy")):
        raise SubLLMError("chunked_cross_entropy: impl='native' needs torch >= 2.13 and no "
                          "softcap; use impl='auto'")
    for name, value in (("chunks", chunks), ("chunk_size", chunk_size),
                        ("min_chunk_tokens", min_chunk_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value <= 0):
            raise SubLLMError(f"chunked_cross_entropy: {name} must be a positive integer, "
                              f"got {value!r}")
    if reduction not in ("mean", "sum"):
        raise SubLLMError(
            f"chunked_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}"
        )
    if softcap is not None and not softcap > 0:
        raise SubLLMError(f"chunked_cross_entropy: softcap must be positive, got {softcap!r}")

    vocab, d = weight.shape
    if shift:
        # same as transformers' ForCausalLMLoss: pad with ignore_index, then drop the first
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    labels = labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, d)
    # Only tokens with a target enter the chunks: ignored ones contribute nothing.
    valid = (labels != ignore_index).nonzero().squeeze(1)
    target = labels[valid]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= vocab):
        raise SubLLMError(
            f"chunked_cross_entropy: label ids must lie in [0, {vocab}) or equal "
            f"ignore_index={ignore_index}"
        )
    h = hidden.index_select(0, valid)  # (N_valid, d); autograd scatters the grads back

    if reduction == "sum":
        denom = torch.ones((), device=hidden.device)
    elif num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    else:
        denom = torch.tensor(float(target.numel()), device=hidden.device)

    n = target.numel()
    if chunk_size is None:
        if chunks is not None:
            chunk_size = max(1, math.ceil(n / chunks))
        else:
            chunk_size = default_loss_chunk_tokens(vocab, d, max(n, 1))
        chunk_size = max(chunk_size, min_chunk_tokens or 1)

    if impl == "native":
        return _native_cross_entropy(h, weight, bias, target, denom, chunk_size, ignore_index)

    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    grad_on = torch.is_grad_enabled()
    grad_flags = (
        grad_on and h.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _ChunkedCrossEntropy.apply(
        h, weight, bias, target, denom, chunk_size, softcap, compute_dtype, grad_flags
    )


def _native_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                          denom: Tensor, chunk_size: int, ignore_index: int) -> Tensor:
    """PyTorch's own chunked LM head + cross-entropy (torch >= 2.13), on the valid tokens,
    summed and divided by `denom` (so `num_items_in_batch` works as with ours)."""
    options = torch.nn.LinearCrossEntropyOptions(chunking_method=None,
                                                 batch_chunk_size=max(1, chunk_size))
    loss = F.linear_cross_entropy(h, weight, target, linear_bias=bias, reduction="sum",
                                  ignore_index=ignore_index, options=options)
    return loss / denom.to(loss.dtype)


# --------------------------------------------------------------------------------------
# Mini-sequence MLP
# --------------------------------------------------------------------------------------


def default_mlp_chunks(ffn_dim: int, dim: int) -> int:
    """The paper's rule (design.md §4): M = ceil(ffn / d)."""
    return max(1, math.ceil(ffn_dim / dim))


def _mlp_sizes(mlp: nn.Module) -> tuple[int, int] | None:
    """(ffn, d) of an MLP: from its attributes, its config, or its down projection."""
    for src in (mlp, getattr(mlp, "config", None)):
        ffn, d = getattr(src, "intermediate_size", None), getattr(src, "hidden_size", None)
        if isinstance(ffn, int) and isinstance(d, int):
            return ffn, d
    down = getattr(mlp, "down_proj", None)
    if isinstance(down, nn.Linear):
        return down.in_features, down.out_features
    return None


class MiniSequenceMLP(nn.Module):
    """Run an MLP on chunks of the sequence (design.md §4, the paper's "mini-sequences").

    x: (B, L, d) is split along L into M chunks (default M = ceil(ffn / d)), never into
    chunks shorter than `min_chunk_tokens` (short inputs run in one piece). When
    gradients are needed each chunk is checkpointed: only its input is kept, and its
    (chunk x ffn) intermediates are recomputed during backward one chunk at a time, so
    the full (L x ffn) intermediate never exists even while a checkpointed block is
    being recomputed.

    The wrapper shares the wrapped module's parameter, buffer and submodule tables, so it
    can replace the module in a model without changing any parameter name or state-dict
    key (`layers.0.mlp.gate_proj.weight` stays that).
    """

    def __init__(
        self,
        mlp: nn.Module,
        chunks: int | None = None,
        min_chunk_tokens: int = 1024,
        recompute: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(mlp, MiniSequenceMLP):
            mlp = mlp.wrapped
        if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int)
                                   or chunks <= 0):
            raise SubLLMError(f"MiniSequenceMLP: chunks must be a positive integer, got {chunks!r}")
        if isinstance(min_chunk_tokens, bool) or not isinstance(min_chunk_tokens, int) \
                or min_chunk_tokens <= 0:
            raise SubLLMError(
                f"MiniSequenceMLP: min_chunk_tokens must be a positive integer, "
                f"got {min_chunk_tokens!r}"
            )
        if chunks is None:
            sizes = _mlp_sizes(mlp)
            if sizes is None:
                raise SubLLMError(
                    f"MiniSequenceMLP: cannot read the intermediate size of "
                    f"{type(mlp).__name__}; pass chunks=M explicitly"
                )
            chunks = default_mlp_chunks(*sizes)
        # not registered as a child: its tables below are this module's own
        object.__setattr__(self, "wrapped", mlp)
        self._parameters = mlp._parameters
        self._buffers = mlp._buffers
        self._non_persistent_buffers_set = mlp._non_persistent_buffers_set
        self._modules = mlp._modules
        self.chunks = chunks
        self.min_chunk_tokens = min_chunk_tokens
        self.recompute = recompute

    def n_chunks(self, length: int) -> int:
        """Chunks used for a sequence of `length` tokens."""
        return max(1, min(self.chunks, length // self.min_chunk_tokens))

    def train(self, mode: bool = True) -> MiniSequenceMLP:
        self.wrapped.training = mode  # the wrapped module is not a child; keep it in step
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        m = self.n_chunks(x.shape[1])
        if m == 1:
            return self.wrapped(x)
        recompute = self.recompute and torch.is_grad_enabled()
        outs = []
        for piece in torch.tensor_split(x, m, dim=1):  # (B, ~L/m, d) each
            if recompute:
                outs.append(checkpoint(self.wrapped, piece, use_reentrant=False))
            else:
                outs.append(self.wrapped(piece))
        return torch.cat(outs, dim=1)  # (B, L, d)

    def extra_repr(self) -> str:
        return (
            f"wraps={type(self.wrapped).__name__}, chunks={self.chunks}, "
            f"min_chunk_tokens={self.min_chunk_tokens}"
        )


# --------------------------------------------------------------------------------------
# apply_mst
# --------------------------------------------------------------------------------------

# family -> causal-LM class names in transformers
HF_FAMILIES: dict[str, tuple[str, ...]] = {
    "Llama": ("LlamaForCausalLM",),
    "Qwen2": ("Qwen2ForCausalLM",),
    "Qwen3": ("Qwen3ForCausalLM",),
    "Mistral": ("MistralForCausalLM",),
    "Gemma-2": ("Gemma2ForCausalLM",),
    "Gemma-3 (text)": ("Gemma3ForCausalLM",),
    "Phi-3": ("Phi3ForCausalLM",),
}


def _supported_list() -> str:
    return "subllm.SubLLM, subllm.hf.SubLLMForCausalLM, and transformers causal LMs: " + ", ".join(
        f"{fam} ({'/'.join(names)})" for fam, names in HF_FAMILIES.items()
    )


def _hf_family(model: nn.Module) -> str | None:
    """The supported transformers family `model` belongs to, by its class (and bases):
    recognised by name and module, so this needs no transformers import."""
    classes = {(c.__module__.split(".")[0], c.__name__) for c in type(model).__mro__}
    for fam, names in HF_FAMILIES.items():
        if any(("transformers", name) in classes for name in names):
            return fam
    return None


def _wrap_mlps(blocks: nn.ModuleList, chunks: int | None, min_chunk_tokens: int) -> None:
    for block in blocks:
        block.mlp = MiniSequenceMLP(block.mlp, chunks=chunks, min_chunk_tokens=min_chunk_tokens)


# transformers 5.24 renamed the cache argument of the causal LMs' (and their decoders')
# `forward`, and the output field, `past_key_values` -> `cache`; 5.0-5.23 know only
# `past_key_values`, and 5.24 on warn (FutureWarning, removal announced for 5.40) when it is
# passed, and again when both names are. So the patched forward names its cache parameter as
# the model's own forward does, and passes the cache on only under the name it came by.
def _cache_arg(forward: Any) -> str:
    """The name `forward` (a transformers model's, decorators unwrapped) takes its KV cache
    by: "cache" (transformers >= 5.24) or "past_key_values"."""
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_field(output_cls: Any) -> str:
    """The KV-cache field of a transformers ModelOutput class: "cache" from 5.24 on."""
    return "cache" if "cache" in getattr(output_cls, "__dataclass_fields__", {}) else (
        "past_key_values")


def _mst_forward_cache(
    self: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    cache: Any = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | Tensor = 0,
    **kwargs: Any,
) -> Any:
    """The patched causal-LM forward of transformers >= 5.24 (cache argument `cache`); see
    `_mst_causal_lm_forward`."""
    if cache is not None:
        kwargs["cache"] = cache
    return _mst_causal_lm_forward(self, input_ids, attention_mask, position_ids, inputs_embeds,
                                  labels, use_cache, logits_to_keep, **kwargs)


def _mst_forward_past_key_values(
    self: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | Tensor = 0,
    **kwargs: Any,
) -> Any:
    """The patched causal-LM forward of transformers 5.0-5.23 (cache argument
    `past_key_values`); see `_mst_causal_lm_forward`."""
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    return _mst_causal_lm_forward(self, input_ids, attention_mask, position_ids, inputs_embeds,
                                  labels, use_cache, logits_to_keep, **kwargs)


def _mst_causal_lm_forward(
    self: nn.Module,
    input_ids: Tensor | None,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    inputs_embeds: Tensor | None,
    labels: Tensor | None,
    use_cache: bool | None,
    logits_to_keep: int | Tensor,
    **kwargs: Any,
) -> Any:
    """Causal-LM forward whose training loss never materialises the logits.

    Without labels (generation, evaluation) or with a `logits_to_keep` slice it is the
    model's own forward, unchanged. With labels it mirrors transformers' forward up to
    the last hidden state, then takes the loss from `chunked_cross_entropy` (same label
    shift, ignore index, `num_items_in_batch`, soft-capping as `ForCausalLMLoss`) and
    returns logits=None, as Liger-Kernel's fused loss does. A KV cache, if any, is in
    `kwargs` under the name the caller gave it (`cache` or `past_key_values`) and goes on
    under that name alone.
    """
    original = type(self).forward
    shift_labels = kwargs.get("shift_labels")
    keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if (labels is None and shift_labels is None) or not keep_all:
        return original(
            self, input_ids=input_ids, attention_mask=attention_mask,
            position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs,
        )
    target = shift_labels if shift_labels is not None else labels
    inputs = input_ids if input_ids is not None else inputs_embeds
    if inputs is not None and tuple(target.shape) != tuple(inputs.shape[:2]):
        raise SubLLMError(f"{'shift_labels' if shift_labels is not None else 'labels'} of shape "
                          f"{tuple(target.shape)} must have the inputs' shape "
                          f"{tuple(inputs.shape[:2])}: one label per input token")
    # a transformers model is running, so transformers is loaded; the model package does
    # not import it at the top, to keep `import subllm.model.subllm` light
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if use_cache is None and self.training:
        # a training step with labels has no use for a KV cache, and transformers builds
        # one by default even under checkpointing (~0.1 GiB at 8k tokens, dim 256, 4 layers)
        use_cache = False
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = outputs.last_hidden_state  # (B, L, d)
    head = self.get_output_embeddings()
    loss = chunked_cross_entropy(
        hidden,
        head.weight,
        shift_labels if shift_labels is not None else labels,
        chunks=self.mst_loss_chunks,
        min_chunk_tokens=self.mst_loss_min_chunk_tokens,
        impl=getattr(self, "mst_loss_impl", "auto"),
        ignore_index=kwargs.get("ignore_index", -100),
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        softcap=getattr(self.config, "final_logit_softcapping", None),
        bias=head.bias,
        shift=shift_labels is None,
    )
    field = _cache_field(CausalLMOutputWithPast)
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        # read by the output class's own field name: the old one logs a deprecation
        **{field: getattr(outputs, _cache_field(type(outputs)), None)},
    )
    return out if return_dict else out.to_tuple()


def enable_checkpointing(model: nn.Module) -> None:
    """Block-level activation checkpointing (non-reentrant) for `subllm.SubLLM` or a
    transformers model; active in training mode only."""
    if _is_subllm(model):
        model.gradient_checkpointing = True
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a SubLLM, a wrapper holding one as `.model`, or a supported
    transformers causal LM."""
    inner = model if _is_subllm(model) else getattr(model, "model", None)
    if isinstance(inner, nn.Module) and _is_subllm(inner):
        return inner.layers
    if _hf_family(model) is not None:
        return model.model.layers
    raise SubLLMError(f"{type(model).__name__} is not supported; supported models are "
                      f"{_supported_list()}")


def check_compile_available(device: torch.device | str = "cpu") -> None:
    """Raise SubLLMError (one line) when torch.compile cannot build kernels here: its CPU
    backend (inductor) writes C++ and needs a compiler; on a GPU it needs Triton."""
    import importlib.util
    import os
    import shutil

    if not hasattr(torch, "compile"):
        raise SubLLMError(f"--compile: torch {torch.__version__} has no torch.compile")
    if str(device).startswith("cuda"):
        if importlib.util.find_spec("triton") is None:
            raise SubLLMError("--compile: torch.compile needs Triton on a GPU (pip install "
                              "triton), or drop --compile")
        return
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        raise SubLLMError(f"--compile: torch.compile on a CPU needs a C++ compiler ({cxx} "
                          "not found); install one (e.g. apt-get install g++) or drop "
                          "--compile")


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile every decoder block with `torch.compile` for training; return the model.

    Training mode has static shapes: a SUBLLM's subsampler keeps exactly ceil(keep * L)
    tokens (top-k), so each block sees the same shapes every step and compiles once
    (per distinct shape, with `dynamic=False`). Eval mode keeps a data-dependent number of
    tokens (the rank rule) and decodes token by token; those calls stay eager, so evaluation
    and `generate` never recompile. Parameter names and state-dict keys do not change
    (each block's `forward` is replaced on the instance). Compiling twice is a no-op.
    """
    blocks = _decoder_blocks(model)
    first = next(model.parameters(), None)
    check_compile_available(first.device if first is not None else "cpu")
    compile_kwargs.setdefault("dynamic", False)
    for block in blocks:
        if getattr(block, "_subllm_compiled", None) is not None:
            continue
        eager = block.forward  # the bound method of the class
        compiled = torch.compile(eager, **compile_kwargs)

        def forward(*args: Any, _eager: Any = eager, _compiled: Any = compiled,
                    _block: nn.Module = block, **kwargs: Any) -> Any:
            # training steps run compiled; eval, no-grad and decoding calls run eager
            fn = _compiled if _block.training and torch.is_grad_enabled() else _eager
            return fn(*args, **kwargs)

        block.forward = forward
        block._subllm_compiled = compiled
    return model


def _check_chunks(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise SubLLMError(f"apply_mst: {name} must be a positive integer or None, got {value!r}")


def apply_mst(
    model: nn.Module,
    mlp_chunks: int | None = None,
    loss_chunks: int | None = None,
    checkpointing: bool = True,
    *,
    min_chunk_tokens: int | None = None,
    loss_impl: str = "auto",
    compile: bool = False,
) -> nn.Module:
    """Patch `model` in place for Mini-Sequence Transformer training and return it.

    - every decoder block's MLP runs in `mlp_chunks` mini-sequences (default
      ceil(ffn / d)), none shorter than `min_chunk_tokens` (default 1024);
    - the loss with labels comes from `chunked_cross_entropy` in `loss_chunks` chunks
      (default: `default_loss_chunk_tokens` tokens each), none shorter than
      `min_chunk_tokens` when given, and the logits are not returned (None); without
      labels the model's outputs, and `generate`, are unchanged; `loss_impl` is
      `chunked_cross_entropy`'s `impl` (Hugging Face models; our SubLLM uses "auto");
    - `compile=True` compiles every decoder block with `torch.compile` for training
      (see `compile_blocks`; eval mode stays eager);
    - `checkpointing=True` turns on block-level activation checkpointing (non-reentrant),
      which MsT's memory saving relies on.

    Supported: `subllm.SubLLM`; `subllm.hf.SubLLMForCausalLM` (patched through the
    `SubLLM` it holds as `.model`, and returned itself: `labels` give the loss with
    `logits=None`, `generate()` is unchanged), also a copy loaded from an exported
    directory with `trust_remote_code=True` (recognised by class name and attributes, as
    its classes are not subllm's); and transformers causal LMs of the Llama, Qwen2, Qwen3,
    Mistral, Gemma-2, Gemma-3 (text) and Phi-3 families. For LoRA, apply it before
    `peft.get_peft_model`. Parameter names and state-dict keys do not change. Applying it
    twice re-applies the new settings.
    """
    _check_chunks("mlp_chunks", mlp_chunks)
    _check_chunks("loss_chunks", loss_chunks)
    _check_chunks("min_chunk_tokens", min_chunk_tokens)
    if loss_impl not in ("auto", "subllm", "native"):
        raise SubLLMError(f"apply_mst: loss_impl must be 'auto', 'subllm' or 'native', got "
                          f"{loss_impl!r}")
    mlp_floor = 1024 if min_chunk_tokens is None else min_chunk_tokens
    if not isinstance(model, nn.Module):
        raise SubLLMError(f"apply_mst: expected a model (nn.Module), got {type(model).__name__}")

    # our SubLLM itself, or a wrapper holding it as `.model` (SubLLMForCausalLM)
    inner = model if _is_subllm(model) else getattr(model, "model", None)
    if isinstance(inner, nn.Module) and _is_subllm(inner):
        # the model calls chunked_cross_entropy(..., chunks=model.loss_chunks) itself
        inner.loss_chunks = loss_chunks or 0  # 0: default_loss_chunk_tokens' rule
        inner.gradient_checkpointing = bool(checkpointing)
        _wrap_mlps(inner.layers, mlp_chunks, mlp_floor)
        if compile:
            compile_blocks(model)
        return model

    family = _hf_family(model)
    if family is None:
        raise SubLLMError(
            f"apply_mst: {type(model).__name__} is not supported; supported models are "
            f"{_supported_list()}"
        )
    model.mst_loss_chunks = loss_chunks
    model.mst_loss_min_chunk_tokens = min_chunk_tokens
    model.mst_loss_impl = loss_impl
    _wrap_mlps(model.model.layers, mlp_chunks, mlp_floor)
    # instance attribute: `type(model).forward` stays the untouched original it delegates to
    # named like the model's own cache argument (see _cache_arg): transformers' generate()
    # passes the cache by that name, and positional callers find it in the same place
    patched = (_mst_forward_cache if _cache_arg(type(model).forward) == "cache"
               else _mst_forward_past_key_values)
    model.forward = types.MethodType(patched, model)
    if checkpointing:
        enable_checkpointing(model)
    if compile:
        compile_blocks(model)
    return model


_SUBLLM_ATTRIBUTES = ("config", "layers", "lm_head", "loss_chunks", "gradient_checkpointing",
                      "set_step")


def _is_subllm(model: Any) -> bool:
    """A `subllm.model.SubLLM`, or the same class from another copy of its code.

    `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` imports the
    exported directory's copy of model.py, whose `SubLLM` is a different class object:
    `isinstance` fails there, so that copy is recognised by its class name and the
    attributes used here.
    """
    return (
        isinstance(model, nn.Module)
        and any(cls.__name__ == "SubLLM" for cls in type(model).__mro__)
        and all(hasattr(model, name) for name in _SUBLLM_ATTRIBUTES)
    )
