"""LLaMA building blocks shared by both model families (design.md §2).

Weight names follow Hugging Face's `modeling_llama.py` (`q_proj`, `gate_proj`,
`input_layernorm`, ...) so that conversion to and from `transformers` is a table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .kv_cache import LayerKV

_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_HAS_GQA = _TORCH_VERSION >= (2, 5)


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


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin of rotary embedding at explicit positions. positions: (B, L) -> (B, L, hd)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64)
                  .float() / head_dim)
    )
    freqs = positions.float()[..., None] * inv_freq  # (B, L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: (B, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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
    mask:  (B, 1, L, L_past + L) bool attention mask; None: plain causal attention when
           `causal`, else no mask (one new token attending to a fully valid past).
    cache_start: where this call's keys go in the level's KV cache (None: no cache).
    prior: (B,) real tokens of this level already in the cache, per row (None: none); the
           `parent` RoPE convention numbers a nested segment's tokens after them.
    level: the nesting level (0 = top, j + 1 = directly inside segment j; KV cache).
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


def attention_mask_for(
    valid: Tensor | None, past_valid: Tensor | None, length: int, device: torch.device
) -> Tensor | None:
    """Boolean (B, 1, L, P + L) mask: causal among the new tokens, valid keys only.

    Returns None when plain causal attention is exact (no cache, no padding). Every
    query may attend to itself, so rows of padding never see an empty key set (NaN).
    """
    if valid is None and past_valid is None:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    new = causal[None] if valid is None else causal[None] & valid[:, None, :]  # (B, L, L)
    new = new | torch.eye(length, dtype=torch.bool, device=device)
    if past_valid is not None and past_valid.shape[1] > 0:
        b = max(new.shape[0], past_valid.shape[0])
        past = past_valid[:, None, :].expand(b, length, -1)
        new = torch.cat([past, new.expand(b, -1, -1)], dim=-1)
    return new[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.resolved_head_dim
        d, hd = config.dim, self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, span: Span, cache: LayerKV | None = None) -> Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
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
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, span: Span, cache: LayerKV | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), span, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
