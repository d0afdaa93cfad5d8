"""`subllm train`: resolve and check the settings, then run the training loop.

Settings merge lowest first: defaults < the saved run (with --resume) < YAML --config <
flags typed on the command line. The YAML file is read once. Everything here is light
(no torch), so a bad flag, key or value fails in a fraction of a second; the loop
(`subllm.train.loop`) is imported only to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import yaml

from subllm.errors import SubLLMError
from subllm.flags import (
    explicit_flags,
    file_settings,
    non_empty_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_flags,
)
from subllm.train.config import (
    DEFAULT_RUN_DIR,
    DEMO,
    DEMO_PROMPT,
    TrainConfig,
    check_config,
)

DESCRIPTION = ("Pre-train a model on a prepared data directory. With no arguments: prepare "
               "the Python standard library into ./data/default and train the tiny SUBLLM "
               "preset into ./runs/default for a few CPU minutes. Without --data and --config "
               "the demo's settings are the defaults (`demo` below) and a flag changes only "
               "what it names. Under torchrun: DDP or FSDP2.")


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--config", type=non_empty_path, metavar="FILE",
                   help="YAML file whose keys are these flag names (flags win); "
                   "a `model:` section overrides ModelConfig fields of the preset "
                   "(default: none)")
    specs: list[tuple[str, Any, str, str]] = [
        ("data", non_empty_path, "DATA_DIR", "prepared data directory"),
        ("out", non_empty_path, "RUN_DIR", "run directory (checkpoints, metrics, TensorBoard, "
         "loss.png)"),
        ("preset", str, "NAME", "model preset (subllm-tiny, llama-tiny, subllm-small, ...)"),
        ("structure", str, "S", "structure string over T ( ), e.g. TTT(TT(TT)TT)TTT "
         "(default: the preset's)"),
        ("keep", str, "K", "keep ratio, or one per depth: 0.64,0.5 (default: the preset's)"),
        ("seq_len", positive_int, "N", "tokens per training sequence"),
        ("batch_size", positive_int, "N", "sequences per micro-batch per device"),
        ("grad_accum", positive_int, "N", "micro-batches per optimizer step"),
        ("max_steps", positive_int, "N", "optimizer steps (the lr schedule's length)"),
        ("stop_at", positive_int, "STEP", "save and exit after this step, to continue later "
         "with --resume (default: run to --max-steps)"),
        ("lr", positive_float, "F", "peak learning rate"),
        ("min_lr", non_negative_float, "F", "learning rate at the end of the cosine"),
        ("warmup", non_negative_int, "N", "linear warm-up steps"),
        ("weight_decay", non_negative_float, "F", "AdamW weight decay (matrices only)"),
        ("grad_clip", non_negative_float, "F", "gradient-norm clipping (0: off)"),
        ("eval_every", non_negative_int, "N", "validate every N steps (0: at the end only)"),
        ("eval_batches", positive_int, "N", "validation batches"),
        ("save_every", non_negative_int, "N", "checkpoint every N steps (0: at the end only)"),
        ("keep_checkpoints", positive_int, "N", "keep the newest N checkpoints"),
        ("log_every", positive_int, "N", "write metrics every N steps"),
        ("seed", int, "N", "seed of the weights and the data order"),
        ("init_from", non_empty_path, "DIR", "start a new run from the weights and model "
         "config of a Hugging Face SubLLM directory (subllm export / convert) or a `subllm "
         "train` run (default: fresh weights from --seed)"),
        ("train_only_routers", non_negative_int, "N", "router warm-up: for the first N steps "
         "train only the scorers and bypass scales, the blocks stay as they are"),
        ("device", str, "D", "auto, cpu, cuda, cuda:1, ..."),
    ]
    for dest, kind, metavar, text in specs:
        default = getattr(d, dest)
        shown = f" (default {default})" if default is not None else ""
        if dest in DEMO and DEMO[dest] != default:
            shown = f" (default {default}; demo {DEMO[dest]})"
        p.add_argument(_flag_name(dest), dest=dest, type=kind, metavar=metavar,
                       help=text + shown)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype; auto = bf16 on GPUs that have it, else fp32 "
                   "(default auto)")
    p.add_argument("--packing", choices=("documents", "none"),
                   help="documents: rows packed from whole documents that neither attend to "
                   "nor route through each other, positions restarting at each; none: plain "
                   f"windows of the token stream (default {d.packing}; a run from before "
                   "this setting resumes with none)")
    p.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="data-parallel engine under torchrun (default ddp)")
    p.add_argument("--replicate", type=positive_int, metavar="R",
                   help="with --distributed fsdp: HSDP, R replicas of shard groups of "
                   "processes/R (e.g. one group per node; default 1: plain FSDP)")
    p.add_argument("--async-checkpoint", dest="async_checkpoint", action="store_true",
                   default=None, help="with --distributed fsdp: write each sharded checkpoint "
                   "in the background while training goes on (one at a time)")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=positive_float, metavar="S",
                   help="under torchrun: seconds a collective waits for the other ranks before "
                   "the run stops with an error naming the step (default 600)")
    p.add_argument("--mst", action="store_true", default=None,
                   help="Mini-Sequence Transformer: chunked MLP and loss")
    p.add_argument("--checkpointing", action="store_true", default=None,
                   help="activation checkpointing of every block")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile every block for the training steps (evaluation and "
                   "sampling stay eager); needs a C++ compiler on a CPU, Triton on a GPU")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its newest complete checkpoint")
    p.add_argument("--skip-damaged", dest="skip_damaged", action="store_true", default=None,
                   help="with --resume: when the newest checkpoint is damaged, move it aside "
                   "(checkpoints/damaged-step-*) and resume from the newest intact one")


def run(args: argparse.Namespace) -> int:
    cfg, demo, note = _resolve(args, args._parser)
    check_config(cfg)  # before torch is imported: bad values fail fast
    from subllm.train.loop import train

    t0 = time.perf_counter()
    # said once setup has passed every check (a failing run says only what failed)
    notes = [line for line in (note, warmup_warning(cfg)) if line]
    result = train(cfg, demo=demo, notes=notes)
    if result.get("nothing_to_train"):  # a finished run resumed: said so, nothing changed
        if demo:
            print(next_steps(cfg), flush=True)
        return 0
    if demo and not result.get("interrupted"):
        print(f"demo finished in {time.perf_counter() - t0:.0f} s", flush=True)
        print(next_steps(cfg), flush=True)
    if result.get("interrupted"):
        return 128 + int(result["signal"] or signal.SIGTERM)
    return 0


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser
            ) -> tuple[TrainConfig, bool]:
    """(the training settings, whether this is the no-argument demo)."""
    cfg, demo, _ = _resolve(args, parser)
    return cfg, demo


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser
             ) -> tuple[TrainConfig, bool, str | None]:
    """(the settings, whether this is the no-argument demo, the line that says which settings
    a run on the built-in corpus uses when flags change the demo's, else None).

    On the built-in corpus (no --data, no --config) the demo's settings are the defaults, so
    `subllm train --log-every 5` is the demo with that one change."""
    from_file = file_settings(args, parser, extra_keys=("model",))
    typed = explicit_flags(args, parser)
    given = {**from_file[0], **typed}  # what the user asked for, file or flags
    demo = args.config is None and not typed
    on_demo = args.config is None and "data" not in typed  # the built-in corpus
    defaults: dict[str, Any] = dataclasses.asdict(TrainConfig())
    if on_demo:
        defaults.update(DEMO)
    if demo:
        from subllm.train.checkpoint import latest_checkpoint

        defaults["resume"] = latest_checkpoint(DEFAULT_RUN_DIR) is not None
    # --resume continues with the run's saved settings unless the command line says otherwise.
    base = None
    if given.get("resume"):
        saved = Path(given.get("out") or defaults["out"]) / "config.yaml"
        if saved.is_file():
            base = yaml.safe_load(saved.read_text()) or {}
            base.setdefault("packing", "none")  # a run from before packing: as it trained
    settings, extras = resolve_flags(args, parser, defaults, base=base, from_file=from_file)
    model = extras["model"] if "model" in extras else (base or {}).get("model")
    cfg = TrainConfig(**{**settings, "model": model or {}})
    if cfg.distributed != "fsdp":  # an FSDP run resumed under DDP: its FSDP-only settings go
        for key, off in (("replicate", 1), ("async_checkpoint", False)):
            if key not in given:
                setattr(cfg, key, off)
    if cfg.init_from is not None and "preset" in given:
        raise SubLLMError("--preset does not go with --init-from: the model is that of "
                          f"{cfg.init_from}")
    note = _demo_note(typed) if on_demo and not demo and base is None else None
    return cfg, demo, note


def _demo_note(typed: dict[str, Any]) -> str:
    """`demo settings (no --data or --config) with --log-every 5: max-steps 300, ...`: the
    flags typed, then the demo's settings that differ from the generic defaults and stay."""

    def show(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    flags = " ".join(_flag_name(k) if v is True else f"{_flag_name(k)} {shlex.quote(str(v))}"
                     for k, v in typed.items())
    generic = TrainConfig()
    kept = ", ".join(f"{_flag_name(k)[2:]} {show(v)}" for k, v in DEMO.items()
                     if k not in typed and v != getattr(generic, k))
    return f"demo settings (no --data or --config) with {flags}" + (f": {kept}" if kept else "")


def warmup_warning(cfg: TrainConfig) -> str | None:
    """A warm-up as long as the run: the learning rate never gets to --lr and never decays."""
    if cfg.warmup < cfg.max_steps:
        return None
    reach = (f"reaches --lr {cfg.lr:g} only at the last step" if cfg.warmup == cfg.max_steps
             else f"never reaches --lr {cfg.lr:g} (it ends at "
                  f"{cfg.lr * cfg.max_steps / cfg.warmup:.3g})")
    return (f"warning: --warmup {cfg.warmup} is not shorter than --max-steps {cfg.max_steps}: "
            f"the learning rate {reach} and never decays to --min-lr; lower --warmup (e.g. "
            f"{max(1, cfg.max_steps // 10)}) or raise --max-steps")


def next_steps(cfg: TrainConfig) -> str:
    """What to run after the demo, with its paths (printed after `demo finished`)."""
    run = shlex.quote(cfg.out)
    return "\n".join([
        "next:",
        f'  subllm generate --checkpoint {run} --prompt "{DEMO_PROMPT}"   # more text',
        f"  subllm eval --checkpoint {run}   # validation loss, perplexity, kept fractions",
        f"  subllm export --checkpoint {run} --out hf-out   # a Hugging Face model directory",
        f"  plots: {Path(cfg.out) / 'loss.png'}, {Path(cfg.out) / 'routing.png'}; "
        f"tensorboard --logdir {shlex.quote(str(Path(cfg.out) / 'tb'))}",
        "train on your own text:",
        "  subllm prepare --input my_corpus/ --out data/mine",
        "  subllm train --data data/mine --out runs/mine",
    ])
