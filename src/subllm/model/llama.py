"""LLaMA building blocks shared by both model families (design.md §2).

Weight names follow Hugging Face's `modeling_llama.py` (`q_proj`, `gate_proj`,
`input_layernorm`, ...) so that conversion to and from `transformers` is a table.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, require_model_config
from .kv_cache import LayerKV

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


def _backends_without_cudnn() -> list | None:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # torch < 2.3: no cuDNN attention to avoid
        return None
    if not hasattr(SDPBackend, "CUDNN_ATTENTION"):
        return None
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_NO_CUDNN = _backends_without_cudnn()


def cached_attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA backends for attention against a KV cache on a CUDA device: all but cuDNN's.

    cuDNN's fused attention builds (and caches) an execution graph per query and key
    length. Decoding grows the key length by one token per step, so every call misses that
    cache and pays the build on the host: on an H200 with torch 2.11 we measured 2.7 ms of
    host time per attention call, 60 % of a 1.3B LLaMA's decode step (97 ms/token at a
    4096-token prompt; docs/benchmarks.md, "GPU"). The flash and memory-efficient kernels
    need no per-shape setup. Training and cache-free evaluation keep SDPA's own choice.
    One context per forward pass (entering it costs about 15 us of host time)."""
    if _NO_CUDNN is None or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_NO_CUDNN)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the input dtype, exactly as LlamaRMSNorm does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  device: torch.device | None = None) -> tuple[Tensor, float]:
    """Rotary inverse frequencies (head_dim / 2,) and the factor cos/sin are multiplied by.

    `scaling` is a ModelConfig.rope_scaling; each type follows `transformers`'
    `modeling_rope_utils` operation for operation, so the tables are bit-identical
    (design.md §2.1). "dynamic" is the plain table: ModelConfig refuses a context past its
    original one, the only place where dynamic NTK scaling differs.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float()
                  / head_dim)
    )
    kind = scaling["rope_type"] if scaling else "default"
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = scaling["factor"]
    if kind == "linear":  # positions divided by factor == frequencies divided by factor
        return inv_freq / factor, 1.0
    if kind == "llama3":  # Llama 3.1: low frequencies / factor, a smooth ramp in between
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # YaRN (Peng et al., 2023): ramp between interpolation and extrapolation
        old_len = scaling["original_max_position_embeddings"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = scaling.get("attention_factor")
        if attn is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = (float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all
                    else mscale(factor))
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return ((head_dim * math.log(old_len / (rotations * 2 * math.pi)))
                    / (2 * math.log(theta)))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001  # as transformers: no division by zero
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp.to(device)
        pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        return inv_inter * (1 - extrapolation) + inv_extra * extrapolation, attn
    raise ValueError(f"unknown rope_type {kind!r}")  # ModelConfig.validate refuses it first


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype,
    scaling: dict | None = None, inv_freq: tuple[Tensor, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """cos/sin of rotary embedding at explicit positions. positions: (B, L) -> (B, L, hd).
    inv_freq: `rope_inv_freq`'s result for these settings on this device, if the caller
    keeps it (a decoding step would otherwise rebuild it at every nesting level)."""
    inv_freq, attention_factor = inv_freq or rope_inv_freq(head_dim, theta, scaling,
                                                           positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: (B, L, hd)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:  # YaRN's attention temperature, folded into cos/sin as HF does
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, h, L, hd); cos, sin: (B, L, hd)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


@dataclass
class Span:
    """What every block at one nesting level needs for one forward call.

    pos:   (B, L) original token positions (RoPE uses these, design.md §3.3).
    valid: (B, L) bool, False for padding / unfilled slots; None when every token is real.
    cos, sin: (B, L, head_dim) rotary tables for `pos`, computed once per level.
    mask:  (B, 1, L, L_past + L) attention mask (padding, cache, sliding window, documents),
           additive (`additive_mask`) or bool; None: plain causal attention when `causal`,
           else no mask (one new token attending to a fully valid past).
    cache_start: where this call's keys go in the level's KV cache (None: no cache).
    prior: (B,) real tokens of this level already in the cache, per row (None: none); the
           `parent` RoPE convention numbers a nested segment's tokens after them.
    level: the nesting level (0 = top, j + 1 = directly inside segment j; KV cache).
    docs:  (B, L) document ids of packed rows (design.md §3.10): attention, positions and
           subsampling stay within each document; None: one document per row.
    max_docs: with docs, an upper bound on the documents in any row, known on the host.
    """

    pos: Tensor
    valid: Tensor | None
    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    cache_start: int | None = None
    causal: bool = True
    prior: Tensor | None = None
    level: int = 0
    docs: Tensor | None = None
    max_docs: int | None = None


def attention_mask_for(
    valid: Tensor | None, past_valid: Tensor | None, length: int, device: torch.device,
    window: int | None = None, pos: Tensor | None = None, past_pos: Tensor | None = None,
    docs: Tensor | None = None,
) -> Tensor | None:
    """Boolean (B, 1, L, P + L) mask: causal among the new tokens, valid keys only, with
    a sliding `window` only keys whose position is within `window - 1` of the query's
    (`pos`: (B, L), `past_pos`: (B, P); design.md §2.1), and with `docs` (B, L) only keys
    of the query's own document (block-causal, packed rows; no cache; design.md §3.10).

    Returns None when plain causal attention is exact (no cache, no padding, no window, one
    document per row). Every query may attend to itself, so rows of padding never see an
    empty key set (NaN).
    """
    if valid is None and past_valid is None and window is None and docs is None:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    new = causal[None] if valid is None else causal[None] & valid[:, None, :]  # (B, L, L)
    if docs is not None:
        new = new & (docs[:, :, None] == docs[:, None, :])
    if past_valid is not None and past_valid.shape[1] > 0:
        b = max(new.shape[0], past_valid.shape[0])
        past = past_valid[:, None, :].expand(b, length, -1)
        new = torch.cat([past, new.expand(b, -1, -1)], dim=-1)
    if window is not None:  # Mistral: key j visible from query i when pos_i - pos_j < window
        keys = pos if past_pos is None or past_pos.shape[1] == 0 else torch.cat(
            [past_pos, pos], dim=1)
        new = new & ((pos[:, :, None] - keys[:, None, :]) < window)
    eye = torch.eye(length, dtype=torch.bool, device=device)
    new = new | F.pad(eye, (new.shape[-1] - length, 0))  # (L, P + L): each query itself
    return new[:, None]


def additive_mask(mask: Tensor | None, device: torch.device, dtype: torch.dtype
                  ) -> Tensor | None:
    """A boolean attention mask as SDPA's additive one, 0 where a key is seen and -inf
    where not, in the dtype attention will run in (autocast's where it is on). Given a
    boolean mask, SDPA converts it at every call: two kernels and an L x (P + L) buffer per
    block, each buffer kept for the backward; made once, a level's blocks share one."""
    if mask is None:
        return None
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        require_model_config(config, "Attention")
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.resolved_head_dim
        d, hd = config.dim, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=config.o_bias)
        if config.qk_norm:  # Qwen3: each head's query and key RMS-normalised before RoPE
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: Tensor, span: Span, cache: LayerKV | None = None) -> Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)  # (B, L, nh, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, span.cos, span.sin), apply_rope(k, span.cos, span.sin)
        if cache is not None:
            k, v = cache.update(k, v, span.cache_start)  # (B, nkv, P + L, hd)
        kwargs = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if span.mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=span.mask, **kwargs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=span.causal, **kwargs)
        y = y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        require_model_config(config, "MLP")
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        require_model_config(config, "Block")
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, span: Span, cache: LayerKV | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), span, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
