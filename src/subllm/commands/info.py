"""`subllm info`: size, structure and compute of a preset or config file."""

from __future__ import annotations

import argparse
import json

from subllm.errors import SubLLMError

DESCRIPTION = ("Describe a model: parameter count, structure with the keep ratio of each "
               "segment, block-compute fraction relative to a LLaMA of the same size, training "
               "FLOPs per token.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="PRESET_OR_CONFIG",
                   help="a preset name (e.g. subllm-1.3b), a YAML/JSON model config, a `subllm "
                   "train` settings file, a run directory, a Hugging Face SubLLM directory, or a "
                   "transformers Llama / Qwen2 / Qwen3 / Mistral directory or config.json")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="sequence length for the FLOPs estimate (default: the model's context)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def run(args: argparse.Namespace) -> int:
    from subllm.planner import describe, format_info
    from subllm.train.config import MODEL_ARGUMENTS, model_config_of

    if not args.model.strip():
        raise SubLLMError(f"PRESET_OR_CONFIG is empty; pass {MODEL_ARGUMENTS}")
    config, _ = model_config_of(args.model)
    if args.seq_len is not None and args.seq_len <= 0:
        raise SubLLMError(f"--seq-len must be positive, got {args.seq_len}")
    d = describe(config, args.model, args.seq_len)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0
