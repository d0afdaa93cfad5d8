"""`subllm info`: size, structure and compute of a preset or config file."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from subllm.config import ModelConfig


def training_flops_per_token(config: ModelConfig, seq_len: int | None = None) -> dict[str, float]:
    """Approximate training FLOPs per input token (forward + backward = 3x forward).

    Each block's matmuls cost 6 * params * (fraction of tokens it sees); causal attention
    (scores and weighted sum) costs 6 * f^2 * L * n_heads * head_dim for a block seeing a
    fraction f of the L tokens (its sequence is f * L long, and f of the tokens visit it).
    """
    L = seq_len or config.max_seq_len
    d, hd = config.dim, config.resolved_head_dim
    attn_params = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    block_params = attn_params + 3 * d * config.ffn_dim
    fracs = config.block_fractions()
    linear = sum(6 * block_params * f for f in fracs.values())
    attention = sum(6 * f * f * L * config.n_heads * hd for f in fracs.values())
    head = 6 * d * config.vocab_size
    return {"blocks_linear": linear, "attention": attention, "lm_head": head,
            "total": linear + attention + head, "seq_len": L}


def describe(config: ModelConfig, name: str = "", seq_len: int | None = None) -> dict[str, Any]:
    from subllm.model import SubLLM

    with torch.device("meta"):  # sizes only: no memory is allocated
        model = SubLLM(config)
    n_scorer = sum(p.numel() for p in model.subsamplers.parameters())
    n_bypass = sum(p.numel() for p in model.bypasses.parameters())
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
        "parameters": model.num_params(),
        "parameters_subsampling": n_scorer,
        "parameters_bypass": n_bypass,
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


def run(args: argparse.Namespace) -> int:
    config = ModelConfig.load(args.model)
    if args.seq_len is not None and args.seq_len <= 0:
        from subllm.errors import SubLLMError

        raise SubLLMError(f"--seq-len must be positive, got {args.seq_len}")
    d = describe(config, args.model, args.seq_len)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="parameters, structure and compute of a preset or config",
                       description="Describe a model: parameter count, structure with the keep "
                                   "ratio of each segment, block-compute fraction relative to a "
                                   "LLaMA of the same size, training FLOPs per token.")
    p.add_argument("model", metavar="PRESET_OR_CONFIG",
                   help="a preset name (e.g. subllm-1.3b) or a YAML/JSON model config file")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for the FLOPs estimate (default: the context)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
