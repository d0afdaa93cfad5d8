"""Conversion between our models and other checkpoints, and the `subllm convert` verb.

- `transformers` Llama: our block weights carry Hugging Face's names, so the mapping is a
  prefix table: `layers.*`, `embed_tokens`, `norm` live under `model.` in transformers;
  `lm_head` at the top. Subsampling scorers and bypass scales have no Llama counterpart and
  start freshly initialised. `from_hf_llama` takes a `LlamaForCausalLM`; `from_hf_llama_dir`
  reads a checkpoint directory one tensor at a time into a model built on the meta device,
  so converting holds one copy of the weights, never two.
- The SUBLLM authors' release (`from_official`): their `SubllmModel` state_dict and config
  JSON, mapped key by key (`w12` = [gate; up], bypasses numbered in the order of the `)`).
- `load_pretrained`: the model config and weights of a Hugging Face SubLLM directory or a
  `subllm train` checkpoint, which `subllm train --init-from` starts from.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from subllm.config import ModelConfig, parse_structure
from subllm.errors import ConfigError, SubLLMError
from subllm.model import Bypass, SubLLM, Subsampler

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def _ours_to_hf_key(key: str) -> str | None:
    if key.startswith(("subsamplers.", "bypasses.")):
        return None
    if key.startswith("lm_head."):
        return key
    return "model." + key


def hf_llama_config(config: ModelConfig) -> LlamaConfig:
    """The `transformers.LlamaConfig` of a LLaMA-structured ModelConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def to_hf_llama(model: SubLLM) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` with the same weights (LLaMA structure only)."""
    from transformers import LlamaForCausalLM

    if model.config.is_subllm:
        raise SubLLMError(
            f"to_hf_llama needs a LLaMA structure (only 'T'), this model has "
            f"{model.config.structure!r}; subsampled models export with `subllm export`"
        )
    hf = LlamaForCausalLM(hf_llama_config(model.config))
    state = {}
    for k, v in model.state_dict().items():
        hk = _ours_to_hf_key(k)
        if hk is not None:
            state[hk] = v
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (model.config.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:  # an internal invariant: the table above must be complete
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    dtype = next(model.parameters()).dtype
    return hf.to(dtype=dtype)


def _config_from_hf(hf_config: Any, structure: str | None, keep: float | list[float] | None
                    ) -> ModelConfig:
    c = hf_config
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"only SiLU (SwiGLU) MLPs are supported, this model uses {act!r}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ConfigError("models with attention or MLP biases are not supported")
    rope = getattr(c, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(
            f"rope scaling {rope_type!r} is not supported; only the default rotary embedding is"
        )
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    n_layers = c.num_hidden_layers
    if structure is not None:
        parse_structure(structure)  # a malformed string is an error naming the position
        if structure.count("T") != n_layers:
            raise ConfigError(
                f"structure {structure!r} has {structure.count('T')} 'T' blocks but the Llama "
                f"has {n_layers} layers (num_hidden_layers); write exactly {n_layers} 'T's"
            )
    kwargs: dict[str, Any] = dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=n_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        ffn_dim=c.intermediate_size, max_seq_len=c.max_position_embeddings,
        rope_theta=float(theta), norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        structure=structure or "T" * n_layers,
    )
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // c.num_attention_heads:
        kwargs["head_dim"] = head_dim
    if keep is not None:
        kwargs["keep"] = keep
    return ModelConfig(**kwargs)


def from_hf_llama(hf_model: LlamaForCausalLM, structure: str | None = None,
                  keep: float | list[float] | None = None) -> SubLLM:
    """A SubLLM of the given structure whose blocks are the Llama's (DESIGN 2).

    Scorers and bypass scales are freshly initialised; with structure None (all "T") the
    result is the same LLaMA. The weights are copied: training the result leaves the Llama
    untouched.
    """
    dtype = next(hf_model.parameters()).dtype
    return from_llama_weights(hf_model.config, hf_model.state_dict(), structure, keep,
                              dtype=dtype, copy=True)


def from_llama_weights(hf_config: Any, weights: Mapping[str, Tensor],
                       structure: str | None = None, keep: float | list[float] | None = None,
                       *, dtype: torch.dtype | None = None, copy: bool = False,
                       source: str = "the Llama checkpoint") -> SubLLM:
    """`from_hf_llama` from a `LlamaConfig` and Llama weights by name (`model.layers.0...`).

    `weights` may read lazily (`TensorFiles`): tensors are taken one at a time into a model
    built on the meta device. dtype: of the result (default: that of the embedding).
    """
    config = _config_from_hf(hf_config, structure, keep)
    with torch.device("meta"):
        model = SubLLM(config)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    names = {}  # our key -> Llama key
    for k in shapes:
        hk = _ours_to_hf_key(k)
        if hk is not None and not (config.tie_embeddings and hk == "lm_head.weight"):
            names[k] = hk
    _check_keys(weights.keys(), names.values(), source,
                optional=("lm_head.weight",) if config.tie_embeddings else (),
                ignored=lambda key: key.endswith("rotary_emb.inv_freq"))
    state = {}
    for k, hk in names.items():
        t = weights[hk]
        _check_shape(hk, t, shapes[k], source)
        dtype = dtype or t.dtype
        state[k] = t.to(dtype, copy=copy)
    return _assign(model, state, dtype)


def from_hf_llama_dir(directory: str | Path, structure: str | None = None,
                      keep: float | list[float] | None = None, *,
                      dtype: torch.dtype | None = None) -> SubLLM:
    """`from_hf_llama` on a local Llama checkpoint directory (config.json + safetensors or
    pytorch_model*.bin, sharded or not), without building a `LlamaForCausalLM`."""
    from transformers import LlamaConfig

    d = Path(directory)
    raw = _read_json(d / "config.json", f"{d} is not a Hugging Face model directory")
    if raw.get("model_type") != "llama":
        raise SubLLMError(
            f"{d} holds a {raw.get('model_type')!r} model; --from-hf converts Llama checkpoints "
            "(model_type 'llama') only"
        )
    try:
        hf_config = LlamaConfig.from_pretrained(str(d))
    except (OSError, ValueError, TypeError) as e:
        raise SubLLMError(f"cannot read {d / 'config.json'}: {_first_line(e)}") from None
    return from_llama_weights(hf_config, TensorFiles(d), structure, keep, dtype=dtype,
                              source=str(d))


@torch.no_grad()
def _assign(model: SubLLM, state: dict[str, Tensor], dtype: torch.dtype | None) -> SubLLM:
    """Put `state` into a meta-built model without copying it, and initialise what it does
    not cover (scorers, bypass scales, balancer statistics) as `SubLLM.init_weights` does."""
    model.load_state_dict(state, strict=False, assign=True)
    c = model.config
    for m in model.modules():
        if isinstance(m, Subsampler):
            if m.score.weight.is_meta:
                m.score.to_empty(device="cpu")
                m.score.weight.normal_(0.0, c.init_std)
            m.balancer.to_empty(device="cpu")
            m.balancer.g_rms.zero_()
        elif isinstance(m, Bypass) and m.scale.is_meta:
            m.to_empty(device="cpu")
            m.scale.fill_(c.bypass_init)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # an internal invariant: the tables above must be complete
        raise RuntimeError(f"weights left uninitialised: {left}")
    return model.to(dtype) if dtype is not None else model


# --------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: Path, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise SubLLMError(f"{missing}: {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubLLMError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(d, dict):
        raise SubLLMError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _natural(key: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


class TensorFiles(Mapping):
    """The tensors of a Hugging Face model directory by name, each read when asked for.

    Reads model.safetensors, sharded safetensors (model.safetensors.index.json) or
    pytorch_model.bin (sharded or not; memory-mapped, `weights_only=True`).
    """

    NAMES = ("model.safetensors.index.json", "model.safetensors",
             "pytorch_model.bin.index.json", "pytorch_model.bin")

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        d = Path(directory)
        found = next((d / n for n in self.NAMES if (d / n).is_file()), None)
        if found is None:
            raise SubLLMError(f"{d} holds no weights; looked for {', '.join(self.NAMES)}")
        if found.name.endswith(".index.json"):
            weight_map = _read_json(found, "no index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise SubLLMError(f"{found} has no weight_map; the checkpoint is damaged")
            files = sorted(set(weight_map.values()))
        else:
            files = [found.name]
        self._where: dict[str, Any] = {}
        for name in files:
            path = d / name
            try:
                if name.endswith(".safetensors"):
                    handle = safe_open(str(path), framework="pt")
                    self._where.update(dict.fromkeys(handle.keys(), handle))
                else:
                    state = _torch_load(path)
                    self._where.update(dict.fromkeys(state, state))
            except SubLLMError:
                raise
            except Exception as e:  # safetensors and torch raise many types
                raise SubLLMError(f"cannot read weights {path}: {_first_line(e)}") from None

    def __getitem__(self, key: str) -> Tensor:
        handle = self._where[key]
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _torch_load(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        inner = [k for k, v in state.items() if isinstance(v, dict)] if isinstance(
            state, dict) else []
        hint = (f"; it wraps one under {inner[0]!r}: save that entry alone "
                f"(torch.save(ckpt[{inner[0]!r}], 'weights.pt'))") if inner else ""
        raise SubLLMError(f"{path} is not a state_dict (a mapping of names to tensors){hint}")
    return state


def read_state_dict(path: str | Path) -> Mapping[str, Tensor]:
    """A raw state_dict file: safetensors (by suffix), else `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise SubLLMError(f"checkpoint {path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _torch_load(path)
    except SubLLMError:
        raise
    except Exception as e:  # unpickling and safetensors errors come in many types
        raise SubLLMError(
            f"cannot read checkpoint {path} ({_first_line(e)}); pass a raw state_dict saved "
            "with torch.save or a .safetensors file"
        ) from None


def _check_keys(present: Iterable[str], expected: Iterable[str], source: str,
                optional: Iterable[str] = (), ignored: Callable[[str], bool] = lambda k: False
                ) -> None:
    """A missing or unexpected weight is an error naming it (the first, in layer order)."""
    present, expected = set(present), set(expected)
    unexpected = sorted((k for k in present - expected - set(optional) if not ignored(k)),
                        key=_natural)
    missing = sorted(expected - present, key=_natural)
    if unexpected:
        key = unexpected[0]
        near = difflib.get_close_matches(key, missing, n=1, cutoff=0.8)
        hint = f" (is it {near[0]!r}, which is missing?)" if near else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise SubLLMError(f"{source}: unexpected key {key!r}{hint}{more}; the checkpoint does "
                          "not match the expected layout or config")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SubLLMError(f"{source}: missing key {missing[0]!r}{more}; the checkpoint does "
                          "not match the expected layout or config")


def _check_shape(key: str, t: Tensor, shape: tuple[int, ...], source: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise SubLLMError(f"{source}: {key!r} has shape {list(t.shape)} but the config implies "
                          f"{list(shape)}")


# --------------------------------------------------------------------------------------
# The SUBLLM authors' release
# --------------------------------------------------------------------------------------

# Their config JSON (class `SubllmConfig`): the fields that define the model.
OFFICIAL_REQUIRED = ("num_embeddings", "decoder_embed_dim", "decoder_ffn_embed_dim",
                     "decoder_layers", "decoder_attention_heads", "structure",
                     "tokens_per_sample", "tie_weights")
OFFICIAL_KEEP = "downsampling_factor_denominator"  # the keep ratio, as a string ("0.64")
# Aliases their config class maps onto the fields above: must agree with them if present.
OFFICIAL_ALIASES = {"vocab_size": "num_embeddings", "hidden_size": "decoder_embed_dim",
                    "n_layer": "decoder_layers", "n_head": "decoder_attention_heads"}
# Switches of their code whose other values build a model we do not implement.
OFFICIAL_FIXED = {"norm_name": "rmsnorm", "mlp_name": "swiglu", "qk_bias": False,
                  "bias": False, "scale_token_embedding": False, "no_scale_embedding": True}
# Fields that do not change what the weights compute: kernels, training-only settings,
# token ids (the token ids become the converted model's).
OFFICIAL_IGNORED = ("use_fused", "use_flash", "attn_type", "qkv_pack", "fix_zh", "n_positions",
                    "padding_idx", "bos_token_id", "eos_token_id", "pad_token_id", "dropout",
                    "attention_dropout", "activation_dropout", "activation_fn", "grad_scale",
                    "checkpoint_activations", "offload_activations", "min_params_to_wrap",
                    "model_parallel_size", "initialize_params_on_gpu", "inference")
# Their model's constants (DESIGN 2): RMSNorm eps 1e-5, rotary base 10000, no grouped KV.
OFFICIAL_NORM_EPS = 1e-5
OFFICIAL_ROPE_THETA = 10000.0


# What `PretrainedConfig.save_pretrained` of transformers 4.x (the release's) adds to a config.
_HF4_CONFIG_KEYS = (
    "_name_or_path", "add_cross_attention", "architectures", "auto_map", "bad_words_ids",
    "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
    "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
    "model_type", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript",
    "transformers_version", "typical_p", "use_bfloat16", "use_cache", "dtype",
)


def _hf_config_keys() -> set[str]:
    """Keys `PretrainedConfig.save_pretrained` writes (their config class is one); none of
    them changes their model (it ties weights by `tie_weights`, not `tie_word_embeddings`)."""
    from transformers import PretrainedConfig

    return set(PretrainedConfig().to_dict()) | set(_HF4_CONFIG_KEYS)


def official_model_config(cfg: Mapping[str, Any], source: str = "the config") -> ModelConfig:
    """Our ModelConfig of a model described by the authors' config JSON.

    A missing or unknown field, or a value we cannot reproduce, is an error naming it.
    """
    if not isinstance(cfg, Mapping):
        raise SubLLMError(f"{source} must be a JSON object, got {type(cfg).__name__}")
    for name in OFFICIAL_REQUIRED:
        if name not in cfg:
            raise SubLLMError(f"{source}: missing field {name!r} (the authors' config has "
                              f"{', '.join(OFFICIAL_REQUIRED)})")
    known = (set(OFFICIAL_REQUIRED) | {OFFICIAL_KEEP} | set(OFFICIAL_ALIASES)
             | set(OFFICIAL_FIXED) | set(OFFICIAL_IGNORED))
    unknown = sorted(k for k in cfg if k not in known and k not in _hf_config_keys())
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SubLLMError(f"{source}: unknown field {unknown[0]!r}{hint}; it is not part of the "
                          "authors' SubllmConfig, so what it changes cannot be converted")

    def integer(name: str) -> int:
        v = cfg[name]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SubLLMError(f"{source}: {name} must be a positive integer, got {v!r}")
        return v

    dims = {name: integer(name) for name in OFFICIAL_REQUIRED
            if name not in ("structure", "tie_weights")}
    for alias, name in OFFICIAL_ALIASES.items():
        if alias in cfg and cfg[alias] != cfg[name]:
            raise SubLLMError(f"{source}: {alias} is {cfg[alias]!r} but {name} is "
                              f"{cfg[name]!r}; they name the same size")
    for name, value in OFFICIAL_FIXED.items():
        if name in cfg and cfg[name] != value:
            raise SubLLMError(f"{source}: {name} is {cfg[name]!r}; only {value!r} (the released "
                              "SUBLLM) can be converted")
    structure, tie = cfg["structure"], cfg["tie_weights"]
    if not isinstance(structure, str):
        raise SubLLMError(f"{source}: structure must be a string over T ( ), got {structure!r}")
    if not isinstance(tie, bool):
        raise SubLLMError(f"{source}: tie_weights must be true or false, got {tie!r}")
    parse_structure(structure)
    if structure.count("T") != dims["decoder_layers"]:
        raise SubLLMError(f"{source}: structure {structure!r} has {structure.count('T')} 'T' "
                          f"blocks but decoder_layers is {dims['decoder_layers']}")
    keep: float = ModelConfig.keep  # unused by an all-"T" structure
    if "(" in structure or OFFICIAL_KEEP in cfg:
        if OFFICIAL_KEEP not in cfg:
            raise SubLLMError(f"{source}: missing field {OFFICIAL_KEEP!r} (the keep ratio, e.g. "
                              "\"0.64\"), needed by the structure's subsampling")
        raw = cfg[OFFICIAL_KEEP]
        try:
            keep = float(raw) if not isinstance(raw, bool) else float("nan")
        except (TypeError, ValueError):
            keep = float("nan")
        if not 0.0 < keep <= 1.0:
            raise SubLLMError(f"{source}: {OFFICIAL_KEEP} must be a keep ratio in (0, 1] such "
                              f"as \"0.64\", got {raw!r}")
    try:
        return ModelConfig(
            vocab_size=dims["num_embeddings"], dim=dims["decoder_embed_dim"],
            n_layers=dims["decoder_layers"], n_heads=dims["decoder_attention_heads"],
            ffn_dim=dims["decoder_ffn_embed_dim"], structure=structure, keep=keep,
            max_seq_len=dims["tokens_per_sample"], rope_theta=OFFICIAL_ROPE_THETA,
            norm_eps=OFFICIAL_NORM_EPS, tie_embeddings=tie,
        )
    except ConfigError as e:
        raise SubLLMError(f"{source}: {e}") from None


def _official_names(config: ModelConfig) -> dict[str, tuple[str, slice | None]]:
    """Our key -> (their key, rows of it), for every weight of `config`'s model."""
    f = config.ffn_dim
    names: dict[str, tuple[str, slice | None]] = {
        "embed_tokens.weight": ("decoder.embed_tokens.weight", None),
        "norm.weight": ("decoder.layer_norm.weight", None),
    }
    if not config.tie_embeddings:
        names["lm_head.weight"] = ("decoder.output_projection.weight", None)
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"decoder.layers.{i}."
        table = {
            "input_layernorm.weight": "self_attn_layer_norm.weight",
            "self_attn.q_proj.weight": "self_attn.q_proj.weight",
            "self_attn.k_proj.weight": "self_attn.k_proj.weight",
            "self_attn.v_proj.weight": "self_attn.v_proj.weight",
            "self_attn.o_proj.weight": "self_attn.out_proj.weight",
            "post_attention_layernorm.weight": "final_layer_norm.weight",
            "mlp.down_proj.weight": "feedforward.swiglu.w3.weight",
        }
        for a, b in table.items():
            names[ours + a] = (theirs + b, None)
        # w12 = [gate; up]: its first ffn rows pass through SiLU (SwiGLUInf.forward)
        w12 = theirs + "feedforward.swiglu.w12.weight"
        names[ours + "mlp.gate_proj.weight"] = (w12, slice(0, f))
        names[ours + "mlp.up_proj.weight"] = (w12, slice(f, 2 * f))
    # Subsamplers are numbered by their "(" in both; their bypasses by the ")": the
    # innermost segment closes first.
    closing: list[int] = []
    opened: list[int] = []
    for ch in config.structure:
        if ch == "(":
            opened.append(len(closing) + len(opened))
        elif ch == ")":
            closing.append(opened.pop())
    for j in range(len(closing)):
        names[f"subsamplers.{j}.score.weight"] = (f"decoder.downsamplers.{j}.to_scores.weight",
                                                  None)
    for j, seg in enumerate(closing):
        names[f"bypasses.{seg}.scale"] = (f"decoder.bypasses.{j}.bypass_scale", None)
    return names


def from_official(state: Mapping[str, Tensor], official_config: Mapping[str, Any], *,
                  dtype: torch.dtype | None = None, source: str = "the checkpoint",
                  config_source: str = "the config") -> SubLLM:
    """A SubLLM holding a checkpoint of the authors' release (`SubllmModel.state_dict()`).

    Eval-mode logits equal those of the authors' model on the same weights (DESIGN 3).
    dtype: of the result (default: that of the embedding).
    """
    config = official_model_config(official_config, config_source)
    with torch.device("meta"):
        model = SubLLM(config)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    names = _official_names(config)
    theirs_shape = {}
    for k, (theirs, rows) in names.items():
        s = shapes[k]
        theirs_shape[theirs] = (2 * s[0], *s[1:]) if rows is not None else s
    tied_out = "decoder.output_projection.weight"
    _check_keys(state.keys(), theirs_shape, source,
                optional=(tied_out,) if config.tie_embeddings else (),
                ignored=lambda key: key.endswith(".inv_freq"))
    for key, shape in theirs_shape.items():
        _check_shape(key, state[key], shape, source)
    embed = state["decoder.embed_tokens.weight"]
    if config.tie_embeddings and tied_out in state:
        out = state[tied_out]
        if out.shape != embed.shape or not torch.equal(out, embed):
            raise SubLLMError(f"{source}: tie_weights is true but {tied_out!r} differs from "
                              "'decoder.embed_tokens.weight'; set tie_weights to false")
    dtype = dtype or embed.dtype
    ours = {}
    for k, (theirs, rows) in names.items():
        t = state[theirs]
        # the halves of w12 are cloned: two views of one storage would be saved as shared
        ours[k] = t[rows].to(dtype, copy=True) if rows is not None else t.to(dtype)
    return _assign(model, ours, dtype)


# --------------------------------------------------------------------------------------
# Starting a training run from a model
# --------------------------------------------------------------------------------------


def load_pretrained(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], Path | None]:
    """(model config, weights, tokenizer.json or None) of a Hugging Face SubLLM directory
    (`subllm export` / `subllm convert`) or a `subllm train` run or checkpoint."""
    path = Path(path)
    if not path.exists():
        raise SubLLMError(f"{path} does not exist; pass a Hugging Face SubLLM directory "
                          "(subllm export / subllm convert) or a `subllm train` run")
    if not (path / "config.json").is_file():
        from subllm import checkpoint as ckpt

        c = ckpt.resolve_checkpoint(path)
        tokenizer = c / "tokenizer.json"
        return (ModelConfig.from_dict(ckpt.load_model_config(c)), ckpt.load_weights(c),
                tokenizer if tokenizer.is_file() else None)
    raw = _read_json(path / "config.json", "no config")
    kind = raw.get("model_type")
    if kind != "subllm":
        hint = (f"; convert it first: subllm convert --from-hf {path} --out NEW_DIR"
                if kind == "llama" else "")
        raise SubLLMError(f"{path} holds a {kind!r} model, not a SubLLM (model_type "
                          f"'subllm'){hint}")
    from subllm.hf.configuration_subllm import SubLLMConfig

    try:
        config = SubLLMConfig.from_pretrained(str(path)).to_model_config()
    except (OSError, ValueError, TypeError) as e:
        raise SubLLMError(f"cannot read {path / 'config.json'}: {_first_line(e)}") from None
    files = TensorFiles(path)
    state = {}
    for key in files:
        if not key.startswith("model."):  # SubLLMForCausalLM holds the SubLLM as `model`
            raise SubLLMError(f"{path}: unexpected weight {key!r}; not a SubLLM checkpoint")
        state[key[len("model."):]] = files[key]
    if config.tie_embeddings and "embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
    tokenizer = path / "tokenizer.json"
    return config, state, tokenizer if tokenizer.is_file() else None


# --------------------------------------------------------------------------------------
# `subllm convert`
# --------------------------------------------------------------------------------------

# What `AutoTokenizer.from_pretrained` reads from a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")


def _tokenizer_files(directory: Path) -> list[Path]:
    return [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]


def _check_tokenizer_vocab(directory: Path, vocab_size: int) -> None:
    if not (directory / "tokenizer.json").is_file():
        return  # a sentencepiece-only tokenizer: nothing cheap to count
    from subllm.data import load_tokenizer

    n = load_tokenizer(directory / "tokenizer.json").get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise SubLLMError(f"the tokenizer in {directory} has {n} tokens but the model's "
                          f"vocab_size is {vocab_size}; pass the model's own tokenizer")


def write_converted(model: SubLLM, out: str | Path, *, tokenizer: str | Path | None = None,
                    token_ids: Mapping[str, Any] | None = None,
                    generation_config: Path | None = None, dtype: str | None = None,
                    force: bool = False, info: dict[str, Any] | None = None) -> Path:
    """Write `model` as a Hugging Face SubLLM directory (`subllm.hf.export.save_hf_model`).

    tokenizer: a `tokenizers` tokenizer.json file, or a directory whose tokenizer files
    (TOKENIZER_FILES) are copied. token_ids: bos/eos/pad ids for config.json and the
    generation config (unless the tokenizer file sets them); generation_config: a
    generation_config.json to use instead of ours. `out` is written whole or not at all.
    """
    from subllm.hf.export import check_out_dir, replace_dir, save_hf_model

    out = check_out_dir(out, force)
    tok = Path(tokenizer) if tokenizer is not None else None
    if tok is not None and not tok.exists():
        raise SubLLMError(f"--tokenizer {tok} does not exist")
    copy_from = tok if tok is not None and tok.is_dir() else None
    if copy_from is not None:
        if not _tokenizer_files(copy_from):
            raise SubLLMError(f"--tokenizer {copy_from} holds no tokenizer files (looked for "
                              f"{', '.join(TOKENIZER_FILES)})")
        _check_tokenizer_vocab(copy_from, model.config.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.convert-", dir=out.parent))
    try:
        save_hf_model(model, staging, tok if copy_from is None else None, dtype=dtype,
                      force=True, info=info)
        for f in _tokenizer_files(copy_from) if copy_from is not None else []:
            shutil.copyfile(f, staging / f.name)
        if generation_config is not None:
            shutil.copyfile(generation_config, staging / "generation_config.json")
        ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
        if ids and (copy_from is not None or tok is None):  # a tokenizer file sets its own
            targets = ["config.json"] + (["generation_config.json"]
                                         if generation_config is None else [])
            for name in targets:
                d = json.loads((staging / name).read_text())
                d.update(ids)
                (staging / name).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        replace_dir(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def run_convert(args: argparse.Namespace) -> int:
    from subllm.hf.export import DTYPES, check_out_dir

    check_out_dir(args.out, args.force)  # fail before the work, not after
    dtype = DTYPES[args.dtype] if args.dtype else None
    torch.manual_seed(args.seed)  # the fresh scorers and bypass scales
    if args.from_hf is not None:
        if args.official_config is not None:
            raise SubLLMError("--official-config goes with --from-official, not --from-hf")
        from subllm.train import parse_keep

        src = Path(args.from_hf)
        keep = parse_keep(args.keep) if args.keep is not None else None
        model = from_hf_llama_dir(src, args.structure, keep, dtype=dtype)
        raw = _read_json(src / "config.json", "no config")
        token_ids = {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        gen = src / "generation_config.json"
        tokenizer = args.tokenizer or (src if _tokenizer_files(src) else None)
        info = {"converted from": f"Llama checkpoint {src}"}
        if model.config.is_subllm:
            info["freshly initialised"] = (f"{len(model.subsamplers)} scorer(s) and "
                                           f"{len(model.bypasses)} bypass scale(s)")
    else:
        if args.official_config is None:
            raise SubLLMError("--from-official needs --official-config CONFIG_JSON (the "
                              "release's model config)")
        for flag in ("structure", "keep"):
            if getattr(args, flag) is not None:
                raise SubLLMError(f"--{flag} does not apply to --from-official: the structure "
                                  "and keep ratio come from --official-config")
        src = Path(args.from_official)
        cfg_path = Path(args.official_config)
        official = _read_json(cfg_path, "--official-config")
        official_model_config(official, str(cfg_path))  # config errors before reading weights
        model = from_official(read_state_dict(src), official, dtype=dtype, source=str(src),
                              config_source=str(cfg_path))
        token_ids = {"bos_token_id": official.get("bos_token_id"),
                     "eos_token_id": official.get("eos_token_id"),
                     "pad_token_id": official.get("pad_token_id", official.get("padding_idx"))}
        gen = None
        tokenizer = args.tokenizer
        info = {"converted from": f"SUBLLM release checkpoint {src} ({cfg_path.name})"}
    out = write_converted(model, args.out, tokenizer=tokenizer, token_ids=token_ids,
                          generation_config=gen if gen is not None and gen.is_file() else None,
                          dtype=args.dtype, force=args.force, info=info)
    c = model.config
    what = (f"SUBLLM {c.structure} (keep {c.keep})" if c.is_subllm
            else f"LLaMA ({c.n_layers} blocks)")
    print(f"converted {src} -> {out}: {what}, {model.num_params() / 1e6:.2f}M parameters"
          + ("" if tokenizer else "; no tokenizer (pass --tokenizer FILE_OR_DIR)"))
    print(f"continue training: subllm train --init-from {out} --data DATA_DIR --out RUN_DIR")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="turn a Llama or a SUBLLM-release checkpoint into a Hugging Face SubLLM directory",
        description="Write a Hugging Face SubLLM directory (as `subllm export` does) from a "
        "local transformers Llama checkpoint (--from-hf: blocks copied, scorers and bypass "
        "scales freshly initialised) or from a checkpoint of the SUBLLM authors' release "
        "(--from-official). Continue training it with `subllm train --init-from DIR`.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="LLAMA_DIR",
                        help="a transformers Llama directory (config.json + safetensors)")
    source.add_argument("--from-official", metavar="CHECKPOINT",
                        help="the authors' state_dict: a torch.save file or .safetensors")
    p.add_argument("--official-config", metavar="CONFIG_JSON",
                   help="the authors' model config JSON (with --from-official)")
    p.add_argument("--structure", metavar="S", help="with --from-hf: structure over T ( ), one "
                   "'T' per Llama layer (default: all 'T', a LLaMA)")
    p.add_argument("--keep", metavar="K", help="with --from-hf: keep ratio, or one per depth: "
                   "0.64,0.5 (default 0.64)")
    p.add_argument("--tokenizer", metavar="FILE_OR_DIR", help="a tokenizer.json, or a "
                   "directory of Hugging Face tokenizer files (default with --from-hf: the "
                   "Llama directory's)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the saved weights (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the freshly initialised weights (default 0)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_convert)
