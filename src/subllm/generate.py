"""`subllm generate` (streamed text) and `subllm eval` (validation loss) on a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from subllm import checkpoint as ckpt
from subllm.errors import SubLLMError
from subllm.flags import positive_float, positive_int, resolve_flags


class TextStream:
    """Streams decoded text as token ids arrive (a `streamer` for `model.generate`).

    Byte-level BPE tokens can end inside a multi-byte character; text is held back while
    the decoded tail is an incomplete character (U+FFFD) and flushed at the end.
    """

    def __init__(self, tokenizer: Any, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.ids: list[int] = []
        self.printed = 0
        self.text = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        self.text = text
        if self.out is not None and len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
        self.printed = max(self.printed, len(text))


def _load_tokenizer(path: Path) -> Any:
    from subllm.data import load_tokenizer

    return load_tokenizer(path)


def encode_prompt(tokenizer: Any, prompt: str, eot_id: int) -> list[int]:
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return ids or [eot_id]  # an empty prompt starts a new document


def prompt_ids(tokenizer_path: str | Path, prompt: str, ctx: int) -> tuple[Any, int, list[int]]:
    """(tokenizer, end-of-text id, the prompt's token ids), refusing a prompt longer than
    the context `ctx`."""
    from subllm.data import eot_id_of

    tokenizer = _load_tokenizer(Path(tokenizer_path))
    eot = eot_id_of(tokenizer, tokenizer_path)
    ids = encode_prompt(tokenizer, prompt, eot)
    if len(ids) > ctx:
        raise SubLLMError(
            f"the prompt has {len(ids)} tokens, more than the model's context of {ctx}; "
            "shorten the prompt"
        )
    return tokenizer, eot, ids


@torch.no_grad()
def sample_text(model: torch.nn.Module, tokenizer_path: str | Path, prompt: str,
                max_new_tokens: int = 100, device: torch.device | str = "cpu",
                temperature: float = 0.8, top_k: int | None = 50, seed: int = 0,
                out: TextIO | None = None) -> str:
    """Continue `prompt`; returns the new text (and streams it to `out` when given)."""
    tokenizer, eot, ids = prompt_ids(tokenizer_path, prompt, model.config.max_seq_len)
    ctx = model.config.max_seq_len
    max_new_tokens = min(max_new_tokens, ctx - len(ids))
    stream = TextStream(tokenizer, out)
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k,
                   eos_token_id=eot, streamer=stream, generator=generator)
    return stream.text


def _device(name: str) -> torch.device:
    from subllm.train import Dist, pick_device

    return pick_device(name, Dist())


# ---------------------------------------------------------------------------------------------
# generate


GENERATE_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "prompt": None, "prompt_file": None, "max_new_tokens": 200,
    "temperature": 0.8, "top_k": 50, "top_p": None, "repetition_penalty": None, "seed": 0,
    "device": "auto",
}


def load_any(checkpoint: str | Path, device: torch.device
             ) -> tuple[torch.nn.Module, Path, dict[str, Any], int | None]:
    """(model in eval mode, its tokenizer.json, its run settings, its step) of a `subllm
    train` run or checkpoint, or of a Hugging Face SubLLM directory (`subllm export` /
    `subllm convert`; no run settings, step None)."""
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        path = ckpt.resolve_checkpoint(path)
        return (ckpt.load_model(path, device), path / "tokenizer.json",
                ckpt.load_train_config(path), ckpt.step_of(path))
    from subllm.convert import load_pretrained
    from subllm.model import SubLLM

    config, state, tokenizer = load_pretrained(path)
    if tokenizer is None:
        raise SubLLMError(f"{path} has no tokenizer.json; export or convert it with its "
                          "tokenizer (subllm convert --tokenizer FILE)")
    model = SubLLM(config)
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer, {}, None


def run_generate(args: argparse.Namespace) -> int:
    s, _ = resolve_flags(args, args._parser, GENERATE_DEFAULTS)
    if s["checkpoint"] is None:
        raise SubLLMError("give --checkpoint RUN_DIR (the --out of a `subllm train` run, or a "
                          "Hugging Face SubLLM directory from `subllm export`/`convert`)")
    if s["prompt"] is not None and s["prompt_file"] is not None:
        raise SubLLMError("give either --prompt or --prompt-file, not both")
    if s["temperature"] < 0:
        raise SubLLMError(f"--temperature must be >= 0 (0 = greedy), got {s['temperature']}")
    if s["top_p"] is not None and not 0 < s["top_p"] <= 1:
        raise SubLLMError(f"--top-p must be in (0, 1], got {s['top_p']}")
    prompt = s["prompt"] or ""
    if s["prompt_file"] is not None:
        try:
            prompt = Path(s["prompt_file"]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise SubLLMError(f"cannot read --prompt-file {s['prompt_file']} ({reason})") from None
    device = _device(s["device"])
    model, tokenizer_path, _, _ = load_any(s["checkpoint"], device)
    ctx = model.config.max_seq_len
    tokenizer, eot, ids = prompt_ids(tokenizer_path, prompt, ctx)
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
                   repetition_penalty=s["repetition_penalty"], eos_token_id=eot,
                   streamer=TextStream(tokenizer, sys.stdout), generator=generator)
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------
# eval


EVAL_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "data": None, "batches": 50, "batch_size": None, "seq_len": None,
    "device": "auto", "dtype": "auto", "json": False,
}


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path | None = None,
                        batches: int = 50, batch_size: int | None = None,
                        seq_len: int | None = None, device: str = "auto",
                        dtype: str = "auto") -> dict[str, Any]:
    """Validation loss, perplexity, tokens and eval-mode kept fractions of a checkpoint."""
    from subllm.data import load_data, same_vocab, sha256_file, val_batches
    from subllm.train import Dist, autocast_dtype, evaluate

    dev = _device(device)
    model, tokenizer_path, run, step = load_any(checkpoint, dev)
    path = tokenizer_path.parent
    data = load_data(data_dir if data_dir is not None else run.get("data", "data/default"))
    if data.meta["tokenizer_sha256"] != sha256_file(tokenizer_path) and not same_vocab(
            data.path / "tokenizer.json", tokenizer_path):  # an export rewrites the file
        raise SubLLMError(
            f"{data.path} was tokenized with a different tokenizer than {path}; pass the "
            "--data directory the model was trained on (or one prepared with its tokenizer)"
        )
    model_cfg = model.config.to_dict()
    if data.vocab_size > model_cfg["vocab_size"]:
        raise SubLLMError(
            f"the tokenizer of {data.path} has {data.vocab_size} tokens, more than the "
            f"model's vocab_size {model_cfg['vocab_size']}; use the model's data"
        )
    seq_len = seq_len or int(run.get("seq_len", 256))
    if seq_len > model_cfg["max_seq_len"]:
        raise SubLLMError(
            f"--seq-len {seq_len} exceeds the model's context ({model_cfg['max_seq_len']}); "
            "lower --seq-len"
        )
    eval_set = val_batches(data.tokens("val"), batch_size or int(run.get("batch_size", 16)),
                           seq_len, batches)
    result = evaluate(model, eval_set, dev, autocast_dtype(dtype, dev), Dist())
    return {"checkpoint": str(path), "step": step, "data": str(data.path),
            "val_loss": result["loss"], "perplexity": result["perplexity"],
            "tokens": result["tokens"], "kept_fractions": result["kept_fractions"],
            "keep": model.config.keep_per_depth if model.config.is_subllm else []}


def run_eval(args: argparse.Namespace) -> int:
    s, _ = resolve_flags(args, args._parser, EVAL_DEFAULTS)
    if s["checkpoint"] is None:
        raise SubLLMError("give --checkpoint RUN_DIR (the --out of a `subllm train` run, or a "
                          "Hugging Face SubLLM directory from `subllm export`/`convert`)")
    r = evaluate_checkpoint(s["checkpoint"], s["data"], s["batches"], s["batch_size"],
                            s["seq_len"], s["device"], s["dtype"])
    if s["json"]:
        print(json.dumps(r, indent=2))
        return 0
    kept = ""
    if r["kept_fractions"]:
        kept = (f" | eval kept fractions {', '.join(f'{k:.3f}' for k in r['kept_fractions'])}"
                f" (keep {', '.join(f'{k:g}' for k in r['keep'])} per depth)")
    at = f" (step {r['step']})" if r["step"] is not None else ""
    print(f"{r['checkpoint']}{at} on {r['data']}: val loss {r['val_loss']:.4f} | "
          f"perplexity {r['perplexity']:.2f} | {r['tokens']:,} tokens{kept}")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate", help="stream text from a trained checkpoint",
        description="Continue a prompt with a trained model, printing text as it is generated.",
    )
    g.add_argument("--config", metavar="FILE", help="YAML file whose keys are these flag names")
    g.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="run directory (its newest checkpoint), a checkpoints/step-* directory, "
                   "or a Hugging Face SubLLM directory (subllm export / convert)")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", metavar="TEXT", help="text to continue (default: none)")
    prompt.add_argument("--prompt-file", metavar="F", help="read the prompt from a file")
    g.add_argument("--max-new-tokens", type=positive_int, metavar="N", help="default 200")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=positive_int, metavar="K", help="default 50")
    g.add_argument("--top-p", type=positive_float, metavar="P", help="nucleus sampling")
    g.add_argument("--repetition-penalty", type=positive_float, metavar="R")
    g.add_argument("--seed", type=int, metavar="S", help="sampling seed (default 0)")
    g.add_argument("--device", metavar="D", help="auto, cpu, cuda, ... (default auto)")
    g.set_defaults(func=run_generate, _parser=g)

    e = subparsers.add_parser(
        "eval", help="validation loss and perplexity of a checkpoint",
        description="Validation loss, perplexity, tokens evaluated and (SUBLLM) the fraction "
        "of tokens each subsampling module keeps in eval mode.",
    )
    e.add_argument("--config", metavar="FILE", help="YAML file whose keys are these flag names")
    e.add_argument("--checkpoint", metavar="RUN_DIR",
                   help="run directory (its newest checkpoint), a checkpoints/step-* directory, "
                   "or a Hugging Face SubLLM directory (subllm export / convert)")
    e.add_argument("--data", metavar="DATA_DIR", help="prepared data (default: the run's)")
    e.add_argument("--batches", type=positive_int, metavar="N", help="validation batches (50)")
    e.add_argument("--batch-size", type=positive_int, metavar="N", help="default: the run's")
    e.add_argument("--seq-len", type=positive_int, metavar="N", help="default: the run's")
    e.add_argument("--device", metavar="D", help="auto, cpu, cuda, ... (default auto)")
    e.add_argument("--dtype", choices=("auto", "fp32", "bf16"), help="default auto")
    e.add_argument("--json", action="store_true", default=None, help="print JSON")
    e.set_defaults(func=run_eval, _parser=e)
