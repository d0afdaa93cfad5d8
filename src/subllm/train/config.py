"""The one declaration of training settings (`TrainConfig`) and the model config they make.

Light on purpose (no torch): the CLI resolves and checks settings before it loads the
training loop, so a bad flag or config key costs a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subllm.errors import SubLLMError
from subllm.model.config import PRESETS, ModelConfig

if TYPE_CHECKING:
    from subllm.train.data import TokenData

DEFAULT_DATA_DIR = Path("data/default")
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_VOCAB_SIZE = 8192

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
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks
    resume: bool = False
    init_from: str | None = None  # start from this model's weights and config (see below)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (YAML only)


# The no-argument run (`make demo`): the tiny SUBLLM on the stdlib corpus, a few CPU minutes.
DEMO = dict(seq_len=256, batch_size=16, max_steps=300, lr=2e-3, min_lr=2e-4, warmup=30,
            eval_every=100, eval_batches=16, save_every=100, log_every=10)


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
    if not cfg.dist_timeout > 0:
        raise SubLLMError(f"--dist-timeout must be a positive number of seconds, got "
                          f"{cfg.dist_timeout}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise SubLLMError(f"--distributed must be ddp or fsdp, got {cfg.distributed!r}")
