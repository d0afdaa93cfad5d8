"""`subllm estimate`: predicted peak training memory and the longest sequence that fits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from subllm.errors import SubLLMError
from subllm.flags import non_empty_path
from subllm.model.config import ModelConfig
from subllm.planner import (
    CUDA_DEFAULT_RESERVE,
    DEVICES,
    DTYPES,
    OPTIMIZERS,
    PRECISIONS,
    ModelShape,
    estimate_memory,
    fmt_bytes,
    format_estimate,
    longest_fit,
    parse_memory,
    shape_from_config,
)
from subllm.train.config import model_config_of

DESCRIPTION = ("Predict the peak memory of a training step (forward with labels, "
               "backward, optimizer step) from the model's shape, broken down into "
               "weights, gradients, optimizer state, activations, attention, "
               "logits/loss and temporaries; with --gpu-memory, the longest sequence "
               "that fits. Assumptions: `subllm estimate` help in "
               "src/subllm/planner.py and README (Memory planner).")


def _load_model_arg(args: argparse.Namespace) -> ModelShape:
    if args.preset is not None:
        return shape_from_config(ModelConfig.preset(args.preset), args.preset)
    if args.config is not None:
        p = Path(args.config)
        if p.suffix == ".json" and p.is_file():
            try:
                looks_hf = "hidden_size" in json.loads(p.read_text())
            except (ValueError, TypeError):
                looks_hf = False
            if looks_hf:
                raise SubLLMError(f"--config {args.config!r} is a transformers config.json; "
                                  "pass it as --hf-config")
        config, name = model_config_of(args.config)
        return shape_from_config(config, name)
    from subllm.interop.llama import hf_config_shape

    return hf_config_shape(args.hf_config)


def run(args: argparse.Namespace) -> int:
    shape = _load_model_arg(args)
    settings = dict(dtype=args.dtype, checkpointing=args.checkpointing, mst=args.mst,
                    optimizer=args.optimizer, device=args.device, precision=args.precision,
                    fsdp=args.fsdp)
    res = estimate_memory(shape, args.seq_len, args.batch_size, **settings)
    if args.gpu_memory is not None:
        budget = parse_memory(args.gpu_memory)
        if args.reserve is None:
            reserve = CUDA_DEFAULT_RESERVE if args.device == "cuda" else 0
        elif args.reserve.strip() in ("0", "0B"):
            reserve = 0
        else:
            reserve = parse_memory(args.reserve, "--reserve")
        if reserve >= budget:
            raise SubLLMError(f"--reserve {fmt_bytes(reserve)} leaves nothing of --gpu-memory "
                              f"{fmt_bytes(budget)}")
        fit = longest_fit(shape, budget - reserve, args.batch_size, **settings)
        fit.update(budget_bytes=budget, reserve_bytes=reserve,
                   over_context=bool(shape.max_seq_len and fit["seq_len"] > shape.max_seq_len))
        # the other training modes, for comparison
        this = "mst" if args.mst else ("checkpointing" if args.checkpointing else "standard")
        fit["by_mode"] = {
            mode: longest_fit(shape, budget - reserve, args.batch_size,
                              **{**settings, "checkpointing": mode == "checkpointing",
                                 "mst": mode == "mst"})
            for mode in ("standard", "checkpointing", "mst") if mode != this}
        res["fit"] = fit
    print(json.dumps(res, indent=2) if args.json else format_estimate(res))
    return 0




def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a subllm preset, e.g. subllm-1.3b")
    src.add_argument("--config", type=non_empty_path,
                     help="a subllm YAML/JSON model config, `subllm train` settings, a run "
                     "directory or a Hugging Face SubLLM directory")
    src.add_argument("--hf-config", type=non_empty_path,
                     help="a transformers config.json (Llama, Mistral, Qwen2, Qwen3), e.g. "
                     "examples/hf-configs/llama-3-8b.json")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32",
                   help="fp32, or bf16/fp16 (see --precision); default fp32")
    p.add_argument("--precision", choices=PRECISIONS, default="mixed",
                   help="with --dtype bf16/fp16: mixed = autocast over fp32 weights, "
                        "gradients and optimizer state (default; `subllm train --dtype bf16`, "
                        "transformers Trainer bf16=True); pure = the model cast to the dtype")
    p.add_argument("--checkpointing", action="store_true",
                   help="block-level activation checkpointing")
    p.add_argument("--mst", action="store_true",
                   help="Mini-Sequence Transformer (chunked MLP and loss; implies "
                        "checkpointing), as subllm.mst.apply_mst")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw",
                   help="adamw/adam: 2 states per parameter; sgd: momentum, 1 (default adamw)")
    p.add_argument("--device", choices=DEVICES, default="cuda",
                   help="cuda (default: fused AdamW, cuBLAS workspace) or cpu (resident "
                        "memory: per-parameter AdamW temporaries, runtime overhead)")
    p.add_argument("--fsdp", type=int, default=1, metavar="N",
                   help="per-rank memory when N ranks shard the model with FSDP2 "
                   "(`subllm train --distributed fsdp`; default 1: one device)")
    p.add_argument("--gpu-memory", default=None,
                   help="memory to fit, e.g. 80GB: also print the longest sequence that fits "
                   "(default: none, no search)")
    p.add_argument("--reserve", default=None,
                   help="part of --gpu-memory not available to tensors (default 1GB on "
                        "cuda for the CUDA context and fragmentation, 0 on cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
