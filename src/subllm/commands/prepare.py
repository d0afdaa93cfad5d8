"""`subllm prepare`: tokenize a corpus into a data directory for training.

Its inputs (text, JSON lines, JSON, Parquet, Hugging Face datasets) and their mixing by
weight (`--input PATH:WEIGHT`, or a config file's `sources:` list) live in
`subllm.train.sources`; the passes, the worker processes and the shards in
`subllm.train.data.prepare`; this module reads the flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from subllm.errors import SubLLMError
from subllm.flags import fraction, non_empty_path, positive_int, resolve_flags
from subllm.train.config import DEFAULT_DATA_DIR, DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE

DEFAULT_SHARD_TOKENS = 1 << 30  # subllm.train.data's, here so that --help needs no numpy

DESCRIPTION = ("Train a byte-level BPE tokenizer (or use yours) and tokenize a corpus into "
               "train.bin / val.bin / meta.json.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=non_empty_path, metavar="FILE",
                   help="YAML file whose keys are these flag names; flags win (default: none)")
    p.add_argument("--out", type=non_empty_path, metavar="DATA_DIR",
                   help=f"output directory (default {DEFAULT_DATA_DIR})")
    p.add_argument("--input", nargs="+", action="extend", type=non_empty_path,
                   metavar="PATH[:WEIGHT]", dest="input",
                   help="files, directories (walked recursively) or globs, repeatable: text "
                   "files (one document each, also .txt.gz/.txt.zst), .jsonl (.gz, .zst), .json "
                   "(an array of records), .parquet, a datasets save_to_disk directory; "
                   "PATH:WEIGHT mixes inputs, each WEIGHT its share of the training tokens "
                   "(a YAML --config may list `sources: [{path: P, weight: W}, ...]`); "
                   "default: the running Python's standard-library source")
    p.add_argument("--hf-dataset", metavar="NAME[:WEIGHT]",
                   help="also read a dataset through datasets.load_dataset(NAME, "
                   "--hf-config, split=--hf-split, streaming=True) (default: none)")
    p.add_argument("--hf-config", metavar="NAME",
                   help="configuration of --hf-dataset (default: none)")
    p.add_argument("--hf-split", metavar="SPLIT",
                   help="split of --hf-dataset and of a saved DatasetDict (default train)")
    p.add_argument("--text-field", metavar="NAME",
                   help="field of a record that holds its text (default text); a chat (a "
                   "`messages` list of {role, content}, or this field holding one) is "
                   "rendered with the --tokenizer model's chat template, else as "
                   "`role: content` lines")
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
    p.add_argument("--seed", type=int, metavar="S",
                   help="seed of the train/val split and of a mixture's draw (default 0)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="processes that tokenize (default: one per core, fewer for a small "
                   "corpus; 1: in this process); the output is the same for any N")
    p.add_argument("--shard-tokens", type=positive_int, metavar="N",
                   help="write a split of more tokens than this as shards train-00000.bin, "
                   f"... of N tokens each, listed in meta.json (default {DEFAULT_SHARD_TOKENS})")


PREPARE_DEFAULTS: dict[str, Any] = {
    "out": str(DEFAULT_DATA_DIR),
    "input": None,
    "hf_dataset": None,
    "hf_config": None,
    "hf_split": "train",
    "text_field": "text",
    "vocab_size": None,  # DEFAULT_VOCAB_SIZE unless a tokenizer is given
    "tokenizer": None,
    "val_fraction": DEFAULT_VAL_FRACTION,
    "seed": 0,
    "workers": None,  # one per core (fewer for a small corpus)
    "shard_tokens": DEFAULT_SHARD_TOKENS,
}


def run(args: argparse.Namespace) -> int:
    from subllm.train.data import Terminated, prepare, print_summary, terminate_raises
    from subllm.train.sources import input_paths

    s, extras = resolve_flags(args, args._parser, PREPARE_DEFAULTS, extra_keys=("sources",))
    if s["tokenizer"] is not None and s["vocab_size"] is not None:
        raise SubLLMError("give either vocab-size or tokenizer, not both")
    if not str(s["out"]).strip():
        raise SubLLMError("--out is empty; pass a directory path")
    inputs = _inputs(s, extras.get("sources"), args)
    out = Path(s["out"]).resolve()
    for path in (p for spec in inputs for p in input_paths(spec)):
        i = path.resolve()
        if out == i or i in out.parents:  # the next prepare would read its own outputs
            raise SubLLMError(f"--out {s['out']} is or lies inside the input {path}; write the "
                              "prepared data outside the corpus")
    tok = s["tokenizer"]
    if tok is not None and Path(tok).is_dir() and Path(tok).resolve() == out:
        raise SubLLMError(f"--out {s['out']} is the --tokenizer directory; its tokenizer.json "
                          "would be replaced: write the prepared data elsewhere")
    try:
        with terminate_raises():  # SIGTERM, like Ctrl-C, removes prepare's temporaries
            meta = prepare(
                s["out"], inputs=inputs or None, text_field=s["text_field"],
                vocab_size=s["vocab_size"] or DEFAULT_VOCAB_SIZE, tokenizer=tok,
                val_fraction=s["val_fraction"], seed=s["seed"], hf_dataset=s["hf_dataset"],
                hf_config=s["hf_config"], hf_split=s["hf_split"], workers=s["workers"],
                shard_tokens=s["shard_tokens"],
            )
    except Terminated as e:
        print(f"subllm prepare: terminated by {e}; its temporary files are removed",
              file=sys.stderr)
        return 128 + e.signum
    print_summary(meta, s["out"])
    return 0


def _inputs(s: dict[str, Any], sources: Any, args: argparse.Namespace) -> list[Any]:
    """The inputs (`PATH[:WEIGHT]` parsed): --input, or the config file's `sources:` list
    unless --input or --hf-dataset was typed (flags win)."""
    from subllm.train.sources import parse_input

    inputs = [parse_input(raw) for raw in s["input"] or ()]
    if sources is None or args.input is not None or args.hf_dataset is not None:
        return inputs
    if inputs or s["hf_dataset"] is not None:
        raise SubLLMError(f"{args.config}: give `sources` or `input` / `hf-dataset`, not both")
    return _yaml_sources(sources, args.config)


def _yaml_sources(raw: Any, config: str) -> list[Any]:
    """A config file's `sources:` list, each `{path: P, weight: W}` or `{hf-dataset: NAME,
    weight: W}`, as prepare's inputs."""
    from subllm.train.sources import InputSpec, check_weight

    usage = "{path: PATH, weight: W} or {hf-dataset: NAME, weight: W}"
    if not isinstance(raw, list) or not raw:
        raise SubLLMError(f"{config}: `sources` must be a list of {usage}, got {raw!r}")
    specs = []
    for i, entry in enumerate(raw):
        keys = {str(k).replace("_", "-"): v for k, v in entry.items()} \
            if isinstance(entry, dict) else {}
        where = keys.get("path", keys.get("hf-dataset"))
        if (not keys or set(keys) - {"path", "hf-dataset", "weight"}
                or ("path" in keys) == ("hf-dataset" in keys)
                or not isinstance(where, str) or not where.strip()):
            raise SubLLMError(f"{config}: sources[{i}] must be {usage}, got {entry!r}")
        weight = check_weight(keys["weight"], where) if keys.get("weight") is not None else None
        specs.append(InputSpec(where, weight, hub="hf-dataset" in keys))
    return specs
