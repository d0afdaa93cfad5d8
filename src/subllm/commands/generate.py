"""`subllm generate`: stream text from a trained model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from subllm.errors import SubLLMError
from subllm.flags import non_empty_path, positive_float, positive_int, resolve_flags

DESCRIPTION = "Continue a prompt with a trained model, printing text as it is generated."


def add_arguments(g: argparse.ArgumentParser) -> None:
    g.add_argument("--config", type=non_empty_path, metavar="FILE",
                   help="YAML file whose keys are these flag names; flags win (default: none)")
    g.add_argument("--checkpoint", type=non_empty_path, metavar="RUN_DIR",
                   help="run directory (its newest checkpoint), a checkpoints/step-* directory, "
                   "or a Hugging Face SubLLM directory (subllm export / convert); required")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="text to continue (default: none)")
    prompt.add_argument("--prompt-file", type=non_empty_path, metavar="F",
                        help="read the prompt from this UTF-8 file instead of --prompt "
                        "(default: none)")
    g.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="tokens to generate at most, fewer where the model's context ends "
                   "(default 200)")
    g.add_argument("--temperature", type=float, metavar="T",
                   help="sampling temperature: lower is more predictable, 0 = greedy "
                   "(default 0.8)")
    g.add_argument("--top-k", type=positive_int, metavar="K",
                   help="sample only from the K most likely tokens (default 50)")
    g.add_argument("--top-p", type=positive_float, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens whose probability "
                   "sums to P, 0 < P <= 1 (default: off)")
    g.add_argument("--repetition-penalty", type=positive_float, metavar="R",
                   help="penalise tokens already in the text, > 1 discourages repeats "
                   "(default 1.0 = off)")
    g.add_argument("--seed", type=int, metavar="S", help="sampling seed (default 0)")
    g.add_argument("--device", metavar="D", help="auto, cpu, cuda, ... (default auto)")


GENERATE_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "prompt": None, "prompt_file": None, "max_new_tokens": 200,
    "temperature": 0.8, "top_k": 50, "top_p": None, "repetition_penalty": None, "seed": 0,
    "device": "auto",
}


def run(args: argparse.Namespace) -> int:
    s, _ = resolve_flags(args, args._parser, GENERATE_DEFAULTS)
    if s["checkpoint"] is None:
        raise SubLLMError("give --checkpoint RUN_DIR (the --out of a `subllm train` run, or a "
                          "Hugging Face SubLLM directory from `subllm export`/`convert`)")
    if s["prompt"] is not None and s["prompt_file"] is not None:
        raise SubLLMError("give either --prompt or --prompt-file, not both")
    if not 0 <= s["temperature"] < float("inf"):  # NaN fails this too
        raise SubLLMError(f"--temperature must be a finite number >= 0 (0 = greedy), got "
                          f"{s['temperature']}")
    if s["top_p"] is not None and not 0 < s["top_p"] <= 1:
        raise SubLLMError(f"--top-p must be in (0, 1], got {s['top_p']}")
    prompt = s["prompt"] or ""
    if s["prompt_file"] is not None:
        try:
            prompt = Path(s["prompt_file"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise SubLLMError(f"cannot read --prompt-file {s['prompt_file']} ({reason})") from None
    from subllm.train.config import check_model_dir

    check_model_dir(s["checkpoint"], "--checkpoint")  # before torch and transformers load
    import torch

    from subllm.interop.tokenizer import text_pipeline
    from subllm.train.evaluate import TextStream
    from subllm.train.load import load_any
    from subllm.train.runtime import Dist, pick_device

    device = pick_device(s["device"], Dist())
    model, tokenizer_path, settings, _ = load_any(s["checkpoint"], device)
    ctx = model.config.max_seq_len
    tokenizer, stop, ids = text_pipeline(s["checkpoint"], tokenizer_path, prompt, ctx,
                                         settings.get("token_ids"))
    max_new = s["max_new_tokens"]
    if len(ids) + max_new > ctx:
        max_new = ctx - len(ids)
        print(f"subllm generate: note: generating {max_new} tokens, all that fit in the "
              f"context of {ctx}", file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(s["seed"])
    sys.stdout.write(prompt)
    sys.stdout.flush()
    model.generate(torch.tensor([ids], device=device), max_new, temperature=s["temperature"],
                   top_k=s["top_k"], top_p=s["top_p"],
                   repetition_penalty=s["repetition_penalty"], eos_token_id=stop,
                   streamer=TextStream(tokenizer, sys.stdout), generator=generator)
    sys.stdout.write("\n")
    return 0
