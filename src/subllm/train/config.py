"""The one declaration of training settings (`TrainConfig`) and the model config they make.

Light on purpose (no torch): the CLI resolves and checks settings before it loads the
training loop, so a bad flag or config key costs a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from subllm.errors import SubLLMError
from subllm.model.config import (
    HF_FAMILIES,
    PRESETS,
    ModelConfig,
    check_values,
    parse_structure,
)

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
    # documents: each training row is packed from whole documents that neither attend to
    # nor route through each other (design.md §3.10); none: plain windows of the stream
    packing: str = "documents"
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
    compile: bool = False  # torch.compile every block for training (eval stays eager)
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    distributed: str = "ddp"
    replicate: int = 1  # --distributed fsdp: HSDP with this many replicas of the shards
    async_checkpoint: bool = False  # sharded checkpoints written while training goes on
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks
    resume: bool = False
    skip_damaged: bool = False  # --resume past a damaged newest checkpoint (set aside)
    init_from: str | None = None  # start from this model's weights and config (see below)
    # Router warm-up: for the first N steps only the scorers and bypass scales learn (a
    # model converted from a LLaMA-family checkpoint keeps its blocks while routing forms)
    train_only_routers: int = 0
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
        parse_structure(cfg.structure)  # a bad string fails by position, before n_layers
        d["structure"] = cfg.structure
        d["n_layers"] = cfg.structure.count("T")
    elif "n_layers" in cfg.model and "structure" not in cfg.model:
        d["structure"] = None
    if cfg.keep is not None:
        d["keep"] = parse_keep(cfg.keep)
    if "vocab_size" in cfg.model:
        check_values({"vocab_size": cfg.model["vocab_size"]})
        if cfg.model["vocab_size"] < data.vocab_size:
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
                       "structure", "head_dim", "tie_embeddings", "rope_theta", "norm_eps",
                       "rope_scaling", "qkv_bias", "o_bias", "qk_norm", "sliding_window",
                       "hf_family")


def init_model_config(cfg: TrainConfig, data: TokenData, base: Any) -> Any:
    """--init-from: the model's own config < `model:` training fields (keep, max_seq_len, the
    bypass_* and balancer_* schedules) < --keep. Architecture fields are refused."""
    if cfg.structure is not None:
        raise SubLLMError(f"--structure does not go with --init-from: the structure is that of "
                          f"{cfg.init_from} ({base.structure})")
    _check_init_settings(cfg)
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


def _check_init_settings(cfg: TrainConfig) -> None:
    """What --init-from refuses whatever the model is: --resume, and `model:` fields other
    than training ones or out of their ranges."""
    if cfg.resume:
        raise SubLLMError("--init-from starts a new run and --resume continues one; pass one")
    if not isinstance(cfg.model, dict):
        raise SubLLMError(f"`model` in the config file must be a mapping, got {cfg.model!r}")
    fixed = [k for k in cfg.model if k in ARCHITECTURE_FIELDS]
    if fixed:
        raise SubLLMError(f"`model: {fixed[0]}` does not go with --init-from: the architecture "
                          f"is that of {cfg.init_from}; only training fields (keep, max_seq_len, "
                          "bypass_*, balancer_*) may be set")
    check_values(cfg.model)


def _check_seq_len(cfg: TrainConfig, config: Any) -> None:
    if cfg.seq_len > config.max_seq_len:
        raise SubLLMError(
            f"--seq-len {cfg.seq_len} exceeds the model's context (max_seq_len "
            f"{config.max_seq_len}); lower --seq-len or set `model: {{max_seq_len: N}}` in --config"
        )
    if cfg.train_only_routers and not config.is_subllm:
        raise SubLLMError(f"--train-only-routers {cfg.train_only_routers}: the model "
                          f"({config.structure}) has no scorers or bypass scales to train; "
                          "give it a subsampled structure")


def check_config(cfg: TrainConfig) -> None:
    """Every check of the settings that needs no data and no torch (a fraction of a second,
    before the default corpus is prepared): the values, how they go together, the model
    they build (with a stand-in vocabulary: the data's is checked once it is read) or, with
    --init-from, that the model is there and the `model:` fields it allows."""
    for name in ("out", "data", "init_from"):
        if getattr(cfg, name) is not None and not str(getattr(cfg, name)).strip():
            raise SubLLMError(f"--{name.replace('_', '-')} is empty; pass a directory path")
    if cfg.seq_len < 2:
        raise SubLLMError(f"--seq-len {cfg.seq_len}: a training sequence needs at least 2 "
                          "tokens (one input, one target)")
    if cfg.skip_damaged and not cfg.resume:
        raise SubLLMError("--skip-damaged goes with --resume (it chooses where a run resumes)")
    if cfg.min_lr > cfg.lr:
        raise SubLLMError(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}; lower --min-lr")
    if cfg.stop_at is not None and cfg.stop_at <= 0:
        raise SubLLMError(f"--stop-at must be a positive step, got {cfg.stop_at}")
    if cfg.dtype not in ("auto", "fp32", "bf16"):
        raise SubLLMError(f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    if not cfg.dist_timeout > 0:
        raise SubLLMError(f"--dist-timeout must be a positive number of seconds, got "
                          f"{cfg.dist_timeout}")
    if isinstance(cfg.train_only_routers, bool) or not isinstance(cfg.train_only_routers, int) \
            or cfg.train_only_routers < 0:
        raise SubLLMError(f"--train-only-routers must be a number of steps >= 0, got "
                          f"{cfg.train_only_routers!r}")
    if cfg.packing not in ("documents", "none"):
        raise SubLLMError(f"--packing must be documents or none, got {cfg.packing!r}")
    if cfg.distributed not in ("ddp", "fsdp"):
        raise SubLLMError(f"--distributed must be ddp or fsdp, got {cfg.distributed!r}")
    if isinstance(cfg.replicate, bool) or not isinstance(cfg.replicate, int) or cfg.replicate < 1:
        raise SubLLMError(f"--replicate must be a positive number of replicas, got "
                          f"{cfg.replicate!r}")
    if cfg.replicate > 1 and cfg.distributed != "fsdp":
        raise SubLLMError("--replicate (HSDP) goes with --distributed fsdp")
    if cfg.async_checkpoint and cfg.distributed != "fsdp":
        raise SubLLMError("--async-checkpoint goes with --distributed fsdp: it writes sharded "
                          "checkpoints in the background; DDP and one process write theirs "
                          "whole, in the foreground (drop --async-checkpoint)")
    if cfg.init_from is not None:
        check_model_dir(cfg.init_from, "--init-from")
        _check_init_settings(cfg)
    else:
        stand_in = types.SimpleNamespace(vocab_size=1, path=Path(cfg.data))
        build_model_config(cfg, stand_in)


# what a run, a checkpoint or a Hugging Face model directory holds (any one of them)
MODEL_DIR_FILES = ("config.json", "checkpoints", "model_config.json", "config.yaml")


def check_model_dir(path: str | Path, flag: str, hf: bool = True) -> None:
    """Refuse a model directory argument that names none (missing, a file, a directory
    with no run, checkpoint or, with `hf`, Hugging Face model in it) before torch and
    transformers are imported, seconds that a typo should not cost; what is in it is
    checked as it loads."""
    path = Path(path)
    accepted = ("the --out directory of a `subllm train` run or one of its checkpoints/step-* "
                "directories" + (", or a Hugging Face SubLLM directory (subllm export / "
                                 "convert)" if hf else ""))
    if not path.exists():
        raise SubLLMError(f"{flag} {path} does not exist; pass {accepted}")
    if not path.is_dir():
        raise SubLLMError(f"{flag} {path} is a file; pass {accepted}")
    if not path.name.startswith("step-") and not any((path / name).exists()
                                                    for name in MODEL_DIR_FILES):
        model = " and no Hugging Face model (config.json)" if hf else ""
        raise SubLLMError(f"{flag} {path} holds no complete checkpoint{model}; pass {accepted}")


# ---------------------------------------------------------------------------------------------
# What a model argument means (`subllm info`, `subllm estimate --config`)

TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
# what a run's config.yaml holds besides the settings (the model it built, exactly)
RUN_KEYS = {"model_config", "data_tokenizer_sha256", "initialized_from", "token_ids"}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# what a model argument may be (`subllm info`, `subllm estimate --config`)
MODEL_ARGUMENTS = (f"a preset ({', '.join(PRESETS)}), a YAML/JSON model config or "
                   "`subllm train` settings file, a run directory or a Hugging Face model "
                   "directory")


def model_config_of(spec: str) -> tuple[ModelConfig, str]:
    """(the model config, a display name) of a preset, a model config file (YAML/JSON), a
    `subllm train` settings file, a run directory or checkpoint, or a Hugging Face SubLLM
    directory: exactly the model that training or loading would build, or an error."""
    if spec in PRESETS:
        return ModelConfig.preset(spec), spec
    if not spec.strip():
        raise SubLLMError(f"the model argument is empty; pass {MODEL_ARGUMENTS}")
    path = Path(spec)
    if path.is_dir():
        return _model_config_of_dir(path), path.name
    if path.suffix not in CONFIG_SUFFIXES and not path.exists():
        if len(path.parts) > 1 or spec.startswith(("~", ".")) or (
                path.suffix and not difflib.get_close_matches(spec, list(PRESETS), n=1)):
            raise SubLLMError(f"{spec} does not exist; pass {MODEL_ARGUMENTS}")  # a path
        return ModelConfig.preset(spec), spec  # raises with the nearest preset names
    data = _read_mapping(path)
    if path.suffix == ".json" and data.get("model_type") in HF_FAMILIES:
        from subllm.interop.llama import model_config_of_hf  # a transformers config.json

        return model_config_of_hf(data, str(path)), path.stem
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
    if data.keys() <= model_keys:  # a model config (a preset plus overrides, or fields)
        return ModelConfig.from_file(path), path.stem
    if isinstance(data.get("model_config"), dict) and data.keys() <= TRAIN_KEYS | RUN_KEYS:
        return ModelConfig.from_dict(data["model_config"]), path.stem  # a run's config.yaml
    if data.keys() <= TRAIN_KEYS:  # `subllm train` settings: what training would build
        return _model_config_of_settings(data, path), path.stem
    unknown = sorted(data.keys() - TRAIN_KEYS - RUN_KEYS - model_keys)
    raise SubLLMError(f"{path} is neither a model config nor `subllm train` settings: "
                      f"unknown keys {', '.join(unknown) or '(a mix of both)'}")


def _read_mapping(path: Path) -> dict[str, Any]:
    """A config file's mapping. A file named like a config (.yaml/.yml/.json) that does not
    parse is named with where it breaks; any other file that is not a mapping (a .jsonl
    corpus, plain text, binary data) is one line on what it is not and what is accepted."""
    if not path.is_file():
        raise SubLLMError(f"config file {path} does not exist; pass a preset name, a config "
                          "file, a run directory or a Hugging Face SubLLM directory")
    named = path.suffix in CONFIG_SUFFIXES
    not_config = SubLLMError(f"{path} is not a model config or `subllm train` settings; pass "
                             f"{MODEL_ARGUMENTS}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        if not named:
            raise not_config from None
        raise SubLLMError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise SubLLMError(f"{path} is not valid JSON at line {e.lineno}, column {e.colno}: "
                          f"{e.msg}; fix the syntax") from None
    except yaml.YAMLError as e:
        if not named:
            raise not_config from None
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise SubLLMError(f"{path} is not valid YAML{where}: {problem}; fix the "
                          "syntax") from None
    if not isinstance(data, dict):
        if not named:
            raise not_config
        raise SubLLMError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _model_config_of_settings(data: dict[str, Any], path: Path) -> ModelConfig:
    """A `subllm train` settings file: preset < `model:` < structure/keep; the vocabulary
    follows the data unless `model.vocab_size` is set, as in training."""
    cfg = TrainConfig(**{k: v for k, v in data.items() if k in TRAIN_KEYS})
    if cfg.init_from is not None:
        return model_config_of(cfg.init_from)[0]
    model = cfg.model if isinstance(cfg.model, dict) else {}
    vocab = model.get("vocab_size")
    data_dir = Path(cfg.data)
    if vocab is None:
        meta = data_dir / "meta.json"
        if not meta.is_file():
            raise SubLLMError(
                f"{path} takes its vocabulary from the data {data_dir}, which is not prepared "
                "here; pass the run directory instead, or set model.vocab_size in the file")
        vocab = int(json.loads(meta.read_text())["vocab_size"])
    stand_in = types.SimpleNamespace(vocab_size=int(vocab), path=data_dir)
    return build_model_config(cfg, stand_in)


def _model_config_of_dir(path: Path) -> ModelConfig:
    hf = path / "config.json"
    if hf.is_file():
        raw = json.loads(hf.read_text())
        kind = raw.get("model_type")
        if kind in HF_FAMILIES:  # a Llama / Qwen / Mistral directory: what convert builds
            from subllm.interop.llama import model_config_of_hf

            return model_config_of_hf(raw, str(hf))
        if kind != "subllm":
            raise SubLLMError(f"{path} holds a {kind!r} model, not a SubLLM; for its memory "
                              f"use `subllm estimate --hf-config {hf}`")
        # transformers reads the file as SubLLMConfig does when the model loads
        from subllm.model.hf_config import SubLLMConfig

        return SubLLMConfig.from_dict(raw).to_model_config()
    # a run or checkpoint: the newest complete checkpoint's model_config.json (the torch
    # import of the checkpoint module is paid only here)
    from subllm.train import checkpoint as ckpt

    return ModelConfig.from_dict(ckpt.load_model_config(
        ckpt.resolve_checkpoint(path, checksums=False)))  # the config alone: no weight read
