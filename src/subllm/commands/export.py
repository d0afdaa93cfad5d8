"""`subllm export`: a training checkpoint -> a Hugging Face model directory."""

from __future__ import annotations

import argparse

from subllm.atomic import check_out_dir
from subllm.flags import non_empty_path

DESCRIPTION = ("Write a `subllm train` checkpoint as a Hugging Face model directory "
               "(safetensors, config with auto_map, tokenizer, generation config and modeling "
               "code) that loads with AutoModelForCausalLM, with or without subllm installed.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=non_empty_path, metavar="RUN_DIR",
                   help="a `subllm train` --out directory (its newest checkpoint) or a "
                   "checkpoints/step-* directory")
    p.add_argument("--out", required=True, type=non_empty_path, metavar="HF_DIR",
                   help="directory to write")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="convert the weights (default: as trained, fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    check_out_dir(args.out, args.force, inputs=(args.checkpoint,))  # before any work
    from subllm.train.config import check_model_dir

    check_model_dir(args.checkpoint, "--checkpoint", hf=False)  # before torch loads
    from subllm.train.load import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {args.checkpoint} -> {out} ({', '.join(files)})")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
          " (or `import subllm` first)")
    return 0
