"""The planner: parameter, FLOP and memory counts of a model shape, in one place.

`subllm estimate` (peak training memory and the longest sequence that fits), `subllm info`
(parameters, compute fraction, FLOPs per token), and the MFU and `--batch-sizes max` (the
largest batch that fits) of `subllm bench train` read their figures here. Light on
purpose: no torch at import time.

The planner walks a training step (forward with labels, backward, optimizer step) through
the points where the peak can be — the end of the forward pass and the loss, the loss's
backward, each block's backward (its MLP, its second norm, its attention), the embedding's
backward, the optimizer step — and adds up the tensors alive at each; the peak is the
largest sum, reported with its breakdown. It is analytical and needs no model in memory,
so a search over the sequence length is instant. `subllm bench estimate` compares it with
peaks measured in real training steps (docs/benchmarks.md).

What it assumes. Every per-token figure was read off the tensors the autograd graph of our
blocks and of transformers' Llama keeps (torch 2.13, transformers 5), and the planner's
sum matches the CPU allocator's live bytes in real steps to within 4 % (tests/test_estimate.py):

- **Attention** is `scaled_dot_product_attention` with a fused kernel: flash or
  memory-efficient on a GPU (bf16/fp16; fp32 with grouped KV heads may fall back to the
  math kernel there, which is not modelled); on a CPU torch >= 2.3 runs its own flash
  kernel for every case we train, grouped KV heads and masks included. It keeps q, k, v,
  its output and an fp32 logsumexp per head and query: O(L) per block, nothing L x L.
- **Per block** (d = hidden size, f = ffn size, per token): fp32 keeps 6 d-vectors (block
  input, each RMSNorm's normalised value and output, the residual after attention), q, k,
  v, the attention output, and SwiGLU's 4 f-vectors, all 4 bytes. Mixed precision keeps
  the residual stream and the normalised values in fp32, but each projection keeps its
  own 2-byte cast of its norm's output (3 before q/k/v, 2 before gate/up) and q/k/v,
  attention and SwiGLU are 2 bytes. Pure 2-byte precision keeps each norm's fp32 copy of
  its input and everything else in 2 bytes. Backward adds, at the SwiGLU product, the
  product's gradient and the two it produces, and at each RMSNorm five fp32 temporaries.
- **SUBLLM**: a block inside a segment holds ceil(keep * n) tokens of the n entering the
  segment (nested segments multiply); each segment also keeps its full-length input and
  the two kept-length operands of its bypass. Only the activations scale.
- **Activation checkpointing** (non-reentrant, per block) keeps each block's input; in
  backward one block at a time is recomputed, so one block's activations exist then.
- **MsT** (design.md §4, `subllm.mst.apply_mst` defaults) = checkpointing + the MLP in
  ceil(ffn / d) mini-sequences never shorter than 1024 tokens (rows under 2048 tokens
  are not split) + the LM head and cross-entropy in chunks of
  `default_loss_chunk_tokens(vocab, d, rows)` rows (d / 2 rows at a large vocabulary, at
  most 512); one fp32 (rows x vocab) buffer per chunk; the fp32 gradients for the hidden states
  and the head weight are formed in the forward pass, scaled in place and held until
  backward.
- **Standard loss**: the fp32 log-softmax of all logits is kept; its backward holds three
  (rows x vocab) fp32 tensors at once. Rows are batch * (length - 1) for our models (the
  logits are shifted first) and batch * length for transformers'. A transformers model in
  training mode also builds a KV cache during the forward pass unless checkpointing is on.
- **Precision** (`dtype`): `fp32`; `bf16` / `fp16` with `precision="mixed"` (default) =
  autocast over fp32 weights, as `subllm train --dtype bf16` and transformers' Trainer
  with `bf16=True` run: fp32 weights, gradients and optimizer state, plus the 2-byte
  copies autocast makes of every linear weight (all alive at the end of the forward
  pass); `precision="pure"` = the model cast to the dtype (`model.to(torch.bfloat16)`):
  weights, gradients, optimizer state and activations in 2 bytes.
- **Optimizer**: AdamW / Adam keep two state tensors per parameter, SGD (momentum) one.
  Gradients exist from the backward pass to the optimizer step
  (`zero_grad(set_to_none=True)`). On a CPU torch's AdamW goes parameter by parameter
  with two temporaries of the parameter; on a GPU we assume the fused AdamW
  (`fused=True`, as `subllm train`), which has none.
- **Runtime overhead** (not tensors): on a CPU the resident memory a training step adds
  besides its tensors (see CPU_RUNTIME_OVERHEAD); on a GPU cuBLAS's workspaces. The CUDA
  context is outside `torch.cuda.max_memory_allocated` and outside the estimate; the fit
  search keeps `reserve` bytes (default 1 GiB) for it and for the allocator's
  fragmentation.
- **CPU resident memory** is predicted for an allocator that returns freed memory (e.g.
  `MALLOC_MMAP_THRESHOLD_=131072`); glibc's default malloc keeps freed tensors below 32
  MiB in its heap, and the resident peak can then be 1.3-2.5x the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subllm.errors import SubLLMError
from subllm.model.config import (
    PRESETS,
    ModelConfig,
    Segment,
    default_loss_chunk_tokens,
    parse_structure,
)

GiB = 2**30
MiB = 2**20
DTYPES = ("fp32", "bf16", "fp16")
PRECISIONS = ("mixed", "pure")
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 1}  # state tensors per parameter
DEVICES = ("cuda", "cpu")
# Resident memory a training step adds on a CPU besides its tensors: library code paged in
# on first use, thread stacks, the Python objects of the model and its autograd graph.
# Measured on this project's machine (torch 2.13) as the resident peak of `llama-tiny` at
# 64 tokens, whose tensors the planner counts exactly, minus those tensors: 26-28 MiB in
# fp32 (MsT included), 38 MiB under bf16 autocast, whose matmuls run in oneDNN kernels
# compiled and cached per problem shape (1.75 MiB per linear layer and token count in a
# micro-benchmark). Each further token count a SUBLLM nesting level brings adds new
# shapes: 11 MiB per level (subllm-tiny: 57 MiB against llama-tiny's 31-38; half of the
# difference goes with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0).
CPU_RUNTIME_OVERHEAD = {"fp32": 28 * MiB, "mixed": 38 * MiB, "pure": 38 * MiB}
CPU_2BYTE_LEVEL_OVERHEAD = 11 * MiB
# cuBLAS + cuBLASLt workspaces allocated through torch's caching allocator (32 MiB each on
# Hopper with torch's defaults); not validated on a GPU here.
CUDA_RUNTIME_OVERHEAD = 64 * MiB
CUDA_DEFAULT_RESERVE = 1 * GiB  # CUDA context + allocator fragmentation, for the fit search
MLP_MIN_CHUNK = 1024  # subllm.mst.apply_mst defaults
GRANULE = 256
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

COMPONENTS = ("weights", "gradients", "optimizer_state", "activations", "attention",
              "logits_loss", "weight_copies", "transient", "runtime_overhead")
COMPONENT_HELP = {
    "weights": "model parameters",
    "gradients": "parameter gradients accumulated so far",
    "optimizer_state": "AdamW moments / SGD momentum",
    "activations": "tensors saved for backward: block inputs, norms, MLP, residuals, "
                   "SUBLLM segments",
    "attention": "tensors SDPA keeps: q, k, v, output, logsumexp (O(L), fused kernel)",
    "logits_loss": "logits, log-probabilities and their gradients (or MsT's chunk "
                   "buffers)",
    "weight_copies": "2-byte copies of the linear weights made by autocast",
    "transient": "temporaries of the phase (backward gradients of a block's MLP, "
                 "optimizer temporaries, ...)",
    "runtime_overhead": "cuBLAS workspaces",
}
CPU_OVERHEAD_HELP = "code, oneDNN kernels and thread stacks a training step pages in"


# --------------------------------------------------------------------------------------
# the model's shape
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model (ours or a transformers Llama-family one)."""

    name: str
    source: str  # "subllm" or "transformers"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    tie_embeddings: bool
    structure: str  # "T" * n_layers for a LLaMA
    keep: tuple[float, ...] = ()  # keep ratio per nesting depth
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm weight of head_dim on q and on k per block
    sliding_window: int | None = None
    max_seq_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_segments(self) -> int:
        return self.structure.count("(")

    def block_params(self) -> int:
        d, q, kv, f = self.dim, self.q_dim, self.kv_dim, self.ffn_dim
        n = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # projections, MLP, two norms
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += d
        if self.mlp_bias:
            n += 2 * f + d
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def block_linear_params(self) -> int:
        """Weights of one block's matmuls (q, k, v, o projections and the SwiGLU MLP)."""
        d, q, kv, f = self.dim, self.q_dim, self.kv_dim, self.ffn_dim
        return d * q + 2 * d * kv + q * d + 3 * d * f

    def linear_params(self) -> int:
        """Parameters autocast casts: every linear weight (the LM head included)."""
        return self.n_layers * self.block_linear_params() + self.vocab_size * self.dim

    def param_count(self) -> int:
        n = self.vocab_size * self.dim  # embedding
        n += self.n_layers * self.block_params()
        n += 2 * self.dim * self.n_segments  # subsampler scorers (d -> 1) and bypass scales
        n += self.dim  # final norm
        if not self.tie_embeddings:
            n += self.vocab_size * self.dim
        return n

    def largest_param(self) -> int:
        return max(self.vocab_size * self.dim, self.dim * self.ffn_dim,
                   self.dim * self.q_dim)

    def level_lengths(self, length: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Row length seen by each block, and (entering, kept) row lengths per segment in
        the order of their `(`: ceil(keep * n) as in training-mode top-k."""

        blocks: dict[int, int] = {}
        segs: dict[int, tuple[int, int]] = {}

        def walk(items: list, n: int) -> None:
            for item in items:
                if isinstance(item, Segment):
                    keep = self.keep[item.depth - 1]
                    k = math.ceil(round(n * keep, 6))
                    segs[item.index] = (n, k)
                    walk(item.children, k)
                else:
                    blocks[item] = n

        walk(parse_structure(self.structure), length)
        return ([blocks[i] for i in range(self.n_layers)],
                [segs[i] for i in range(len(segs))])

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["keep"] = list(self.keep)
        d["parameters"] = self.param_count()
        return d


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """A ModelShape from a `subllm.ModelConfig`."""

    if not isinstance(config, ModelConfig):
        raise SubLLMError(f"expected a subllm ModelConfig, got {type(config).__name__}")
    return ModelShape(
        name=name or ("subllm" if config.is_subllm else "llama"), source="subllm",
        vocab_size=config.vocab_size, dim=config.dim, n_layers=config.n_layers,
        n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim, ffn_dim=config.ffn_dim,
        tie_embeddings=config.tie_embeddings, structure=config.structure,
        keep=tuple(config.keep_per_depth) if config.is_subllm else (),
        qkv_bias=config.qkv_bias, o_bias=config.o_bias, qk_norm=config.qk_norm,
        sliding_window=config.sliding_window, max_seq_len=config.max_seq_len,
    )


def _hf_int(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise SubLLMError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    return v


def shape_from_hf_config(cfg: Any, name: str = "") -> ModelShape:
    """A ModelShape from a transformers config (a `config.json` dict or a PretrainedConfig)
    of the Llama family: LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config fields."""
    if not isinstance(cfg, dict):
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        else:
            raise SubLLMError(f"expected a transformers config or a dict, got "
                              f"{type(cfg).__name__}")
    where = name or "Hugging Face config"
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    model_type = cfg.get("model_type", "llama")
    if model_type not in HF_MODEL_TYPES:
        raise SubLLMError(
            f"{where}: model_type {model_type!r} is not supported; the planner knows the "
            f"Llama-family layouts {', '.join(HF_MODEL_TYPES)}"
        )
    d = _hf_int(cfg, "hidden_size", where)
    heads = _hf_int(cfg, "num_attention_heads", where)
    kv = _hf_int(cfg, "num_key_value_heads", where, heads)
    head_dim = cfg.get("head_dim") or d // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise SubLLMError(f"{where}: 'head_dim' must be a positive integer, got {head_dim!r}")
    if heads % kv:
        raise SubLLMError(f"{where}: num_attention_heads={heads} is not a multiple of "
                          f"num_key_value_heads={kv}")
    layers = _hf_int(cfg, "num_hidden_layers", where)
    sliding = cfg.get("sliding_window") if (model_type == "mistral" or
                                            cfg.get("use_sliding_window")) else None
    return ModelShape(
        name=name or model_type, source="transformers",
        vocab_size=_hf_int(cfg, "vocab_size", where), dim=d, n_layers=layers,
        n_heads=heads, n_kv_heads=kv, head_dim=head_dim,
        ffn_dim=_hf_int(cfg, "intermediate_size", where),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        structure="T" * layers,
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=sliding if isinstance(sliding, int) and sliding > 0 else None,
        max_seq_len=cfg.get("max_position_embeddings"),
        extra={"model_type": model_type},
    )


def load_hf_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise SubLLMError(f"Hugging Face config {str(p)!r} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SubLLMError(f"cannot parse {str(p)!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise SubLLMError(f"{str(p)!r} is not a JSON object of config fields")
    return cfg


def resolve_shape(model: Any, name: str = "") -> ModelShape:
    """A ModelShape from a ModelShape, a subllm ModelConfig, a transformers config (object
    or dict), or a string: a preset name, a subllm YAML/JSON config, a transformers
    config.json (detected by its `hidden_size` field)."""

    if isinstance(model, ModelShape):
        return model
    if isinstance(model, ModelConfig):
        return shape_from_config(model, name)
    if isinstance(model, dict) or hasattr(model, "to_dict"):
        return shape_from_hf_config(model, name)
    if isinstance(model, str):
        if model in PRESETS:
            return shape_from_config(ModelConfig.preset(model), model)
        p = Path(model)
        if p.suffix == ".json" and p.is_file():
            cfg = load_hf_config(p)
            if "hidden_size" in cfg:
                return shape_from_hf_config(cfg, name or p.stem)
        return shape_from_config(ModelConfig.load(model), name or model)
    raise SubLLMError(f"cannot plan for a {type(model).__name__}")


# --------------------------------------------------------------------------------------
# byte sizes of the tensors a step keeps
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of the tensor kinds a step keeps, for one precision setting."""

    weight: int  # parameters, gradients, optimizer state
    act: int  # outputs of linear layers and attention
    resid: int  # residual stream (block inputs and outputs)
    mode: str  # "fp32" | "mixed" | "pure"


def _bytes(dtype: str, precision: str) -> _Bytes:
    if dtype == "fp32":
        return _Bytes(4, 4, 4, "fp32")
    if precision == "mixed":
        return _Bytes(4, 2, 4, "mixed")
    return _Bytes(2, 2, 2, "pure")


@dataclass(frozen=True)
class _BlockBytes:
    """Bytes per token one standard block keeps for backward, in three parts."""

    attn_half: int  # block input, first norm (normalised value, output or its casts)
    mlp_half: int  # residual after attention, second norm, SwiGLU's four tensors
    attention: int  # what SDPA keeps: q, k, v, output, fp32 logsumexp
    mlp_intermediate: int  # the SwiGLU part of mlp_half (4 x ffn)
    mlp_half_chunked: int  # mlp_half under MsT's chunked MLP (no SwiGLU tensors kept)

    @property
    def total(self) -> int:
        return self.attn_half + self.mlp_half + self.attention


def _block_saved(s: ModelShape, b: _Bytes) -> _BlockBytes:
    """What one standard block keeps for backward, per token it sees."""
    d, f, q, kv = s.dim, s.ffn_dim, s.q_dim, s.kv_dim
    attention = b.act * (2 * q + 2 * kv) + 4 * s.n_heads
    swiglu = 4 * f * b.act  # gate, silu(gate), up, their product
    if b.mode == "fp32":
        # input, normalised, output | residual, normalised, output (+ an fp32 rsqrt each)
        attn_half, mlp_half, chunked = 3 * 4 * d, 3 * 4 * d + swiglu, 3 * 4 * d
    elif b.mode == "mixed":
        # fp32 input and normalised value + one 2-byte cast of the norm output per
        # projection (q, k, v) | fp32 residual and normalised value + casts for gate, up.
        # Chunked, the MLP keeps the fp32 norm output instead (its chunks cast it).
        attn_half, mlp_half, chunked = 8 * d + 3 * 2 * d, 8 * d + 2 * 2 * d + swiglu, 12 * d
    else:
        # each norm keeps an fp32 copy of its input and 2-byte normalised value and output
        attn_half, mlp_half, chunked = 8 * d, 8 * d + swiglu, 8 * d
    return _BlockBytes(attn_half + 4, mlp_half + 4, attention, swiglu, chunked + 4)


def _final_saved(s: ModelShape, b: _Bytes, chunked_loss: bool) -> int:
    """Per token: the final norm (its input, normalised value, and the output the LM head
    keeps unless the loss is chunked)."""
    d = s.dim
    if b.mode == "fp32":
        return 4 * d + 4 * d + (0 if chunked_loss else 4 * d)
    if b.mode == "mixed":
        return 4 * d + 4 * d + (0 if chunked_loss else 2 * d)
    return 4 * d + 2 * d + (0 if chunked_loss else 2 * d)


def _segment_saved(s: ModelShape, b: _Bytes, n_in: int, n_kept: int) -> int:
    """Bytes (per row) a SUBLLM segment keeps outside its blocks: its full-length input
    (kept by the scorer and the gathers; plus the scorer's 2-byte cast under autocast),
    the two kept-length operands of the bypass product, and small per-token indices,
    scores and weights."""
    d = s.dim
    x_out = b.resid * d + (2 * d if b.mode == "mixed" else 0)
    return n_in * (x_out + 24) + n_kept * (2 * b.resid * d + 12)


def _rope_bytes(s: ModelShape, b: _Bytes) -> int:
    """Per token and nesting level: the cos and sin tables (residual dtype)."""
    return 2 * s.head_dim * b.resid


def _segment_first_blocks(s: ModelShape) -> list[int]:
    """Index of the first block inside each segment, in the order of their `(`."""

    out: dict[int, int] = {}

    def walk(items: list) -> None:
        for item in items:
            if isinstance(item, Segment):
                out[item.index] = item.blocks()[0]
                walk(item.children)

    walk(parse_structure(s.structure))
    return [out[j] for j in range(len(out))]


def _mlp_chunks(s: ModelShape, row_len: int) -> int:
    """subllm.mst.MiniSequenceMLP.n_chunks with the default chunk count and floor."""
    return max(1, min(max(1, math.ceil(s.ffn_dim / s.dim)), row_len // MLP_MIN_CHUNK))


# --------------------------------------------------------------------------------------
# the phases of a step
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Inputs of one estimate (see estimate_memory)."""

    shape: ModelShape
    seq_len: int
    batch_size: int = 1
    dtype: str = "fp32"
    precision: str = "mixed"
    checkpointing: bool = False
    mst: bool = False
    optimizer: str = "adamw"
    device: str = "cuda"
    fsdp: int = 1  # ranks the weights, gradients and optimizer state are sharded over


def _phases(p: Plan) -> dict[str, dict[str, int]]:
    """Bytes alive, by component, at every point of a step where the peak can be.

    fsdp N > 1 (`subllm train --distributed fsdp` on N ranks, per rank): the fp32 weights,
    the accumulated gradients and the optimizer state are 1/N each; besides them a rank
    holds, all-gathered, the root's parameters (embedding, head, norm, routers) and two
    blocks' (the one running and the one prefetched), in 2 bytes under mixed precision
    (FSDP2's MixedPrecisionPolicy: no autocast copies then), and the running block's
    unsharded gradients until they are reduce-scattered."""
    s, B, L = p.shape, p.batch_size, p.seq_len
    b = _bytes(p.dtype, p.precision)
    ckpt = p.checkpointing or p.mst
    N = p.fsdp

    def shard(n: int) -> int:
        return -(-n // N)

    n_params = s.param_count()
    weights = n_params * b.weight
    if N > 1:
        gathered = 2 if b.mode == "mixed" else b.weight
        root = n_params - s.n_layers * s.block_params()
        weights = shard(weights) + (root + 2 * s.block_params()) * gathered
    grads_full = shard(n_params * b.weight)
    opt_state = shard(OPTIMIZERS[p.optimizer] * n_params * b.weight)
    rows, segs = s.level_lengths(p.seq_len)
    if p.device == "cpu":
        overhead = CPU_RUNTIME_OVERHEAD[b.mode]
        if b.mode != "fp32":  # oneDNN kernels for each further token count
            overhead += CPU_2BYTE_LEVEL_OVERHEAD * (len(set(rows)) - 1)
    else:
        overhead = CUDA_RUNTIME_OVERHEAD
    copies = b.mode == "mixed" and N == 1  # FSDP gathers bf16 weights: nothing to cast
    lin_copies = 2 * s.linear_params() if copies else 0
    block_w_copy = 2 * (s.linear_params() - s.vocab_size * s.dim) // max(s.n_layers, 1) \
        if copies else 0
    head_w_copy = 2 * s.vocab_size * s.dim if copies else 0
    block_grad = s.block_params() * b.weight
    head_grad = (s.vocab_size * s.dim + s.dim) * b.weight  # LM head (or tied) + final norm

    bb = _block_saved(s, b)
    T = B * L
    d, f, a, r = s.dim, s.ffn_dim, b.act, b.resid

    # what each block keeps between its forward and its backward
    kept_act = [B * n * (d * r if ckpt else bb.attn_half + bb.mlp_half) for n in rows]
    kept_attn = [0 if ckpt else B * n * bb.attention for n in rows]
    mask = B * L * L if s.sliding_window and L > s.sliding_window else 0  # the bool mask
    seg_bytes = [B * _segment_saved(s, b, n_in, n_k) for n_in, n_k in segs]
    rope = B * (L + sum(n_k for _, n_k in segs)) * _rope_bytes(s, b) + 8 * T  # + token ids
    final = T * _final_saved(s, b, p.mst)
    all_act = sum(kept_act) + sum(seg_bytes) + rope + final
    all_attn = sum(kept_attn) + mask

    phases: dict[str, dict[str, int]] = {}

    def add(name: str, **parts: int) -> None:
        row = {c: 0 for c in COMPONENTS}
        row.update(weights=weights, optimizer_state=opt_state, runtime_overhead=overhead)
        for k, v in parts.items():
            row[k] += int(v)
        phases[name] = row

    # ---- the loss ------------------------------------------------------------------
    V = s.vocab_size
    if p.mst:
        n = B * (L - 1)  # targets (labels shifted, last position ignored)
        c = default_loss_chunk_tokens(V, d, n)
        h_bytes = 4 if b.mode != "pure" else 2  # the final norm's output dtype
        w_copy = 2 * V * d if copies else 0  # the head weight in the compute dtype
        # the final norm's output and its copy of the rows with targets, fp32 gradient
        # buffers for them and for the head weight
        base = T * d * h_bytes + n * d * h_bytes + w_copy
        # per chunk: one fp32 (c x V) buffer (logits -> exp -> gradient, in place), or the
        # 2-byte products before a cast beside it
        chunk = 4 * c * V if b.mode == "fp32" else (4 + 2) * c * V + 2 * V * d
        loop = base + 4 * n * d + 4 * V * d + chunk
        # the buffers are scaled in place; in pure bf16 cast to the inputs' dtype beside them
        end = base + 4 * n * d + 4 * V * d + (2 * n * d + 2 * V * d if b.mode == "pure" else 0)
        add("loss forward (MsT chunks)", activations=all_act, attention=all_attn,
            logits_loss=max(loop, end), weight_copies=lin_copies - head_w_copy)
        held = n * d * h_bytes + V * d * b.weight  # the scaled gradients, until backward
        add("loss backward (MsT)", activations=all_act, attention=all_attn,
            logits_loss=held)  # scaled by grad_out in place
    else:
        shifted = s.source == "subllm"
        lrows = B * (L - 1) if shifted else T
        fwd = T * V * a  # logits
        if shifted and B > 1:
            fwd += lrows * V * a  # logits[:, :-1].flatten(0, 1) copies
        if a != 4:
            fwd += lrows * V * 4  # .float()
        fwd += lrows * V * 4  # log-probabilities
        # alive until the model returns: the final norm's output where nothing keeps it
        # (under autocast only its cast is kept), and transformers' KV cache (models in
        # training mode build one unless use_cache=False or checkpointing is on; keys
        # after RoPE and values, promoted to fp32 under autocast)
        fwd_other = T * d * 4 if b.mode == "mixed" else 0
        if s.source == "transformers" and not ckpt:
            fwd_other += s.n_layers * T * s.kv_dim * 2 * (4 if b.mode != "pure" else 2)
        add("loss forward", activations=all_act + fwd_other, attention=all_attn,
            logits_loss=fwd, weight_copies=lin_copies)
        add("loss backward", activations=all_act, attention=all_attn,
            logits_loss=3 * lrows * V * 4,
            weight_copies=head_w_copy if ckpt else lin_copies)

    # ---- the blocks, last to first -----------------------------------------------------
    # a segment's own tensors are freed once backward has gone through its first block
    first_block = _segment_first_blocks(s)
    grads = shard(head_grad)
    best: dict[str, int] | None = None
    below_act, below_attn = sum(kept_act), sum(kept_attn)
    for i in range(s.n_layers - 1, -1, -1):
        n = rows[i]
        t = B * n
        below_act -= kept_act[i]
        below_attn -= kept_attn[i]
        live_segs = sum(sb for j, sb in enumerate(seg_bytes) if first_block[j] <= i)
        other = below_act + live_segs + rope + mask
        # standard: autocast's copies of this block's and earlier blocks' weights are still
        # held by their nodes; checkpointing recomputes (and re-casts) this block only
        copies = block_w_copy * (1 if ckpt else i + 1)
        chunks = _mlp_chunks(s, n) if p.mst else 1
        attn_half = t * bb.attn_half
        attention = below_attn + t * bb.attention
        if chunks > 1:
            # one chunk recomputed: its gate, silu and up outputs and, at the product's
            # backward, the three gradients there; the input gradients of the chunks done
            # so far wait in the split's buffer
            tc = B * math.ceil(n / chunks)
            mlp_half = t * bb.mlp_half_chunked
            mlp_tmp = 6 * tc * f * a + t * d * r * (chunks - 1) // chunks
            if a != r:  # the 2-byte cast of the MLP's output gradient, sliced per chunk
                mlp_tmp += t * d * a
            mlp_w_grads = 3 * d * f * b.weight  # accumulated over the chunks done (unsharded)
        else:
            # at the SwiGLU product's backward: its incoming gradient and the two it
            # produces exist, the product itself is freed
            mlp_half = t * bb.mlp_half
            mlp_tmp = 2 * t * f * a
            mlp_w_grads = d * f * b.weight  # the down projection's
        w_grad_tmp = 2 * d * f if b.mode != "fp32" else 0  # a 2-byte weight gradient
        moments = [
            # MLP backward: the incoming residual gradient + the MLP's temporaries
            dict(activations=other + attn_half + mlp_half, attention=attention,
                 transient=t * d * r + mlp_tmp + w_grad_tmp, gradients=mlp_w_grads),
            # the second norm's backward (after the MLP's): its fp32 input (or fp32 copy of
            # it) is still kept; the residual gradient, the MLP branch's, and five fp32
            # temporaries of RMSNorm's backward (through the cast, x * rsqrt, mean, pow)
            dict(activations=other + attn_half + t * (4 * d + 4), attention=attention,
                 transient=t * d * r + t * d * a + 5 * t * d * 4),
            # attention backward: the MLP half is freed; gradients of the attention output,
            # q, k and v exist besides the residual gradient
            dict(activations=other + attn_half, attention=attention,
                 transient=t * d * r + t * (2 * s.q_dim + 2 * s.kv_dim) * a),
        ]
        for moment in moments:
            row = {c: 0 for c in COMPONENTS}
            row.update(weights=weights, optimizer_state=opt_state, runtime_overhead=overhead,
                       gradients=grads, weight_copies=copies)
            for k, v in moment.items():
                row[k] += int(v)
            if best is None or sum(row.values()) > sum(best.values()):
                best = row
        grads += shard(block_grad)
    assert best is not None
    phases["backward (blocks)"] = best

    # ---- embedding, optimizer ----------------------------------------------------------
    emb_tmp = V * d * b.weight if s.tie_embeddings else 0  # dense grad before accumulation
    add("backward (embedding)", gradients=grads_full, transient=emb_tmp + T * d * r)
    opt_tmp = 0
    if p.device == "cpu" and p.optimizer in ("adamw", "adam"):
        opt_tmp = 2 * shard(s.largest_param() * b.weight)  # sqrt and division, one param
    add("optimizer step", gradients=grads_full, transient=opt_tmp)
    return phases


def estimate_memory(
    model: Any,
    seq_len: int,
    batch_size: int = 1,
    dtype: str = "fp32",
    checkpointing: bool = False,
    mst: bool = False,
    optimizer: str = "adamw",
    device: str = "cuda",
    precision: str = "mixed",
    name: str = "",
    fsdp: int = 1,
) -> dict[str, Any]:
    """Predicted peak memory of one training step (forward with labels + backward +
    optimizer step), in bytes.

    model: a preset name, a subllm ModelConfig or config file, a transformers config
    (PretrainedConfig, dict, or config.json path) of the Llama family, or a ModelShape.
    dtype: fp32, or bf16/fp16 with `precision` "mixed" (autocast over fp32 weights) or
    "pure" (the model cast to the dtype). mst implies checkpointing. fsdp N: per rank
    of N ranks sharding the model with FSDP2 (see _phases).

    Returns {"peak_bytes", "phase" (where the peak is), "breakdown" (bytes by component at
    the peak), "phases" (every phase's components), "model", "settings"}.
    """
    shape = resolve_shape(model, name)
    _check_settings(seq_len, batch_size, dtype, precision, optimizer, device)
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1:
        raise SubLLMError(f"--fsdp must be a positive number of ranks, got {fsdp!r}")
    if fsdp > 1 and dtype != "fp32" and precision == "pure":
        raise SubLLMError("--fsdp goes with --precision mixed (FSDP2 keeps fp32 master "
                          "weights and gathers 2-byte copies)")
    plan = Plan(shape, seq_len, batch_size, dtype, precision if dtype != "fp32" else "mixed",
                checkpointing or mst, mst, optimizer, device, fsdp)
    phases = _phases(plan)
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    breakdown = phases[peak_phase]
    return {
        "peak_bytes": sum(breakdown.values()),
        "phase": peak_phase,
        "breakdown": dict(breakdown),
        "phases": {k: {"total": sum(v.values()), **v} for k, v in phases.items()},
        "model": shape.describe(),
        "settings": {"seq_len": seq_len, "batch_size": batch_size, "dtype": dtype,
                     "precision": plan.precision if dtype != "fp32" else "fp32",
                     "checkpointing": plan.checkpointing, "mst": mst,
                     "optimizer": optimizer, "device": device, "fsdp": fsdp},
    }


def _check_settings(seq_len: int, batch_size: int, dtype: str, precision: str,
                    optimizer: str, device: str) -> None:
    for flag, v in (("seq-len", seq_len), ("batch-size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SubLLMError(f"--{flag} must be a positive integer, got {v!r}")
    if seq_len < 2:
        raise SubLLMError(f"--seq-len must be at least 2 (next-token targets), got {seq_len}")
    if dtype not in DTYPES:
        raise SubLLMError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise SubLLMError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise SubLLMError(f"--optimizer {optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
    if device not in DEVICES:
        raise SubLLMError(f"--device {device!r}: choose from {', '.join(DEVICES)}")


def longest_fit(model: Any, budget_bytes: int, batch_size: int = 1, granule: int = GRANULE,
                max_len: int = 1 << 24, **settings: Any) -> dict[str, Any]:
    """Longest sequence (a multiple of `granule`) whose estimated peak is <= budget_bytes:
    doubling from `granule`, then bisection. The answer L satisfies estimate(L) <= budget
    < estimate(L + granule) unless L == max_len (everything up to max_len fits) or L == 0
    (not even `granule` tokens fit)."""
    shape = resolve_shape(model)
    if granule <= 0 or max_len < granule:
        raise SubLLMError("longest_fit: need 0 < granule <= max_len")

    def fits(n: int) -> bool:
        return estimate_memory(shape, n, batch_size, **settings)["peak_bytes"] <= budget_bytes

    n, capped, probes = _largest_fitting(fits, granule, max_len // granule * granule)
    return {"seq_len": n, "capped": capped, "probes": probes, "granule": granule}


def _largest_fitting(fits: Callable[[int], bool], unit: int, cap: int
                     ) -> tuple[int, bool, int]:
    """(n, capped, probes): the largest multiple n of `unit`, at most `cap`, with fits(n)
    (true up to some n, false after): doubling from `unit`, then bisection. n = 0 when
    not even `unit` fits; capped when everything up to `cap` fits."""
    probes = 0
    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not
    n = unit
    while hi is None:
        n = min(n, cap)
        probes += 1
        if not fits(n):
            hi = n
        elif n >= cap:
            return n, True, probes
        else:
            lo, n = n, n * 2
    while hi - lo > unit:
        mid = (lo + hi) // 2 // unit * unit
        probes += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False, probes


def resident_bytes(estimate: dict[str, Any]) -> int:
    """What a model holds between its training steps, from its estimate_memory result: its
    weights and optimizer state (the gradients are dropped after each step, the autocast
    copies and activations when the step ends)."""
    at_peak = estimate["breakdown"]
    return at_peak["weights"] + at_peak["optimizer_state"]


def largest_batch(models: list[Any], seq_len: int, budget_bytes: int, max_batch: int = 1 << 16,
                  **settings: Any) -> dict[str, Any]:
    """Largest batch size (<= max_batch) at which each of `models` can run its training
    step (estimate_memory with `settings`) while the others sit in the same memory with
    their weights and optimizer state, as `subllm bench train` alternates two models in one
    process: doubling from 1, then bisection.

    Returns {"batch_size": B (0: not even batch 1 fits), "capped": B == max_batch and
    everything up to it fits, "probes", "need_bytes": the largest model's need at B, or at
    batch 1 when B == 0}."""
    shapes = [resolve_shape(m) for m in models]
    if max_batch < 1:
        raise SubLLMError("largest_batch: need max_batch >= 1")
    resident = [resident_bytes(estimate_memory(s, seq_len, 1, **settings)) for s in shapes]
    others = [sum(resident) - r for r in resident]

    def need(batch: int) -> int:
        """Bytes the step of the hungriest model needs at `batch`, the others included."""
        return max(estimate_memory(s, seq_len, batch, **settings)["peak_bytes"] + rest
                   for s, rest in zip(shapes, others, strict=True))

    batch, capped, probes = _largest_fitting(lambda n: need(n) <= budget_bytes, 1, max_batch)
    return {"batch_size": batch, "capped": capped, "probes": probes,
            "need_bytes": need(max(batch, 1))}


# --------------------------------------------------------------------------------------
# the verb
# --------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """'80GB', '80 GiB', '512MB', '1.5G' -> bytes. Binary units (1 GB = 2**30 bytes), the
    way GPUs are sold and nvidia-smi counts."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise SubLLMError(f"{flag} {text!r}: write a positive size such as 80GB, 24GiB or "
                          "512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def format_estimate(res: dict[str, Any]) -> str:
    m, st = res["model"], res["settings"]
    prec = st["precision"]
    prec_txt = {"fp32": "fp32", "mixed": f"{st['dtype']} autocast, fp32 weights",
                "pure": f"pure {st['dtype']} (weights, grads, optimizer state)"}[prec]
    mode = "MsT + checkpointing" if st["mst"] else (
        "activation checkpointing" if st["checkpointing"] else "standard")
    lines = [
        f"model        {m['name']} ({m['source']}): {m['parameters']:,} parameters, "
        f"dim {m['dim']}, {m['n_layers']} blocks, vocab {m['vocab_size']}"
        + (f", structure {m['structure']} keep {m['keep']}" if "(" in m["structure"] else ""),
        f"step         batch {st['batch_size']} x {st['seq_len']} tokens, {prec_txt}, "
        f"{mode}, {st['optimizer']}, {st['device']}"
        + (f", per rank of {st['fsdp']} FSDP ranks" if st.get("fsdp", 1) > 1 else ""),
        f"peak         {fmt_bytes(res['peak_bytes'])}  (at: {res['phase']})",
    ]
    for comp in COMPONENTS:
        v = res["breakdown"][comp]
        if v:
            text = CPU_OVERHEAD_HELP if (comp == "runtime_overhead" and st["device"] == "cpu") \
                else COMPONENT_HELP[comp]
            lines.append(f"  {comp:<17}{fmt_bytes(v):>12}  {text}")
    fit = res.get("fit")
    if fit:
        def length(f: dict[str, Any]) -> str:
            if f["seq_len"] == 0:
                return f"none (not even {f['granule']} tokens)"
            return f"{f['seq_len']:,}" + (" or more (search cap)" if f["capped"] else "")

        lines.append(f"fits {fmt_bytes(fit['budget_bytes'])}"
                     + (f" ({fmt_bytes(fit['reserve_bytes'])} kept for the CUDA context)"
                        if fit["reserve_bytes"] else "")
                     + f": longest sequence at batch {st['batch_size']}: {length(fit)}"
                     + ("" if fit["seq_len"] == 0
                        else f" tokens (multiples of {fit['granule']})"))
        others = fit.get("by_mode", {})
        if others:
            lines.append("             the same step " + ", ".join(
                f"{mode}: {length(f)}" for mode, f in others.items()))
        if fit.get("over_context"):
            lines.append(f"             note: beyond the model's context "
                         f"({m['max_seq_len']:,} positions)")
    if st["device"] == "cpu":
        lines.append("note         resident memory with glibc's default malloc can be well "
                     "above this (it keeps freed tensors under 32 MiB); "
                     "MALLOC_MMAP_THRESHOLD_=131072 returns them")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Parameter and FLOP counts (`subllm info`, MFU in `subllm bench train`)
# --------------------------------------------------------------------------------------


def training_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Approximate training FLOPs per input token (forward + backward = 3x forward).

    Each block's matmuls cost 6 * params * (fraction of tokens it sees); causal attention
    (scores and weighted sum) costs 6 * f^2 * L * n_heads * head_dim for a block seeing a
    fraction f of the L tokens (its sequence is f * L long, and f of the tokens visit it).
    """
    L = seq_len or config.max_seq_len
    d, hd = config.dim, config.resolved_head_dim
    block_params = shape_from_config(config).block_linear_params()
    fracs = config.block_fractions()
    linear = sum(6 * block_params * f for f in fracs.values())
    attention = sum(6 * f * f * L * config.n_heads * hd for f in fracs.values())
    head = 6 * d * config.vocab_size
    return {"blocks_linear": linear, "attention": attention, "lm_head": head,
            "total": linear + attention + head, "seq_len": L}


def describe(config: ModelConfig, name: str = "", seq_len: int | None = None) -> dict[str, Any]:
    """What `subllm info` prints: parameters (the planner's count, checked against real
    models in the tests), segments, compute fraction and training FLOPs per token."""
    shape = shape_from_config(config, name)
    n_segments = len(config.segments)
    segments = []
    for seg in config.segments:
        blocks = seg.blocks()
        frac = 1.0
        for d in range(seg.depth):
            frac *= config.keep_per_depth[d]
        segments.append({"index": seg.index, "depth": seg.depth, "blocks": [blocks[0], blocks[-1]],
                         "keep": config.segment_keep(seg), "token_fraction": frac})
    flops = training_flops_per_token(config, seq_len)
    llama_flops = training_flops_per_token(
        ModelConfig(**{**config.to_dict(), "structure": "T" * config.n_layers}), seq_len)
    return {
        "name": name,
        "parameters": shape.param_count(),
        "parameters_subsampling": n_segments * config.dim,  # one d -> 1 scorer per `(`
        "parameters_bypass": n_segments * config.dim,  # one d-vector scale per `)`
        "structure": config.structure,
        "segments": segments,
        "block_compute_fraction": config.compute_fraction(),
        "training_flops_per_token": flops["total"],
        "training_flops_per_token_vs_llama": flops["total"] / llama_flops["total"],
        "flops_seq_len": flops["seq_len"],
        "config": config.to_dict(),
    }


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f} {unit}"
    return str(int(n))


def _features(c: dict[str, Any]) -> str:
    """The Llama-family extras of a config (design.md §2.1), in one line."""
    out = []
    if c.get("hf_family"):
        out.append(f"from {c['hf_family']}")
    if c.get("head_dim") and c["head_dim"] != c["dim"] // c["n_heads"]:
        out.append(f"head_dim {c['head_dim']}")
    bias = [n for n, on in (("q/k/v", c.get("qkv_bias")), ("o", c.get("o_bias"))) if on]
    if bias:
        out.append(f"{' and '.join(bias)} bias")
    if c.get("qk_norm"):
        out.append("q/k RMSNorm")
    if c.get("rope_scaling"):
        rs = c["rope_scaling"]
        out.append(f"rope {rs['rope_type']} x{rs['factor']:g} (theta {c['rope_theta']:g})")
    if c.get("sliding_window"):
        out.append(f"sliding window {c['sliding_window']}")
    if c.get("tie_embeddings"):
        out.append("tied embeddings")
    return ", ".join(out)


def format_info(d: dict[str, Any]) -> str:
    c = d["config"]
    lines = [
        f"model         {d['name'] or '(config)'}",
        f"parameters    {d['parameters']:,} ({_fmt_count(d['parameters'])})"
        + (f"  incl. subsampling {d['parameters_subsampling']:,} + bypass "
           f"{d['parameters_bypass']:,}" if d["segments"] else ""),
        f"shape         dim {c['dim']}, {c['n_layers']} blocks, {c['n_heads']} heads "
        f"({c['n_kv_heads']} KV), ffn {c['ffn_dim']}, vocab {c['vocab_size']}, "
        f"context {c['max_seq_len']}",
        f"structure     {d['structure']}",
    ]
    features = _features(c)
    if features:
        lines.insert(3, f"features      {features}")
    if not d["segments"]:
        lines.append("segments      none (a LLaMA)")
    for s in d["segments"]:
        lines.append(
            f"segment {s['index']}     depth {s['depth']}, "
            f"blocks {s['blocks'][0]}-{s['blocks'][1]}, "
            f"keep {s['keep']:g} -> {100 * s['token_fraction']:.1f}% of tokens"
        )
    lines.append(f"block compute {d['block_compute_fraction']:.3f} of a LLaMA of the same size")
    lines.append(
        f"train FLOPs   ~{d['training_flops_per_token'] / 1e9:.2f} GFLOP per token at "
        f"{d['flops_seq_len']} tokens ({d['training_flops_per_token_vs_llama']:.3f} of LLaMA)"
    )
    return "\n".join(lines)


