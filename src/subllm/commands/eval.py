"""`subllm eval`: validation loss, perplexity and kept fractions of a trained model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from subllm.errors import SubLLMError
from subllm.flags import non_empty_path, positive_int, resolve_flags

DESCRIPTION = ("Validation loss, perplexity, tokens evaluated and (SUBLLM) the fraction of "
               "tokens each subsampling module keeps in eval mode.")


def add_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("--config", type=non_empty_path, metavar="FILE",
                   help="YAML file whose keys are these flag names; flags win (default: none)")
    e.add_argument("--checkpoint", type=non_empty_path, metavar="RUN_DIR",
                   help="run directory (its newest checkpoint), a checkpoints/step-* directory, "
                   "or a Hugging Face SubLLM directory (subllm export / convert); required")
    e.add_argument("--data", type=non_empty_path, metavar="DATA_DIR",
                   help="prepared data (default: the run's)")
    e.add_argument("--batches", type=positive_int, metavar="N",
                   help="validation batches to evaluate (default 50)")
    e.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="sequences per batch (default: the run's --batch-size, else 16)")
    e.add_argument("--seq-len", type=positive_int, metavar="N",
                   help="tokens per sequence (default: the run's --seq-len, else 256)")
    e.add_argument("--device", metavar="D", help="auto, cpu, cuda, ... (default auto)")
    e.add_argument("--dtype", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype; auto = bf16 on GPUs that have it, else fp32 "
                   "(default auto)")
    e.add_argument("--json", action="store_true", default=None,
                   help="print the results as JSON")


EVAL_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "data": None, "batches": 50, "batch_size": None, "seq_len": None,
    "device": "auto", "dtype": "auto", "json": False,
}


def run(args: argparse.Namespace) -> int:
    s, _ = resolve_flags(args, args._parser, EVAL_DEFAULTS)
    if s["checkpoint"] is None:
        raise SubLLMError("give --checkpoint RUN_DIR (the --out of a `subllm train` run, or a "
                          "Hugging Face SubLLM directory from `subllm export`/`convert`)")
    if s["seq_len"] is not None and s["seq_len"] < 2:
        raise SubLLMError(f"--seq-len {s['seq_len']}: a validation window needs at least 2 "
                          "tokens (one input, one target)")
    from subllm.train.config import check_model_dir

    check_model_dir(s["checkpoint"], "--checkpoint")  # before torch and transformers load
    from subllm.train.evaluate import evaluate_checkpoint, fmt_perplexity

    r = evaluate_checkpoint(s["checkpoint"], s["data"], s["batches"], s["batch_size"],
                            s["seq_len"], s["device"], s["dtype"],
                            progress=sys.stderr.isatty())  # no bars in logs and pipes
    if s["json"]:
        print(json.dumps(r, indent=2))
        return 0
    at = f" (step {r['step']})" if r["step"] is not None else ""
    print(f"{r['checkpoint']}{at} on {r['data']}: val loss {r['val_loss']:.4f} | "
          f"perplexity {fmt_perplexity(r['val_loss'])} | {r['tokens']:,} tokens")
    if r["kept_fractions"]:
        def fractions(values: list[float]) -> str:
            return ", ".join(f"{k:.3f}" for k in values)

        print(f"  inference selection ({r['threshold']} threshold): val loss "
              f"{r['val_loss']:.4f}, kept fractions {fractions(r['kept_fractions'])}")
        print(f"  training selection (top-k):        val loss {r['top_k_val_loss']:.4f}, "
              f"kept fractions {fractions(r['top_k_kept_fractions'])}")
        print(f"  keep ratio per depth {', '.join(f'{k:g}' for k in r['keep'])}; "
              f"train/inference gap {100 * r['gap']:+.2f} % of the loss")
    return 0
