"""`subllm info`: size, structure and compute of a preset or config file."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

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

    if args.seq_len is not None and args.seq_len <= 0:
        raise SubLLMError(f"--seq-len must be positive, got {args.seq_len}")
    _check_spec(args.model, MODEL_ARGUMENTS)
    config, _ = model_config_of(args.model)
    d = describe(config, args.model, args.seq_len)
    print(json.dumps(d, indent=2) if args.json else format_info(d))
    return 0


def _check_spec(spec: str, accepted: str) -> None:
    """One line for a model argument that names nothing: what was given (empty, a missing
    path, a word that is no preset and no file here, a directory that holds no model) and
    what `info` takes."""
    from subllm.model.config import PRESETS
    from subllm.train.config import MODEL_DIR_FILES

    if spec in PRESETS:
        return
    if not spec.strip():
        raise SubLLMError(f"PRESET_OR_CONFIG is empty; pass {accepted}")
    path = Path(spec)
    if path.is_dir() and not any((path / name).exists() for name in MODEL_DIR_FILES) \
            and not path.name.startswith("step-"):
        raise SubLLMError(f"{spec} is a directory without a model (no config.json, "
                          f"checkpoints/ or model_config.json in it); pass {accepted}")
    if path.exists():
        return
    near = difflib.get_close_matches(spec, list(PRESETS), n=1)
    if len(path.parts) > 1 or path.suffix or spec.startswith(("~", ".")):
        if not near:  # a path that is not there
            raise SubLLMError(f"{spec} does not exist; pass {accepted}")
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise SubLLMError(f"unknown preset {spec!r}, and no file or directory of that name "
                      f"exists; {hint}pass {accepted}")
