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

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from subllm import checkpoint as ckpt
from subllm.data import (
    DEFAULT_DATA_DIR,
    TokenData,
    TrainBatches,
    load_data,
    same_vocab,
    val_batches,
)
from subllm.errors import SubLLMError
from subllm.flags import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_flags,
)

DEFAULT_RUN_DIR = Path("runs/default")
DEMO_PROMPT = "def "


@dataclass
class TrainConfig:
    """Every training setting; the field names are the flag names (`seq_len` = --seq-len)."""

    data: str = str(DEFAULT_DATA_DIR)
    out: str = str(DEFAULT_RUN_DIR)
    preset: str = "subllm-tiny"
    structure: str | None = None
    keep: str | None = None  # "0.64" or one ratio per depth, "0.64,0.5"
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch on each device
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps; also the length of the lr schedule
    stop_at: int | None = None  # save and exit after this step (time-limited jobs)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    mst: bool = False
    checkpointing: bool = False
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    distributed: str = "ddp"
    resume: bool = False
    init_from: str | None = None  # start from this model's weights and config (see below)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (YAML only)


# The no-argument run (`make demo`): the tiny SUBLLM on the stdlib corpus, a few CPU minutes.
DEMO = dict(seq_len=256, batch_size=16, max_steps=300, lr=2e-3, min_lr=2e-4, warmup=30,
            eval_every=100, eval_batches=16, save_every=100, log_every=10)


# ---------------------------------------------------------------------------------------------
# Settings -> model config


def parse_keep(text: str) -> float | list[float]:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise SubLLMError(
            f"--keep must be a ratio like 0.64 or one per depth like 0.64,0.5; got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def build_model_config(cfg: TrainConfig, data: TokenData) -> Any:
    """Preset < YAML `model:` section < --structure/--keep; the vocab follows the data."""
    from subllm.config import PRESETS, ModelConfig

    if cfg.preset not in PRESETS:
        ModelConfig.preset(cfg.preset)  # raises with the nearest preset name
    if not isinstance(cfg.model, dict):
        raise SubLLMError(f"`model` in the config file must be a mapping, got {cfg.model!r}")
    d = {**PRESETS[cfg.preset], **cfg.model}
    if cfg.structure is not None:
        d["structure"] = cfg.structure
        d["n_layers"] = cfg.structure.count("T")
    elif "n_layers" in cfg.model and "structure" not in cfg.model:
        d["structure"] = None
    if cfg.keep is not None:
        d["keep"] = parse_keep(cfg.keep)
    if "vocab_size" in cfg.model:
        if int(cfg.model["vocab_size"]) < data.vocab_size:
            raise SubLLMError(
                f"the tokenizer of {data.path} has {data.vocab_size} tokens but the model's "
                f"vocab_size is {cfg.model['vocab_size']}; raise model.vocab_size to at least "
                f"{data.vocab_size} or drop it (the default follows the data)"
            )
    else:
        d["vocab_size"] = data.vocab_size
    config = ModelConfig.from_dict(d)
    _check_seq_len(cfg, config)
    return config


# What --init-from takes from the model it starts from, never from the settings: the
# fields that shape the weights or change what they compute.
ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                       "structure", "head_dim", "tie_embeddings", "rope_theta", "norm_eps")


def init_model_config(cfg: TrainConfig, data: TokenData, base: Any) -> Any:
    """--init-from: the model's own config < `model:` training fields (keep, max_seq_len, the
    bypass_* and balancer_* schedules) < --keep. Architecture fields are refused."""
    from subllm.config import ModelConfig

    if cfg.resume:
        raise SubLLMError("--init-from starts a new run and --resume continues one; pass one")
    if cfg.structure is not None:
        raise SubLLMError(f"--structure does not go with --init-from: the structure is that of "
                          f"{cfg.init_from} ({base.structure})")
    if not isinstance(cfg.model, dict):
        raise SubLLMError(f"`model` in the config file must be a mapping, got {cfg.model!r}")
    fixed = [k for k in cfg.model if k in ARCHITECTURE_FIELDS]
    if fixed:
        raise SubLLMError(f"`model: {fixed[0]}` does not go with --init-from: the architecture "
                          f"is that of {cfg.init_from}; only training fields (keep, max_seq_len, "
                          "bypass_*, balancer_*) may be set")
    d = {**base.to_dict(), **cfg.model}
    if cfg.keep is not None:
        d["keep"] = parse_keep(cfg.keep)
    config = ModelConfig.from_dict(d)
    if data.vocab_size > config.vocab_size:
        raise SubLLMError(
            f"the tokenizer of {data.path} has {data.vocab_size} tokens but the model in "
            f"{cfg.init_from} has vocab_size {config.vocab_size}; prepare the data with the "
            "model's tokenizer (subllm prepare --tokenizer ITS_TOKENIZER.json)"
        )
    _check_seq_len(cfg, config)
    return config


def _check_seq_len(cfg: TrainConfig, config: Any) -> None:
    if cfg.seq_len > config.max_seq_len:
        raise SubLLMError(
            f"--seq-len {cfg.seq_len} exceeds the model's context (max_seq_len "
            f"{config.max_seq_len}); lower --seq-len or set `model: {{max_seq_len: N}}` in --config"
        )


def check_config(cfg: TrainConfig) -> None:
    if cfg.min_lr > cfg.lr:
        raise SubLLMError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}; lower --min-lr")
    if cfg.stop_at is not None and cfg.stop_at <= 0:
        raise SubLLMError(f"--stop-at must be a positive step, got {cfg.stop_at}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise SubLLMError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise SubLLMError(f"--distributed must be ddp or fsdp, got {cfg.distributed!r}")


# ---------------------------------------------------------------------------------------------
# Devices and processes


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we are one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def pick_device(name: str, dd: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SubLLMError(f"--device {name}: CUDA is not available here; use --device cpu")
        return torch.device("cuda", dd.local_rank) if dd.enabled else torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise SubLLMError("--device mps: MPS is not available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise SubLLMError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device has it (`auto` uses it on GPUs only); None = fp32."""
    if name == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if name == "bf16":
            raise SubLLMError("--dtype bf16: this GPU has no bfloat16; use --dtype fp32")
        return None
    return torch.bfloat16 if name == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def all_reduce_sum(values: list[float], dd: Dist, device: torch.device) -> list[float]:
    if not dd.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device,
             amp: torch.dtype | None, dd: Dist) -> dict[str, Any]:
    """Mean next-token loss over the batches, in eval mode (threshold subsampling).

    Rank r evaluates the r-th slice of the rows of every batch, so the result does not
    depend on the number of ranks; a rank whose slice is empty runs one row with weight 0,
    so every rank makes the same forward calls (FSDP gathers weights in each).
    """
    was_training = model.training
    model.eval()
    loss_sum = tokens = 0.0
    kept_sum: list[float] = []
    entered_sum: list[float] = []
    with torch.random.fork_rng(devices=[]):
        for batch in batches:
            rows = batch.tensor_split(dd.world_size)[dd.rank]
            weight = 1.0 if len(rows) else 0.0
            x = (rows if len(rows) else batch[:1]).to(device)
            with autocast(device, amp):
                out = model(x, labels=x)
            n = x.shape[0] * (x.shape[1] - 1)
            loss_sum += weight * float(out.loss) * n
            tokens += weight * n
            if not kept_sum:
                kept_sum = [0.0] * len(out.kept)
                entered_sum = [0.0] * len(out.kept)
            for k, (kept, entered) in enumerate(zip(out.kept, out.entered, strict=True)):
                kept_sum[k] += weight * float(kept.sum())
                entered_sum[k] += weight * float(entered.sum())
    model.train(was_training)
    totals = all_reduce_sum([loss_sum, tokens, *kept_sum, *entered_sum], dd, device)
    loss_sum, tokens = totals[0], totals[1]
    m = len(kept_sum)
    kept_fractions = [k / max(e, 1.0) for k, e in zip(totals[2 : 2 + m], totals[2 + m :],
                                                       strict=True)]
    loss = loss_sum / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens),
            "kept_fractions": kept_fractions}


# ---------------------------------------------------------------------------------------------
# Logging (rank 0 only)


class RunLog:
    """metrics.jsonl + TensorBoard; loss.png at the end."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and self.path.exists():  # drop what a killed run logged past the ckpt
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_name(f".metrics.jsonl.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.file = self.path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for j, v in enumerate(value):
                    self.tb.add_scalar(f"{key}/{j}", v, step)
            elif isinstance(value, (int, float)):
                self.tb.add_scalar(key.replace("_", "/", 1), value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return records


def plot_loss(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    tmp = run_dir / f".loss.png.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def fmt_kept(fractions: list[float]) -> str:
    return "/".join(f"{f:.2f}" for f in fractions)


# ---------------------------------------------------------------------------------------------
# Signals


class StopFlag:
    """First SIGINT / SIGTERM asks the loop to save and exit; a second one interrupts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
    from subllm.config import ModelConfig
    from subllm.model import SubLLM

    # ---- data (the default corpus is prepared on first use) ----------------------------------
    data_dir = Path(cfg.data)
    if not (data_dir / "meta.json").exists() and data_dir == DEFAULT_DATA_DIR:
        if dd.main:
            from subllm.data import prepare, print_summary

            _say(dd, f"preparing the default corpus (Python standard library) into {data_dir}")
            print_summary(prepare(data_dir), data_dir)
        if dd.enabled:
            dist.barrier()
    data = load_data(data_dir)
    init_state = None
    if cfg.init_from is not None:  # a new run from a model's weights (fresh optimizer, step 0)
        from subllm.convert import load_pretrained

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
        try:
            from subllm.mst import apply_mst
        except ImportError as e:
            raise SubLLMError(f"--mst is not available in this installation ({e})") from None
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
            from subllm.generate import sample_text

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


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--config", metavar="FILE",
                   help="YAML file whose keys are these flag names (flags win); "
                   "a `model:` section overrides ModelConfig fields of the preset")
    specs: list[tuple[str, Any, str, str]] = [
        ("data", str, "DATA_DIR", "prepared data directory"),
        ("out", str, "RUN_DIR", "run directory (checkpoints, metrics, TensorBoard, loss.png)"),
        ("preset", str, "NAME", "model preset (subllm-tiny, llama-tiny, subllm-small, ...)"),
        ("structure", str, "S", "structure string over T ( ), e.g. TTT(TT(TT)TT)TTT"),
        ("keep", str, "K", "keep ratio, or one per depth: 0.64,0.5"),
        ("seq_len", positive_int, "N", "tokens per training sequence"),
        ("batch_size", positive_int, "N", "sequences per micro-batch per device"),
        ("grad_accum", positive_int, "N", "micro-batches per optimizer step"),
        ("max_steps", positive_int, "N", "optimizer steps (the lr schedule's length)"),
        ("stop_at", positive_int, "STEP", "save and exit after this step (resume later)"),
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
        ("init_from", str, "DIR", "start a new run from the weights and model config of a "
         "Hugging Face SubLLM directory (subllm export / convert) or a `subllm train` run"),
        ("device", str, "D", "auto, cpu, cuda, cuda:1, ..."),
    ]
    for dest, kind, metavar, text in specs:
        default = getattr(d, dest)
        shown = f" (default {default})" if default is not None else ""
        p.add_argument(_flag_name(dest), dest=dest, type=kind, metavar=metavar,
                       help=text + shown)
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"),
                   help="autocast dtype; auto = bf16 on GPUs that have it, else fp32")
    p.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="data-parallel engine under torchrun (default ddp)")
    p.add_argument("--mst", action="store_true", default=None,
                   help="Mini-Sequence Transformer: chunked MLP and loss")
    p.add_argument("--checkpointing", action="store_true", default=None,
                   help="activation checkpointing of every block")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out from its newest complete checkpoint")


def run_train(args: argparse.Namespace) -> int:
    from subllm.flags import explicit_flags

    parser = args._parser
    demo = args.config is None and not explicit_flags(args, parser)
    defaults = dataclasses.asdict(TrainConfig())
    if demo:
        defaults.update(DEMO)
        defaults["resume"] = ckpt.latest_checkpoint(DEFAULT_RUN_DIR) is not None
    # --resume continues with the run's saved settings unless the command line says otherwise.
    base = None
    if args.resume or _config_says_resume(args):
        out = args.out or _config_value(args, "out") or defaults["out"]
        saved = Path(out) / "config.yaml"
        if saved.is_file():
            base = yaml.safe_load(saved.read_text()) or {}
    settings, extras = resolve_flags(args, parser, defaults, base=base, extra_keys=("model",))
    model = extras["model"] if "model" in extras else (base or {}).get("model")
    cfg = TrainConfig(**{**settings, "model": model or {}})
    if cfg.init_from is not None and "preset" in resolve_flags(
            args, parser, {}, extra_keys=("model",))[0]:
        raise SubLLMError("--preset does not go with --init-from: the model is that of "
                          f"{cfg.init_from}")
    t0 = time.perf_counter()
    result = train(cfg, demo=demo)
    if demo and not result.get("interrupted"):
        print(f"demo finished in {time.perf_counter() - t0:.0f} s", flush=True)
    if result.get("interrupted"):
        return 128 + int(result["signal"] or signal.SIGTERM)
    return 0


def _config_value(args: argparse.Namespace, key: str) -> Any:
    if args.config is None:
        return None
    from subllm.flags import read_yaml

    data = read_yaml(args.config)
    if isinstance(data, dict):
        return data.get(key, data.get(key.replace("_", "-")))
    return None


def _config_says_resume(args: argparse.Namespace) -> bool:
    return bool(_config_value(args, "resume"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a SUBLLM or LLaMA model (no arguments: the built-in demo)",
        description="Pre-train a model on a prepared data directory. With no arguments: "
        "prepare the Python standard library into ./data/default and train the tiny SUBLLM "
        "preset into ./runs/default for a few CPU minutes. Under torchrun: DDP or FSDP2.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train, _parser=p)

