"""`subllm prepare`: tokenize a corpus into a data directory for training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from subllm.errors import SubLLMError
from subllm.flags import fraction, non_empty_path, positive_int, resolve_flags
from subllm.train.config import DEFAULT_DATA_DIR, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE

DESCRIPTION = ("Train a byte-level BPE tokenizer (or use yours) and tokenize a corpus into "
               "train.bin / val.bin / meta.json.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=non_empty_path, metavar="FILE",
                   help="YAML file whose keys are these flag names; flags win (default: none)")
    p.add_argument("--out", type=non_empty_path, metavar="DATA_DIR",
                   help=f"output directory (default {DEFAULT_DATA_DIR})")
    p.add_argument("--input", nargs="+", type=non_empty_path, metavar="PATH", dest="input",
                   help="files or directories (.txt, .jsonl, any text; walked recursively); "
                   "default: the running Python's standard-library source")
    p.add_argument("--text-field", metavar="NAME",
                   help="text field of .jsonl records (default text)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=positive_int, metavar="N",
                       help=f"train a byte-level BPE of this size (default {DEFAULT_VOCAB_SIZE})")
    group.add_argument("--tokenizer", type=non_empty_path, metavar="FILE_OR_DIR",
                       help="use this tokenizer.json, or a model directory's tokenizer "
                       "(encoding as transformers' AutoTokenizer does, a BOS first where it "
                       "adds one), instead of training one (default: none, train one of "
                       "--vocab-size)")
    p.add_argument("--val-fraction", type=fraction, metavar="F",
                   help=f"fraction of documents for validation (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the train/val split (default 0)")


PREPARE_DEFAULTS: dict[str, Any] = {
    "out": str(DEFAULT_DATA_DIR),
    "input": None,
    "text_field": "text",
    "vocab_size": None,  # DEFAULT_VOCAB_SIZE unless a tokenizer is given
    "tokenizer": None,
    "val_fraction": DEFAULT_VAL_FRACTION,
    "seed": 0,
}


def run(args: argparse.Namespace) -> int:
    from subllm.train.data import Terminated, prepare, print_summary, terminate_raises

    s, _ = resolve_flags(args, args._parser, PREPARE_DEFAULTS)
    if s["tokenizer"] is not None and s["vocab_size"] is not None:
        raise SubLLMError("give either vocab-size or tokenizer, not both")
    if not str(s["out"]).strip():
        raise SubLLMError("--out is empty; pass a directory path")
    out = Path(s["out"]).resolve()
    for inp in s["input"] or ():
        i = Path(inp).resolve()
        if out == i or i in out.parents:  # the next prepare would read its own outputs
            raise SubLLMError(f"--out {s['out']} is or lies inside the input {inp}; write the "
                              "prepared data outside the corpus")
    tok = s["tokenizer"]
    if tok is not None and Path(tok).is_dir() and Path(tok).resolve() == out:
        raise SubLLMError(f"--out {s['out']} is the --tokenizer directory; its tokenizer.json "
                          "would be replaced: write the prepared data elsewhere")
    try:
        with terminate_raises():  # SIGTERM, like Ctrl-C, removes prepare's temporaries
            meta = prepare(
                s["out"], inputs=s["input"], text_field=s["text_field"],
                vocab_size=s["vocab_size"] or DEFAULT_VOCAB_SIZE, tokenizer=tok,
                val_fraction=s["val_fraction"], seed=s["seed"],
            )
    except Terminated as e:
        print(f"subllm prepare: terminated by {e}; its temporary files are removed",
              file=sys.stderr)
        return 128 + e.signum
    print_summary(meta, s["out"])
    return 0
