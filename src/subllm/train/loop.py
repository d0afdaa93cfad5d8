"""`subllm train`: the pre-training recipe, one plain loop from top to bottom.

    settings (defaults < saved run < YAML --config < flags) -> data -> model config
    -> run directory -> model (+ MsT / checkpointing) -> DDP or FSDP2 -> AdamW
    -> resume -> loop { micro-batches with grad accumulation, clip, step, log,
    eval, checkpoint, signals } -> final checkpoint, eval, loss.png

Launched with torchrun it trains data-parallel: DDP by default, FSDP2 (`fully_shard`) with
`--distributed fsdp`; gloo on CPU, NCCL on GPU. Every rank builds the same model from the
same seed; rank r reads its own slice of each global batch (data.TrainBatches); only
rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from subllm.errors import SubLLMError
from subllm.interop.tokenizer import same_vocab
from subllm.model.config import ModelConfig
from subllm.model.mst import apply_mst
from subllm.model.subllm import SubLLM
from subllm.train import checkpoint as ckpt
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
from subllm.train.evaluate import evaluate, sample_text
from subllm.train.load import load_pretrained
from subllm.train.runtime import (
    Dist,
    RunLog,
    StopFlag,
    all_reduce_sum,
    autocast,
    autocast_dtype,
    fmt_kept,
    init_distributed,
    peak_memory_gib,
    pick_device,
    plot_loss,
)

# ---------------------------------------------------------------------------------------------
# Optimisation


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to --lr, then cosine decay to --min-lr at --max-steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


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


# ---------------------------------------------------------------------------------------------
# Evaluation


# ---------------------------------------------------------------------------------------------
# Logging (rank 0 only)


# ---------------------------------------------------------------------------------------------
# Signals


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         batches: TrainBatches, config: Any, cfg: TrainConfig, data: TokenData, dd: Dist
         ) -> Path | None:
    """Collective: every rank calls it; rank 0 writes. Returns the path on rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng = [ckpt.rng_state()]
    if dd.enabled:
        rng = [None] * dd.world_size
        dist.all_gather_object(rng, ckpt.rng_state())
    path = None
    if dd.main:
        train_state = {"format": 1, "optimizer": optim_state, "data": batches.state_dict(),
                       "rng": rng, "world_size": dd.world_size}
        path = ckpt.save_checkpoint(run_dir, step, model_state, train_state, config.to_dict(),
                                    run_config(cfg, data), data.tokenizer_path,
                                    keep=cfg.keep_checkpoints)
    if dd.enabled:
        dist.barrier()
    return path


def run_config(cfg: TrainConfig, data: TokenData) -> dict[str, Any]:
    """The settings saved with a run; `--resume` starts from them (flags of this call win)."""
    d = dataclasses.asdict(cfg)
    for per_call in ("resume", "stop_at", "init_from"):
        d.pop(per_call)
    if cfg.init_from is not None:  # its model config is saved as `model`, so --resume works
        d["initialized_from"] = cfg.init_from
    d["data_tokenizer_sha256"] = data.meta["tokenizer_sha256"]
    return d


# ---------------------------------------------------------------------------------------------
# The recipe


def train(cfg: TrainConfig, demo: bool = False) -> dict[str, Any]:
    """Train (or resume) a run; returns the final validation metrics."""
    check_config(cfg)
    dd = init_distributed()
    try:
        result = _train(cfg, dd, demo)
        if dd.enabled:
            dist.barrier()  # no rank tears gloo down while another still talks to it
        return result
    finally:
        if dd.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _say(dd: Dist, *parts: Any) -> None:
    if dd.main:
        tqdm.write(" ".join(str(p) for p in parts), file=sys.stderr)


def _train(cfg: TrainConfig, dd: Dist, demo: bool) -> dict[str, Any]:
    # ---- data (the default corpus is prepared on first use) ----------------------------------
    data_dir = Path(cfg.data)
    if not (data_dir / "meta.json").exists() and data_dir == DEFAULT_DATA_DIR:
        if dd.main:
            _say(dd, f"preparing the default corpus (Python standard library) into {data_dir}")
            print_summary(prepare(data_dir), data_dir)
        if dd.enabled:
            dist.barrier()
    data = load_data(data_dir)
    init_state = None
    if cfg.init_from is not None:  # a new run from a model's weights (fresh optimizer, step 0)
        init_config, init_state, init_tokenizer = load_pretrained(cfg.init_from)
        config = init_model_config(cfg, data, init_config)
        cfg = dataclasses.replace(cfg, model=config.to_dict(), keep=None)
        if init_tokenizer is not None and not same_vocab(init_tokenizer, data.tokenizer_path):
            _say(dd, f"warning: {data.path} was tokenized with another tokenizer than the "
                 f"model in {cfg.init_from}; its token ids mean different things there")
    else:
        config = build_model_config(cfg, data)
    device = pick_device(cfg.device, dd)
    amp = autocast_dtype(cfg.dtype, device)

    # ---- run directory, resume point ------------------------------------------------------------
    run_dir = Path(cfg.out)
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_from is None and not demo:
        raise SubLLMError(
            f"--resume: {run_dir} has no complete checkpoint to resume from; "
            "drop --resume to start a new run"
        )
    if not cfg.resume and ckpt.latest_checkpoint(run_dir) is not None:
        raise SubLLMError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose a new --out"
        )
    state: dict[str, Any] | None = None
    if resume_from is not None:
        saved = ModelConfig.from_dict(ckpt.load_model_config(resume_from))
        if saved.to_dict() != config.to_dict():
            diff = [k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v]
            raise SubLLMError(
                f"the model settings differ from the checkpoint's ({', '.join(diff)}); resume "
                "with the settings of the run (or start a new run with a new --out)"
            )
        saved_sha = ckpt.load_train_config(resume_from).get("data_tokenizer_sha256")
        if saved_sha not in (None, data.meta["tokenizer_sha256"]):
            raise SubLLMError(
                f"{data.path} was tokenized with a different tokenizer than the run in "
                f"{run_dir}; resume with the run's --data"
            )
        state = ckpt.load_train_state(resume_from)
    if dd.main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(run_dir)
            tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
            tmp.write_text(yaml.safe_dump(
                {**run_config(cfg, data), "model_config": config.to_dict()}, sort_keys=False))
            os.replace(tmp, run_dir / "config.yaml")
        except OSError as e:
            raise SubLLMError(
                f"cannot write to run directory {run_dir} ({e.strerror}); choose a writable --out"
            ) from None

    # ---- model ------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = SubLLM(config)
    if resume_from is not None:
        model.load_state_dict(ckpt.load_weights(resume_from))
    elif init_state is not None:
        try:
            model.load_state_dict(init_state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise SubLLMError(f"--init-from {cfg.init_from}: its weights do not fit its model "
                              f"config ({first})") from None
        del init_state
    if cfg.mst:
        apply_mst(model, checkpointing=cfg.checkpointing)
    if cfg.checkpointing:
        model.gradient_checkpointing = True
    model.to(device)
    raw_model = model
    if dd.enabled and cfg.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    elif dd.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(model, cfg, device)

    batches = TrainBatches(data.tokens("train"), cfg.batch_size, cfg.seq_len, cfg.seed,
                           dd.rank, dd.world_size)
    # validation batches of the global micro-batch size: the same tokens for any world size
    eval_set = val_batches(data.tokens("val"), cfg.batch_size * dd.world_size, cfg.seq_len,
                           cfg.eval_batches)
    start_step = 0
    if state is not None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=cfg.distributed == "fsdp" and dd.enabled)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        batches.load_state_dict(state["data"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dd.rank] if dd.rank < len(rngs) else rngs[0])
        start_step = int(state["step"])

    global_batch = cfg.batch_size * cfg.grad_accum * dd.world_size
    tokens_per_step = global_batch * cfg.seq_len
    if dd.main:
        what = "SUBLLM" if config.is_subllm else "LLaMA"
        mode = f", {dd.world_size} x {cfg.distributed.upper()}" if dd.enabled else ""
        name = f"from {cfg.init_from}" if cfg.init_from else cfg.preset
        _say(dd, f"{what} {name} {config.structure} ({raw_model.num_params() / 1e6:.2f}M "
             f"params) on {device}{mode}, {'bf16' if amp else 'fp32'}; global batch "
             f"{global_batch} x {cfg.seq_len} tokens; "
             + (f"resuming from {resume_from} (step {start_step})" if resume_from
                else f"run directory {run_dir}"))
    log = RunLog(run_dir, start_step) if dd.main else None

    # ---- the loop ---------------------------------------------------------------------------
    last_eval: dict[str, Any] | None = None
    last_saved: Path | None = resume_from
    step = start_step
    end = cfg.max_steps if cfg.stop_at is None else min(cfg.max_steps, cfg.stop_at)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", unit="step",
               disable=not dd.main, dynamic_ncols=True, file=sys.stderr)
    model.train()
    try:
        with StopFlag() as stop:
            while step < end:
                t0 = time.perf_counter()
                raw_model.set_step(step)
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                kept: list[float] = []
                for micro in range(cfg.grad_accum):
                    x = batches.next().to(device, non_blocking=True)
                    last_micro = micro == cfg.grad_accum - 1
                    with _no_sync(model, cfg, dd, last_micro), autocast(device, amp):
                        out = model(x, labels=x)
                        loss = out.loss / cfg.grad_accum
                    loss.backward()
                    loss_sum += float(loss.detach())
                    kept = out.kept_fractions
                train_loss = all_reduce_sum([loss_sum], dd, device)[0] / dd.world_size
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                grad_norm = float(grad_norm)
                if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
                    what = "loss" if not math.isfinite(train_loss) else "gradient norm"
                    value = train_loss if what == "loss" else grad_norm
                    where = (f"the last good checkpoint is {last_saved} (continue with --resume)"
                             if last_saved else "no checkpoint was saved yet")
                    raise SubLLMError(
                        f"{what} became {value} at step {step + 1}; stopped without saving, "
                        f"{where}; lower --lr or raise --warmup"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                tok_s = tokens_per_step / dt

                if dd.main:
                    postfix = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                    if kept:
                        postfix["kept"] = fmt_kept(kept)
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                if dd.main and (step % cfg.log_every == 0 or step == end):
                    record = {"step": step, "train_loss": train_loss, "lr": lr,
                              "grad_norm": grad_norm, "tokens_per_s": tok_s,
                              "tokens_seen": step * tokens_per_step, "epoch": batches.epoch,
                              "memory_gib": peak_memory_gib(device)}
                    if kept:
                        record["kept_fractions"] = kept
                    log.write(record)
                if cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = _eval_and_log(model, eval_set, device, amp, dd, log, step)
                stopping = _agree(stop.signum is not None, dd, device)
                if (cfg.save_every and step % cfg.save_every == 0) or stopping or step == end:
                    last_saved = save(run_dir, step, model, optimizer, batches, config, cfg,
                                      data, dd)
                if stopping:
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    _say(dd, f"\n{name}: saved {last_saved} at step {step}; continue with "
                         f"`subllm train --out {run_dir} --resume`")
                    return {"interrupted": True, "step": step, "signal": stop.signum}
        bar.close()
        if last_eval is None or last_eval["step"] != step:
            # nothing to log when this call trained no step (resuming a finished run)
            last_eval = _eval_and_log(model, eval_set, device, amp, dd,
                                      log if step > start_step else None, step)
    finally:
        bar.close()
        if log is not None:
            log.close()
            plot_loss(run_dir)

    if dd.main:
        kept_txt = (f", eval kept fractions {fmt_kept(last_eval['kept_fractions'])} "
                    f"(keep {config.keep})" if last_eval["kept_fractions"] else "")
        print(f"step {step}: val loss {last_eval['loss']:.4f}, perplexity "
              f"{last_eval['perplexity']:.2f}{kept_txt}; checkpoint {last_saved}", flush=True)
        if demo:
            print("sample:", flush=True)
            print(DEMO_PROMPT + sample_text(raw_model, data.tokenizer_path, DEMO_PROMPT,
                                            max_new_tokens=120, device=device), flush=True)
    return {**last_eval, "checkpoint": str(last_saved) if last_saved else None}


def _no_sync(model: torch.nn.Module, cfg: TrainConfig, dd: Dist, last_micro: bool
             ) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if not dd.enabled or cfg.grad_accum == 1:
        return contextlib.nullcontext()
    if cfg.distributed == "fsdp":
        model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last_micro else model.no_sync()


def _agree(flag: bool, dd: Dist, device: torch.device) -> bool:
    """Any rank's stop request stops all ranks at the same step."""
    return all_reduce_sum([float(flag)], dd, device)[0] > 0 if dd.enabled else flag


def _eval_and_log(model: torch.nn.Module, eval_set: list[torch.Tensor], device: torch.device,
                  amp: torch.dtype | None, dd: Dist, log: RunLog | None, step: int
                  ) -> dict[str, Any]:
    result = evaluate(model, eval_set, device, amp, dd)
    result["step"] = step
    if log is not None:
        record = {"step": step, "val_loss": result["loss"], "val_perplexity": result["perplexity"]}
        if result["kept_fractions"]:
            record["val_kept_fractions"] = result["kept_fractions"]
        log.write(record)
        kept = f", kept {fmt_kept(result['kept_fractions'])}" if result["kept_fractions"] else ""
        _say(dd, f"step {step}: val loss {result['loss']:.4f}, perplexity "
             f"{result['perplexity']:.2f}{kept}")
    return result


# ---------------------------------------------------------------------------------------------
# CLI


