"""`subllm train`: the pre-training recipe, read top to bottom.

`train(cfg)` runs three phases. Setup (`setup` -> `TrainState`): the run directory, the
checkpoint to resume, the data, the model config (checked against the checkpoint's), the
model (built on the meta device, given MsT / checkpointing, then in DDP or sharded by FSDP2
/ HSDP: parallel.py), AdamW, the resumed state, config.yaml. Training (`fit`, one
`train_step` per optimizer step): lr, micro-batches, forward and backward with gradient
accumulation, clipping, the optimizer step, its results left on the device until a log step
reads them all at once (non-finite check, metrics.jsonl, TensorBoard); then validation,
signals, --stop-at, and checkpoints (`save`, from checkpoint.py: gathered to rank 0, or
every rank's shards, in the background with --async-checkpoint). Finishing: the last
checkpoint and validation, loss.png, the summary line (and the demo's sample), or, after a
signal, the command that resumes the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from subllm.atomic import dir_lock, write_atomic
from subllm.errors import SubLLMError
from subllm.interop.tokenizer import same_vocab
from subllm.model.config import ModelConfig
from subllm.model.mst import apply_mst, compile_blocks
from subllm.model.subllm import SubLLM, assign_full
from subllm.model.subsample import CUTOFF_BUFFERS, RETIRED_BUFFERS
from subllm.train import checkpoint as ckpt
from subllm.train import parallel

# `fit` calls `save` by this module's name: wrapping subllm.train.loop.save wraps every save
from subllm.train.checkpoint import save
from subllm.train.config import (
    DEFAULT_DATA_DIR,
    DEMO_PROMPT,
    TrainConfig,
    build_model_config,
    check_config,
    init_model_config,
)
from subllm.train.data import (
    TokenData,
    TrainBatches,
    load_data,
    prepare,
    print_summary,
    val_batches,
)
from subllm.train.evaluate import evaluate, fmt_perplexity, packed, sample_text
from subllm.train.load import load_pretrained
from subllm.train.parallel import gate, say
from subllm.train.runtime import (
    Dist,
    RunLog,
    StopFlag,
    accumulator_dtype,
    all_reduce_sum,
    autocast,
    autocast_dtype,
    collective_failure,
    fmt_kept,
    init_distributed,
    load_and_cores,
    peak_memory_gib,
    pick_device,
    plot_loss,
    plot_routing,
    read_sums,
    thread_tip,
)

# ---------------------------------------------------------------------------------------------
# The entry point


def train(cfg: TrainConfig, demo: bool = False, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Train (or resume) a run; returns the final validation metrics ({"nothing_to_train":
    True} for a run resumed at its last step). `notes`: lines to say (rank 0, stderr) once
    setup has passed every check, before the first step."""
    check_config(cfg)
    load = load_and_cores()  # before this run adds to it (preparing the corpus, training)
    dd = init_distributed(cfg.dist_timeout)
    state: TrainState | None = None
    held = contextlib.ExitStack()  # the run directory's lock (rank 0), released at exit
    try:
        state = setup(cfg, dd, demo, held)
        if state.device.type == "cpu" and not dd.enabled and load is not None:
            notes = [*notes, thread_tip(*load, os.environ, torch.get_num_threads())]
        for line in notes:
            if line:
                say(dd, line)
        result = fit(state, state.cfg, dd)
        if dd.enabled:
            state.phase = "the final barrier"
            dist.barrier()  # no rank tears gloo down while another still talks to it
        return result
    except NothingToTrain as e:  # a finished run resumed: said, nothing changed
        say(dd, str(e))
        return {"nothing_to_train": True}
    except RuntimeError as e:
        where = ("setup", 0) if state is None else (state.phase, state.step)
        failure = collective_failure(e, dd, *where, cfg.dist_timeout)
        if failure is None:
            raise
        raise failure from None
    finally:
        held.close()
        if dd.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Setup: everything the loop trains with


@dataclass
class TrainState:
    """What `fit` trains with, as `setup` built it; `step` advances as it trains."""

    cfg: TrainConfig  # the settings in effect (--init-from fills in `model`)
    demo: bool
    data: TokenData
    config: ModelConfig
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype; None = fp32
    run_dir: Path
    raw_model: SubLLM  # the model itself (set_step, num_params, generate)
    model: torch.nn.Module  # what trains: raw_model, in DDP or sharded by FSDP2
    optimizer: torch.optim.Optimizer
    batches: TrainBatches
    eval_set: list[Tensor]
    resume_from: Path | None = None
    start_step: int = 0
    step: int = 0
    last_saved: Path | None = None
    saving: Any = None  # a sharded checkpoint written in the background (ckpt._ShardedSave)
    async_group: Any = None  # the process group of background saves
    last_eval: dict[str, Any] | None = None
    log: RunLog | None = None  # rank 0 only
    phase: str = "setup"  # what the loop is doing, for the error a failed collective gives

    @property
    def eot_id(self) -> int | None:
        """The end-of-text id ending each packed document; None with --packing none."""
        return self.data.eot_id if self.cfg.packing == "documents" else None


def setup(cfg: TrainConfig, dd: Dist, demo: bool = False,
          held: contextlib.ExitStack | None = None) -> TrainState:
    """Data, model config, run directory, model, DDP / FSDP2, optimizer, resume.

    Rank 0 first locks the run directory (creating it) for as long as `held` stays open;
    a setup that fails removes the directories it created (the run directory and any new
    parent of it) and writes no config.yaml.
    Under torchrun every step that can fail on one rank is a `gate`: a failure anywhere
    stops every rank there, at once, instead of the others waiting out the dist-timeout."""
    run_dir = Path(cfg.out)
    held = held if held is not None else contextlib.ExitStack()
    created = gate(dd, "opening the run directory",
                   (lambda: _open_run_dir(run_dir, held)) if dd.main else None)
    try:
        return _setup(cfg, dd, demo)
    except BaseException:
        if created is not None:  # we hold its lock: nobody else is using it
            shutil.rmtree(created, ignore_errors=True)
        raise


def _open_run_dir(run_dir: Path, held: contextlib.ExitStack) -> Path | None:
    """Create and lock the run directory (rank 0 only: only rank 0 writes); the outermost
    directory this call created (the run directory or a parent of it), or None."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SubLLMError(f"--out {run_dir} is a file; pass a directory path")
    created = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SubLLMError(f"cannot write to run directory {run_dir} ({e.strerror}); choose a "
                          "writable --out") from None
    held.enter_context(dir_lock(run_dir, "training process"))
    return created


def _setup(cfg: TrainConfig, dd: Dist, demo: bool) -> TrainState:
    def find() -> tuple[Path | None, dict[str, Any] | None]:
        return _resume_point(cfg, demo, dd)

    # first the checkpoint (or the refusal that there is none): it needs no data, so a bad
    # --resume prepares no default corpus. Rank 0 first: with --skip-damaged it sets damaged
    # checkpoints aside before the others look.
    resume_from, saved = gate(dd, "choosing the checkpoint to resume from",
                              find if dd.main else None) or (None, None)
    if dd.enabled:
        found = gate(dd, "reading the checkpoint to resume from",
                     None if dd.main else find)
        if not dd.main:
            resume_from, saved = found
    if saved is not None:  # before anything is prepared, built or written
        _check_steps_left(cfg, resume_from, int(saved["step"]))
    gate(dd, "preparing the default corpus", (lambda: _prepare_default(cfg, dd))
         if dd.main else None)

    def checks() -> tuple[TokenData, TrainConfig, ModelConfig, Mapping | None, torch.device]:
        data = load_data(Path(cfg.data))
        new_cfg, config, init_weights = _model_config(cfg, data, dd)
        if resume_from is not None:
            new_cfg, config = _resumed_model(new_cfg, config, data, resume_from, dd)
        return data, new_cfg, config, init_weights, pick_device(new_cfg.device, dd)

    data, cfg, config, init_weights, device = gate(dd, "checking the data and settings",
                                                   checks)
    amp = autocast_dtype(cfg.dtype, device)
    if resume_from is not None and ckpt.is_sharded(resume_from):
        weights, fill = None, False  # _restore reads this rank's shards (with the optimizer)
    elif resume_from is not None:
        weights, fill = ckpt.Weights(resume_from), True
    else:
        weights, fill = init_weights, True
    raw_model, model = _build_model(cfg, config, dd, device, amp, weights, fill)
    del init_weights, weights
    if cfg.compile:  # on its device (the check for a compiler depends on it), after sharding
        compile_blocks(raw_model)
    state = TrainState(
        cfg=cfg, demo=demo, data=data, config=config, device=device, amp=amp,
        run_dir=Path(cfg.out), raw_model=raw_model, model=model,
        optimizer=make_optimizer(model, cfg, device),
        batches=TrainBatches(data.tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed,
                             dd.rank, dd.world_size),
        # validation batches of the global micro-batch size: the same tokens for any world size
        eval_set=val_batches(data.tokens("val"), cfg.batch_size * dd.world_size, cfg.seq_len,
                             cfg.eval_batches),
        resume_from=resume_from, last_saved=resume_from)
    if saved is not None:
        _restore(state, saved, dd)
    if dd.main:  # every check passed: only now does the run directory change
        _write_run_config(cfg, data, config)
    _announce(state, dd)
    state.log = RunLog(state.run_dir, state.start_step) if dd.main else None
    return state


# ---------------------------------------------------------------------------------------------
# Setup: the checkpoint to resume from, the data, the model config


def _resume_point(cfg: TrainConfig, demo: bool, dd: Dist
                  ) -> tuple[Path | None, dict[str, Any] | None]:
    """(the checkpoint --resume continues from, its training state); (None, None) for a new
    run. Needs no data: `_resumed_model` checks the checkpoint against the settings."""
    run_dir = Path(cfg.out)
    if not cfg.resume:
        if ckpt.step_dirs(run_dir):
            raise SubLLMError(f"{run_dir} already holds a run; pass --resume to continue it "
                              "or choose a new --out")
        return None, None
    resume_from, saved = _intact_checkpoint(cfg, run_dir, dd)
    if resume_from is None:
        if demo:
            return None, None
        raise SubLLMError(f"--resume: {run_dir} has no complete checkpoint to resume from; "
                          "drop --resume to start a new run")
    return resume_from, saved


def _intact_checkpoint(cfg: TrainConfig, run_dir: Path, dd: Dist
                       ) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that reads whole, and its training state. A damaged newer one
    stops the run with an offer of the intact one; with --skip-damaged rank 0 sets it aside
    (checkpoints/damaged-step-*) and the run resumes from the intact one, with a warning.
    Rank 0 checks each file against the checksums of its manifest (once each); the other
    ranks look only after it has, so they check the rest (`damage(checksums=False)`)."""
    candidates = list(reversed(ckpt.step_dirs(run_dir)))
    whys: dict[Path, str | None] = {}

    def damage(p: Path) -> str | None:
        if p not in whys:
            whys[p] = ckpt.damage(p, checksums=dd.main)
        return whys[p]

    for i, path in enumerate(candidates):
        why = damage(path)
        if why is None:
            try:
                return path, ckpt.load_train_state(path)
            except SubLLMError:
                why = "state.pt cannot be read"
        older = next((p for p in candidates[i + 1:] if damage(p) is None), None)
        if not cfg.skip_damaged:
            offer = (f"the newest intact one is {older.name}: resume from it with --resume "
                     f"--skip-damaged (which moves {path.name} aside to "
                     f"checkpoints/damaged-{path.name})" if older is not None else
                     "no older checkpoint is intact; start a new run with a new --out")
            raise SubLLMError(f"checkpoint {path} is damaged ({why}); {offer}")
        if dd.main:
            aside = ckpt.set_aside(path)
            say(dd, f"warning: checkpoint {path.name} is damaged ({why}); moved to {aside}, "
                + (f"resuming from {older.name}" if older is not None else
                   "and no older one is intact"))
    return None, None


def _check_steps_left(cfg: TrainConfig, resume_from: Path, step: int) -> None:
    """A resumed run that would train no step is refused (--max-steps or --stop-at before
    the checkpoint's step) or said to be done (at it), before the run directory changes:
    neither writes anything, so the run's saved settings stay as they were."""
    end = cfg.max_steps if cfg.stop_at is None else min(cfg.max_steps, cfg.stop_at)
    if end > step:
        return
    flag = "--max-steps" if end == cfg.max_steps else "--stop-at"
    more = (f"pass --max-steps above {step} to train on" if flag == "--max-steps" else
            "pass a later --stop-at, or none, to train on")
    if end == step:
        raise NothingToTrain(f"{cfg.out} is already at step {step} ({flag} {end}): nothing to "
                             f"train; {more}")
    if flag == "--max-steps":  # the schedule's length: say what the run had
        more += (f" (it sets the schedule's length; the run's is "
                 f"{ckpt.load_train_config(resume_from).get('max_steps', 'unknown')})")
    raise SubLLMError(f"{flag} {end} is below step {step} of the checkpoint to resume "
                      f"({resume_from}): the run is past it; {more}")


class NothingToTrain(Exception):
    """A resumed run already at its last step: `train` says so and returns, changing
    nothing."""


def _prepare_default(cfg: TrainConfig, dd: Dist) -> None:
    """The default corpus is prepared on first use (rank 0)."""
    data_dir = Path(cfg.data)
    if not (data_dir / "meta.json").exists() and data_dir == DEFAULT_DATA_DIR:
        say(dd, f"preparing the default corpus (Python standard library) into {data_dir}")
        print_summary(prepare(data_dir), data_dir)


def _model_config(cfg: TrainConfig, data: TokenData, dd: Dist
                  ) -> tuple[TrainConfig, ModelConfig, Mapping[str, Tensor] | None]:
    """(the settings, the model config, --init-from's weights or None)."""
    if cfg.init_from is None:
        return cfg, build_model_config(cfg, data), None
    # a new run from a model's weights (fresh optimizer, step 0)
    init_config, init_weights, init_tokenizer = load_pretrained(cfg.init_from)
    config = init_model_config(cfg, data, init_config)
    cfg = dataclasses.replace(cfg, model=config.to_dict(), keep=None)
    if init_tokenizer is not None and not same_vocab(init_tokenizer, data.tokenizer_path):
        say(dd, f"warning: {data.path} was tokenized with another tokenizer than the "
            f"model in {cfg.init_from}; its token ids mean different things there")
    return cfg, config, init_weights


def _resumed_model(cfg: TrainConfig, config: ModelConfig, data: TokenData, resume_from: Path,
                   dd: Dist) -> tuple[TrainConfig, ModelConfig]:
    """(the settings, the model config) a resumed run continues with: the checkpoint's model.

    A model setting this call changes (a flag, --config) is refused. One that only today's
    code builds differently from the run's own settings (a run saved by an older subllm: a
    field added since, whose default is not what the run was trained with, or a changed
    default) keeps the run's value, said in one line, and goes into `model` so that the
    run's config.yaml builds it from now on."""
    run_dir = Path(cfg.out)
    # the data first: re-prepared data changes vocab_size too, but the data is the cause
    old_train = ckpt.load_train_config(resume_from)
    old_sha = old_train.get("data_tokenizer_sha256")
    if old_sha not in (None, data.meta["tokenizer_sha256"]):
        was = old_train.get("data")
        raise SubLLMError(
            f"{data.path} was tokenized with a different tokenizer than the run in {run_dir} "
            f"(it was re-prepared, or is another data directory); resume with the data the "
            f"run was trained on{f' ({was})' if was else ''}, or start a new run with a new "
            "--out")
    old = ModelConfig.from_dict(ckpt.load_model_config(resume_from)).to_dict()
    new = config.to_dict()
    if new == old:
        return cfg, config
    diff = [k for k, v in new.items() if old.get(k) != v]
    if new == _rebuilt(old_train, data):  # this call asks for no change: the code changed
        kept = {k: old[k] for k in diff}
        cfg = dataclasses.replace(cfg, model={**cfg.model, **kept})
        config = build_model_config(cfg, data)
        if config.to_dict() == old:
            say(dd, f"warning: {run_dir} was saved by an older subllm; it continues with the "
                "model settings it was trained with: " + ", ".join(
                    f"{k} {old[k]!r} (new runs: {new[k]!r})" for k in diff))
            return cfg, config
    raise SubLLMError(
        f"the model settings differ from the checkpoint's ({', '.join(diff)}); resume "
        "with the settings of the run (or start a new run with a new --out)")


def _rebuilt(saved: dict[str, Any], data: TokenData) -> dict[str, Any] | None:
    """The model config a run's saved settings (a checkpoint's train_config.yaml) build
    with today's code, as a dict; None where they no longer build one."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in keys})
        return build_model_config(cfg, data).to_dict()
    except (SubLLMError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Setup: the model, its optimizer, the resumed state, config.yaml


def _build_model(cfg: TrainConfig, config: ModelConfig, dd: Dist, device: torch.device,
                 amp: torch.dtype | None, weights: Mapping[str, Tensor] | None, fill: bool
                 ) -> tuple[SubLLM, torch.nn.Module]:
    """(the SubLLM, what trains: it, in DDP, or itself sharded by FSDP2).

    Built on the meta device (no memory), given MsT / checkpointing, sharded (FSDP2), and
    only then allocated on `device`: this rank's shards, or the whole model (one process,
    DDP). Then filled: from `weights` one tensor at a time (a checkpoint, --init-from), or
    each parameter from its own seed, so one process and any number of shards start from
    the same values (`SubLLM.init_weights(seed=...)`); fill=False leaves it to `_restore`."""
    torch.manual_seed(cfg.seed)  # what training draws from (the weights have their own seeds)
    with torch.device("meta"):
        model = SubLLM(config)
    if cfg.mst:
        apply_mst(model, checkpointing=cfg.checkpointing)
    if cfg.checkpointing:
        model.gradient_checkpointing = True
    if parallel.sharded(cfg, dd):
        parallel.shard(model, cfg, dd, device, amp)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty made two tensors of the tied one
    if weights is not None:
        _load_weights(model, weights, cfg)
    elif fill:
        model.init_weights(seed=cfg.seed)
    if dd.enabled and not parallel.sharded(cfg, dd):
        return model, parallel.ddp(model, device)
    return model, model


@torch.no_grad()
def _load_weights(model: SubLLM, weights: Mapping[str, Tensor], cfg: TrainConfig) -> None:
    """Fill every parameter and buffer from `weights`, one full tensor read at a time, each
    rank keeping its own shard (`assign_full`). Weights saved by an older subllm, before
    the subsamplers' cut-off buffers existed, get them as `SubLLM.load_state_dict` does:
    zeros (cut-off 0 is exactly the rule such a model was trained and decided with); the
    buffers of retired mechanisms are left out, as there."""
    where = f"--init-from {cfg.init_from}" if cfg.init_from else "the checkpoint"
    targets = model.state_dict(keep_vars=True)  # tied weights under both names
    added = {k for k in targets if k not in weights and k.startswith("subsamplers.")
             and k.rsplit(".", 1)[-1] in CUTOFF_BUFFERS}
    missing = [k for k in targets if k not in weights and k not in added]
    unexpected = [k for k in weights if k not in targets and not (
        k.startswith("subsamplers.") and k.rsplit(".", 1)[-1] in RETIRED_BUFFERS)]
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"unexpected {', '.join(unexpected[:3])}")
        raise SubLLMError(f"{where}: its weights do not fit its model config ({what})")
    for name, t in targets.items():
        full = torch.zeros(()) if name in added else weights[name]
        if tuple(full.shape) != tuple(t.shape):
            raise SubLLMError(f"{where}: its weights do not fit its model config ({name} has "
                              f"shape {tuple(full.shape)}, the model {tuple(t.shape)})")
        assign_full(t, full)
        del full


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device
                   ) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices (linear and embedding weights) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def _restore(state: TrainState, saved: dict[str, Any], dd: Dist) -> None:
    """Continue exactly where the checkpoint left off: optimizer, data position, RNG, step.

    A sharded checkpoint (format 2): every rank reads only the pieces of the weights and
    optimizer state it holds (any number of processes: DCP reshards; one process or DDP:
    the whole of them). An unsharded one: the optimizer state keyed by name (the weights
    were read by _build_model).

    A parameter that has had no gradient yet (frozen by --train-only-routers) has no
    optimizer state, saved or not: it stays without, as in a run never stopped, and AdamW
    creates it at its first update."""
    if ckpt.is_sharded(state.resume_from):
        _init_adamw_state(state.optimizer)
        shards = state.resume_from / ckpt.SHARDED
        sd = {"model": get_model_state_dict(state.model),
              "optim": get_optimizer_state_dict(state.model, state.optimizer)}
        saved_keys = dcp.FileSystemReader(str(shards)).read_metadata().state_dict_metadata
        sd["optim"]["state"] = {name: s for name, s in sd["optim"]["state"].items()
                                if f"optim.state.{name}.exp_avg" in saved_keys}
        ckpt.read_shards(sd, shards, no_dist=not dd.enabled,
                         then=f"move it out of {ckpt.CHECKPOINTS}/ and resume from an older one")
        set_model_state_dict(state.model, sd["model"])
        set_optimizer_state_dict(state.model, state.optimizer, sd["optim"],
                                 options=StateDictOptions(strict=False))
    else:
        options = StateDictOptions(full_state_dict=parallel.sharded(state.cfg, dd), strict=False)
        set_optimizer_state_dict(state.model, state.optimizer, saved["optimizer"],
                                 options=options)
    state.batches.load_state_dict(saved["data"])
    rngs = saved["rng"]
    ckpt.set_rng_state(rngs[dd.rank] if dd.rank < len(rngs) else rngs[0])
    state.start_step = state.step = int(saved["step"])


@torch.no_grad()
def _init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as its first step creates it (zeros), for DCP to load into in place.
    DCP's get_optimizer_state_dict would create it by a step at lr 0 on zero gradients:
    a full set of gradients more at the peak of a resume (+1/3 of weights + optimizer)."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32,
                                    device=p.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def _write_run_config(cfg: TrainConfig, data: TokenData, config: ModelConfig) -> None:
    """The run directory and its config.yaml (rank 0)."""
    run_dir = Path(cfg.out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_tmp(run_dir)
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(
            {**ckpt.run_config(cfg, data), "model_config": config.to_dict()}, sort_keys=False))
    except OSError as e:
        raise SubLLMError(f"cannot write to run directory {run_dir} ({e.strerror}); choose a "
                          "writable --out") from None


def _announce(state: TrainState, dd: Dist) -> None:
    cfg, config = state.cfg, state.config
    what = "SUBLLM" if config.is_subllm else "LLaMA"
    mode = f", {dd.world_size} x {cfg.distributed.upper()}" if dd.enabled else ""
    if parallel.sharded(cfg, dd) and cfg.replicate > 1:
        mode = f", {dd.world_size} x HSDP ({cfg.replicate} replicas x " \
               f"{dd.world_size // cfg.replicate} shards)"
    name = f"from {cfg.init_from}" if cfg.init_from else cfg.preset
    say(dd, f"{what} {name} {config.structure} ({state.raw_model.num_params() / 1e6:.2f}M "
        f"params) on {state.device}{mode}, {'bf16' if state.amp else 'fp32'}; global batch "
        f"{_global_batch(cfg, dd)} x {cfg.seq_len} tokens"
        f"{' packed from documents' if state.eot_id is not None else ''}; "
        + (f"resuming from {state.resume_from} (step {state.start_step})" if state.resume_from
           else f"run directory {state.run_dir}"))


def _global_batch(cfg: TrainConfig, dd: Dist) -> int:
    return cfg.batch_size * cfg.grad_accum * dd.world_size


# ---------------------------------------------------------------------------------------------
# One training step


@dataclass
class StepResult:
    """One optimizer step's numbers, left on the device: read them when you log them."""

    loss: Tensor  # this rank's mean loss over the micro-batches (fp64 scalar; fp32 on MPS)
    kept: list[Tensor]  # per subsampling module, tokens kept per row in the last micro-batch
    entered: list[Tensor]  # per subsampling module, tokens entering it per row (ditto)
    grad_norm: Tensor | None  # total gradient norm before clipping; None: not measured


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[Tensor], *, device: torch.device,
               amp: torch.dtype | None = None, grad_clip: float | None = 0.0,
               lr: float | None = None,
               no_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
               frozen: Sequence[torch.nn.Parameter] = (),
               eot_id: int | None = None,
               ) -> StepResult:
    """One optimizer step on the (B, L) token batches `micro_batches`, without a host sync.

    Each micro-batch runs forward with labels = inputs (any model whose output has `.loss`)
    under `amp` autocast and backward with its loss divided by their number (the gradient
    of the mean); then the gradients are clipped to norm `grad_clip` (0: the norm is
    measured, nothing clipped; None: neither), the optimizer steps (at `lr` when given)
    and the gradients are set to None. `no_sync(last_micro)` gives the context each
    micro-batch runs in (DDP: skip the all-reduce but on the last). The gradients of
    `frozen` are dropped before clipping, so the optimizer leaves those parameters alone
    (no update, no weight decay, no moments): --train-only-routers. `eot_id`: the rows are
    packed documents, each ending with this token (--packing documents).
    """
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    n = len(micro_batches)
    loss_sum = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    kept: list[Tensor] = []
    entered: list[Tensor] = []
    for i, batch in enumerate(micro_batches):
        x = batch.to(device, non_blocking=True)
        with no_sync(i == n - 1) if no_sync is not None else contextlib.nullcontext():
            with autocast(device, amp):
                out = model(x, labels=x, **packed(x, eot_id, batch))
                loss = out.loss / n
            kept, entered = _detached(out, "kept"), _detached(out, "entered")
            del out  # the logits go now, not after the optimizer step (peak memory)
            loss.backward()
        loss_sum += loss.detach().to(loss_sum.dtype)
    for p in frozen:  # after the backward (and DDP's all-reduce), so every rank agrees
        p.grad = None
    grad_norm = None
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, kept, entered, grad_norm)


def non_router_params(model: SubLLM) -> list[torch.nn.Parameter]:
    """Every parameter but the scorers' and the bypass scales (--train-only-routers)."""
    routers = {id(p) for m in (*model.subsamplers, *model.bypasses) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in routers]


def _detached(out: Any, name: str) -> list[Tensor]:
    return [t.detach() for t in (getattr(out, name, None) or [])]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to --lr, then cosine decay to --min-lr at --max-steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# The loop


def fit(state: TrainState, cfg: TrainConfig, dd: Dist) -> dict[str, Any]:
    """Train from state.step to --max-steps (or --stop-at); the final validation metrics.

    `cfg` is the settings `setup` resolved (state.cfg)."""
    end = cfg.max_steps if cfg.stop_at is None else min(cfg.max_steps, cfg.stop_at)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step",
               disable=not dd.main, dynamic_ncols=True, file=sys.stderr)
    no_sync = parallel.no_sync(state.model, cfg, dd)
    pending = _Pending()
    state.model.train()
    try:
        with StopFlag() as stop:
            while state.step < end:
                pending.start()
                lr = lr_at(state.step, cfg)
                state.raw_model.set_step(state.step)
                micro = [state.batches.next() for _ in range(cfg.grad_accum)]
                state.phase = "a training step"
                frozen = (non_router_params(state.raw_model)
                          if state.step < cfg.train_only_routers else ())
                result = train_step(state.model, state.optimizer, micro, device=state.device,
                                    amp=state.amp, grad_clip=cfg.grad_clip, lr=lr,
                                    no_sync=no_sync, frozen=frozen, eot_id=state.eot_id)
                _sync_cutoffs(state.raw_model, dd)
                state.step += 1
                pending.add(state.step, lr, result)
                bar.update(1)
                state.phase = "logging"
                if state.step % cfg.log_every == 0 or state.step == end:
                    _log_train(state, _read(pending, state, dd), bar, dd)
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    _read(pending, state, dd)  # nothing non-finite gets evaluated
                    state.phase = "validation"
                    # the last one is said by the summary line (_finish), once
                    state.last_eval = _eval_and_log(state, dd, state.log,
                                                    aloud=state.step != end)
                state.phase = "the stop-signal check"
                stopping = _agree(stop.signum is not None, dd, state.device)
                save_now = bool(cfg.save_every) and state.step % cfg.save_every == 0
                if save_now or stopping or state.step == end:
                    _read(pending, state, dd)  # nothing non-finite gets saved
                    state.phase = "saving a checkpoint"
                    last = stopping or state.step == end
                    state.last_saved = save(state, dd, cfg.async_checkpoint and not last)
                if stopping and state.step < end:  # at the end: saved, finished
                    return _interrupted(state, stop.signum, dd)
        bar.close()
        state.phase = "the final validation"
        if state.last_eval is None or state.last_eval["step"] != state.step:
            # nothing to log when this call trained no step (resuming a finished run)
            state.last_eval = _eval_and_log(
                state, dd, state.log if state.step > state.start_step else None, aloud=False)
    finally:
        bar.close()
        if state.log is not None:
            state.log.close()
            plot_loss(state.run_dir)
            if state.config.is_subllm:
                segments = sorted(state.config.segments, key=lambda g: g.index)
                plot_routing(state.run_dir, state.config.keep_per_depth,
                             [g.depth for g in segments], _held_band(state.config))
    return _finish(state, dd)


def _held_band(config: ModelConfig) -> float | None:
    """The share around keep that inference's selection is held in (the rank rule's
    budget band), or None where there is none."""
    return config.rank_band if config.threshold == "rank" else None


@dataclass
class _Pending:
    """The steps since the last read, their results still on the device."""

    steps: list[tuple[int, float, StepResult]] = field(default_factory=list)
    since: float = 0.0  # time.perf_counter() at the start of the first of them

    def start(self) -> None:
        if not self.steps:
            self.since = time.perf_counter()

    def add(self, step: int, lr: float, result: StepResult) -> None:
        self.steps.append((step, lr, result))


def _read(pending: _Pending, state: TrainState, dd: Dist) -> dict[str, Any] | None:
    """Read the pending steps with one host sync (and one all-reduce); the metrics record
    of the last of them. Stops at the first non-finite loss or gradient norm, unsaved."""
    if not pending.steps:
        return None
    steps, pending.steps = pending.steps, []
    n = len(steps)
    last = steps[-1][2]
    kept_sums = [t.sum() for t in last.kept] + [t.sum() for t in last.entered]
    values = read_sums([r.loss for _, _, r in steps], dd, state.device,
                       local=[r.grad_norm for _, _, r in steps] + kept_sums)
    losses = [v / dd.world_size for v in values[:n]]
    norms = values[n : 2 * n]
    for (step, _, _), loss, norm in zip(steps, losses, norms, strict=True):
        _check_finite(loss, norm, step, state.last_saved)
    m = len(last.kept)
    kept = [k / max(e, 1.0) for k, e in zip(values[2 * n : 2 * n + m], values[2 * n + m :],
                                             strict=True)]
    tokens_per_step = _global_batch(state.cfg, dd) * state.cfg.seq_len
    step, lr = steps[-1][0], steps[-1][1]
    record = {"step": step, "train_loss": losses[-1], "lr": lr, "grad_norm": norms[-1],
              "tokens_per_s": n * tokens_per_step / (time.perf_counter() - pending.since),
              "tokens_seen": step * tokens_per_step, "epoch": state.batches.epoch,
              "memory_gib": peak_memory_gib(state.device)}
    if kept:
        record["kept_fractions"] = kept
    return record


def _sync_cutoffs(model: SubLLM, dd: Dist) -> None:
    """Each rank records the top-k cut-offs of its own batches (design.md §3.8); sum them
    over the ranks, so every rank folds the same mean into the same calibrated threshold
    (FSDP keeps buffers per rank; DDP would otherwise use rank 0's alone)."""
    subs = [sub for sub in model.subsamplers if sub.calibrated]
    if not dd.enabled or not subs:
        return
    t = torch.stack([x for sub in subs for x in (sub.pending_sum, sub.pending_count)])
    dist.all_reduce(t)
    for i, sub in enumerate(subs):
        sub.pending_sum.copy_(t[2 * i])
        sub.pending_count.copy_(t[2 * i + 1])


def _check_finite(loss: float, grad_norm: float, step: int, last_saved: Path | None) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    value = loss if what == "loss" else grad_norm
    where = (f"the last good checkpoint is {last_saved} (continue with --resume)"
             if last_saved else "no checkpoint was saved yet")
    raise SubLLMError(f"{what} became {value} at step {step}; stopped without saving, "
                      f"{where}; lower --lr or raise --warmup")


def _log_train(state: TrainState, record: dict[str, Any] | None, bar: tqdm, dd: Dist) -> None:
    """The progress bar's numbers, a metrics.jsonl line and TensorBoard scalars (rank 0)."""
    if not dd.main or record is None:
        return
    postfix = {"loss": f"{record['train_loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
    if "kept_fractions" in record:
        postfix["kept"] = fmt_kept(record["kept_fractions"])
    bar.set_postfix(postfix, refresh=False)
    state.log.write(record)


def _agree(flag: bool, dd: Dist, device: torch.device) -> bool:
    """Any rank's stop request stops all ranks at the same step."""
    return all_reduce_sum([float(flag)], dd, device)[0] > 0 if dd.enabled else flag


def _eval_and_log(state: TrainState, dd: Dist, log: RunLog | None, aloud: bool = True
                  ) -> dict[str, Any]:
    """Validate at this step; with a `log`, write its record and (`aloud`) its line."""
    result = evaluate(state.model, state.eval_set, state.device, state.amp, dd,
                      eot_id=state.eot_id)
    result["step"] = state.step
    if log is not None:
        record = {"step": state.step, "val_loss": result["loss"],
                  "val_perplexity": result["perplexity"]}
        if result["kept_fractions"]:
            record["val_kept_fractions"] = result["kept_fractions"]
        if "top_k_loss" in result:
            record.update(val_top_k_loss=result["top_k_loss"], val_gap=result["gap"],
                          val_top_k_kept_fractions=result["top_k_kept_fractions"])
        log.write(record)
        if aloud:
            kept = (f", kept {fmt_kept(result['kept_fractions'])}, train/inference gap "
                    f"{100 * result['gap']:+.2f} %" if "gap" in result else "")
            say(dd, f"step {state.step}: val loss {result['loss']:.4f}, perplexity "
                f"{fmt_perplexity(result['loss'])}{kept}")
    return result


# ---------------------------------------------------------------------------------------------
# Finishing


def _interrupted(state: TrainState, signum: int | None, dd: Dist) -> dict[str, Any]:
    name = signal.Signals(signum or signal.SIGTERM).name
    say(dd, f"\n{name}: saved {state.last_saved} at step {state.step}; continue with: "
        f"{_continue_command(state)}")
    return {"interrupted": True, "step": state.step, "signal": signum}


def _continue_command(state: TrainState) -> str:
    """The command that resumes this run (its saved settings come with --resume)."""
    return f"subllm train --out {shlex.quote(str(state.run_dir))} --resume"


def _finish(state: TrainState, dd: Dist) -> dict[str, Any]:
    """The summary line (and the demo's sample); the result of `train`."""
    last_eval, last_saved = state.last_eval, state.last_saved
    if dd.main:
        kept_txt = ""
        if last_eval["kept_fractions"]:  # a SUBLLM: with training's selection too (the gap)
            keep = "/".join(f"{k:g}" for k in state.config.keep_per_depth)
            kept_txt = (f", eval kept fractions {fmt_kept(last_eval['kept_fractions'])} "
                        f"(keep {keep})")
        if "gap" in last_eval:
            kept_txt += f", train/inference gap {100 * last_eval['gap']:+.2f} %"
        print(f"step {state.step}: val loss {last_eval['loss']:.4f}, perplexity "
              f"{fmt_perplexity(last_eval['loss'])}{kept_txt}; checkpoint {last_saved}",
              flush=True)
        if state.cfg.stop_at is not None and state.step < state.cfg.max_steps:
            say(dd, f"stopped at step {state.step} (--stop-at); continue with: "
                f"{_continue_command(state)}")
        if state.demo:
            print("sample:", flush=True)
            print(DEMO_PROMPT + sample_text(state.raw_model, state.data.tokenizer_path,
                                            DEMO_PROMPT, max_new_tokens=120,
                                            device=state.device), flush=True)
    return {**last_eval, "checkpoint": str(last_saved) if last_saved else None}
