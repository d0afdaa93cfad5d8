"""Our models to and from `transformers`' Llama-family causal LMs: Llama (2, 3, 3.1's rope
scaling), Qwen2 / Qwen2.5, Qwen3 and Mistral (design.md §2.1).

Our block weights carry Hugging Face's names (`q_proj`, `q_proj.bias`, `q_norm`, ...), so
the mapping is a prefix table: `layers.*`, `embed_tokens`, `norm` live under `model.` in
transformers; `lm_head` at the top. Subsampling scorers and bypass scales have no
counterpart and start freshly initialised. `from_hf` takes a model object; `from_hf_dir`
reads a checkpoint directory one tensor at a time into a model built on the meta device, so
converting holds one copy of the weights, never two. What a family can express that our
blocks cannot (MLP biases, other activations, unknown rope types, partial rotary, longrope,
layers that differ in attention) is an error naming it: a converted model computes what
`transformers` computes from the same directory, or is refused.

One reading of a `transformers` config (`hf_config_from_dict`, `model_config_of_hf`) serves
`subllm convert`, `info`, `estimate --hf-config` and `train`, so they accept and refuse the
same configs. The source's bos/eos/pad ids and generation config travel with the converted
model (`hf_token_ids`, `hf_generation_config`) and `to_hf` writes them back.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from subllm.errors import ConfigError, SubLLMError
from subllm.interop.weights import TensorFiles, check_keys, check_shape, first_line, read_json
from subllm.model.bypass import Bypass
from subllm.model.config import ROPE_SCALING_KEYS, ModelConfig, parse_structure
from subllm.model.subllm import SubLLM
from subllm.model.subsample import CUTOFF_BUFFERS, Subsampler

# model_type -> (config class, causal-LM class) names in `transformers`.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _family_classes(family: str) -> tuple[type, type]:
    import transformers

    config_name, model_name = FAMILIES[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _ours_to_hf_key(key: str) -> str | None:
    if key.startswith(("subsamplers.", "bypasses.")):
        return None
    if key.startswith("lm_head."):
        return key
    return "model." + key


def infer_family(config: ModelConfig) -> str:
    """The `transformers` family a LLaMA-structured config is written as: the one it was
    converted from (`hf_family`), else the one whose features it uses."""
    if config.hf_family is not None:
        return config.hf_family
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias and not config.o_bias:
        return "qwen2"
    if config.sliding_window is not None:
        return "mistral"
    return "llama"


def hf_config_of(config: ModelConfig, family: str | None = None,
                 token_ids: Mapping[str, Any] | None = None) -> Any:
    """The `transformers` config (LlamaConfig, Qwen2Config, ...) of a ModelConfig, with the
    bos/eos/pad ids in `token_ids` (default: the family's)."""
    family = family or infer_family(config)
    if family not in FAMILIES:
        raise SubLLMError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    c = config
    # What each family's blocks can hold: (q/k/v bias, o bias) and qk-norm.
    biases = {"llama": {(False, False), (True, True)}, "qwen2": {(True, False)},
              "qwen3": {(False, False), (True, True)}, "mistral": {(False, False)}}[family]
    if (c.qkv_bias, c.o_bias) not in biases or c.qk_norm != (family == "qwen3"):
        raise SubLLMError(
            f"a {family} model cannot hold this config (qkv_bias={c.qkv_bias}, "
            f"o_bias={c.o_bias}, qk_norm={c.qk_norm}); pass family={infer_family(c)!r}"
        )
    if c.sliding_window is not None and family == "llama":
        raise SubLLMError("a llama model has no sliding window; pass family='mistral'")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
    if rope["rope_type"] == "dynamic":  # HF takes the original context from the model's
        rope.pop("original_max_position_embeddings")
    kwargs: dict[str, Any] = dict(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.resolved_head_dim,
        max_position_embeddings=(c.rope_scaling["original_max_position_embeddings"]
                                 if rope["rope_type"] == "dynamic" else c.max_seq_len),
        rms_norm_eps=c.norm_eps, rope_parameters=rope, tie_word_embeddings=c.tie_embeddings,
        hidden_act="silu", initializer_range=c.init_std, **(token_ids or {}),
    )
    if family == "llama":
        kwargs.update(attention_bias=c.qkv_bias, mlp_bias=False)
    elif family == "qwen3":
        kwargs["attention_bias"] = c.qkv_bias
    if family == "mistral":
        kwargs["sliding_window"] = c.sliding_window
    elif family in ("qwen2", "qwen3"):  # every layer slides (we only run inside the window)
        kwargs.update(use_sliding_window=c.sliding_window is not None,
                      sliding_window=c.sliding_window, max_window_layers=0)
    config_class, _ = _family_classes(family)
    return config_class(**kwargs)


def hf_llama_config(config: ModelConfig) -> Any:
    """The `transformers.LlamaConfig` of a LLaMA-structured ModelConfig."""
    return hf_config_of(config, "llama")


def to_hf(model: Any, family: str | None = None, *,
          token_ids: Mapping[str, Any] | None = None) -> Any:
    """The `transformers` causal LM of a LLaMA-structured model, with the same weights: of
    the family it was converted from (LlamaForCausalLM, Qwen2ForCausalLM, ...), or `family`.

    `model`: a SubLLM, or a `SubLLMForCausalLM` (say, a `subllm convert` directory loaded
    with `AutoModelForCausalLM`). The bos/eos/pad ids (an eos list included) and the
    generation config are the source's: those of the SubLLMForCausalLM, or those `from_hf`
    recorded; `token_ids` overrides them. A model of our own gets the family's defaults.
    """
    generation = None
    if not isinstance(model, SubLLM) and isinstance(getattr(model, "model", None), SubLLM):
        ids = {k: v for k in TOKEN_ID_KEYS if (v := getattr(model.config, k, None)) is not None}
        generation = getattr(model, "generation_config", None)
        model = model.model
    else:
        ids = dict(getattr(model, "hf_token_ids", None) or {})
        generation = getattr(model, "hf_generation_config", None)
    ids.update(token_ids or {})
    if model.config.is_subllm:
        raise SubLLMError(
            f"to_hf needs a LLaMA structure (only 'T'), this model has "
            f"{model.config.structure!r}; subsampled models export with `subllm export`"
        )
    hf_config = hf_config_of(model.config, family, ids)
    _, model_class = _family_classes(hf_config.model_type)
    hf = model_class(hf_config)
    if generation is not None:
        hf.generation_config = copy_module.deepcopy(generation)
        hf.generation_config.update(**(token_ids or {}))
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


def to_hf_llama(model: SubLLM) -> Any:
    """`to_hf` as a `transformers.LlamaForCausalLM` (the name of the Llama-only version)."""
    if model.config.is_subllm:
        raise SubLLMError(
            f"to_hf_llama needs a LLaMA structure (only 'T'), this model has "
            f"{model.config.structure!r}; subsampled models export with `subllm export`"
        )
    return to_hf(model, "llama")


def _rope_scaling_from_hf(c: Any, family: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, ModelConfig.rope_scaling) of a transformers config."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    theta = float(rope.pop("rope_theta", getattr(c, "rope_theta", 10000.0)))
    partial = rope.pop("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial rotary embeddings (partial_rotary_factor={partial}) are "
                          "not supported")
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope scaling {rope_type!r} is not supported; supported: "
                          f"{', '.join(ROPE_SCALING_KEYS)} (or none)")
    if rope_type == "dynamic":  # transformers' original context is the model's
        rope["original_max_position_embeddings"] = c.max_position_embeddings
    if rope_type == "yarn" and rope.get("factor") is None:  # transformers' fallback
        rope["factor"] = c.max_position_embeddings / rope["original_max_position_embeddings"]
    rope = {k: v for k, v in rope.items() if v is not None}  # None: transformers' default
    return theta, {"rope_type": rope_type, **rope}


def _sliding_window_from_hf(c: Any, family: str) -> int | None:
    """The window every layer attends within (None: full attention), as `transformers`
    applies it: Qwen2/3 per `layer_types` (from use_sliding_window and max_window_layers),
    Mistral on every layer, or per `layer_types` where the config has them (AutoModel then
    loads it as Ministral). Our blocks share one window: layers that differ are refused."""
    if family == "llama":  # LlamaAttention has no window, whatever the config says
        return None
    window = getattr(c, "sliding_window", None)  # Qwen's is None without use_sliding_window
    kinds = list(getattr(c, "layer_types", None) or [])
    if not kinds:
        return window
    other = sorted(set(kinds) - {"full_attention", "sliding_attention"})
    if other:
        raise ConfigError(f"layer_types {other[0]!r} is not supported; layers with "
                          "'full_attention' or 'sliding_attention' are")
    if window is None and "sliding_attention" in kinds:  # transformers cannot run it either
        raise ConfigError("layer_types has 'sliding_attention' layers but no sliding_window "
                          "(Qwen: use_sliding_window is false); set both or neither")
    windows = {window if kind == "sliding_attention" else None for kind in kinds}
    if len(windows) > 1:
        qwen = (f"; max_window_layers={getattr(c, 'max_window_layers', None)}"
                if family in ("qwen2", "qwen3") else "")
        raise ConfigError(
            f"a sliding window on some layers only ({kinds.count('sliding_attention')} of "
            f"{len(kinds)} in layer_types slide, sliding_window={window}{qwen}) is not "
            "supported: our blocks share one attention, so the logits would differ; every "
            "layer sliding, or none, is")
    return windows.pop()


def _config_from_hf(hf_config: Any, structure: str | None, keep: float | list[float] | None,
                    max_seq_len: int | None = None) -> ModelConfig:
    """max_seq_len: the context of the result (default: max_position_embeddings); RoPE at
    any position is that of `transformers`, which has no limit, so it may be longer."""
    c = hf_config
    family = getattr(c, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(f"model_type {family!r} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")
    act = getattr(c, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"only SiLU (SwiGLU) MLPs are supported, this model uses {act!r}")
    if getattr(c, "mlp_bias", False):
        raise ConfigError("MLP biases (mlp_bias=true) are not supported")
    theta, scaling = _rope_scaling_from_hf(c, family)
    n_layers = c.num_hidden_layers
    if structure is not None:
        parse_structure(structure)  # a malformed string is an error naming the position
        if structure.count("T") != n_layers:
            raise ConfigError(
                f"structure {structure!r} has {structure.count('T')} 'T' blocks but the model "
                f"has {n_layers} layers (num_hidden_layers); write exactly {n_layers} 'T's"
            )
    attention_bias = bool(getattr(c, "attention_bias", False))
    kwargs: dict[str, Any] = dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=n_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        ffn_dim=c.intermediate_size, max_seq_len=max_seq_len or c.max_position_embeddings,
        rope_theta=theta, rope_scaling=scaling, norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        structure=structure or "T" * n_layers, hf_family=family,
        qkv_bias=family == "qwen2" or (family != "mistral" and attention_bias),
        o_bias=family in ("llama", "qwen3") and attention_bias,
        qk_norm=family == "qwen3",
        sliding_window=_sliding_window_from_hf(c, family),
    )
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim != c.hidden_size // c.num_attention_heads:
        kwargs["head_dim"] = head_dim
    if keep is not None:
        kwargs["keep"] = keep
    return ModelConfig(**kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings while it reads a config (a Mistral config with layer_types,
    rope keys): what matters to the conversion is checked here and said in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def hf_config_from_dict(raw: dict[str, Any], where: str) -> Any:
    """The `transformers` config (LlamaConfig, ...) of a config.json's dict, or one line
    saying what is wrong (transformers' own validation included: an odd head_dim, a field
    of the wrong type, layer_types of the wrong length)."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise SubLLMError(f"{where}: model_type {family!r} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")
    config_class, _ = _family_classes(family)
    try:
        with _quiet():
            return config_class.from_dict(raw)
    except Exception as e:  # transformers and huggingface_hub raise many types
        raise SubLLMError(f"cannot read {where}: {first_line(e)}") from None


def model_config_of_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    """The all-"T" ModelConfig a `transformers` config.json (a dict) converts into: what
    `subllm convert --from-hf` builds. The one validation of such a config: `subllm
    convert`, `info`, `estimate --hf-config` and `train` accept and refuse the same ones."""
    return _checked_config(hf_config_from_dict(raw, where), where)


def _checked_config(hf_config: Any, where: str, max_seq_len: int | None = None
                    ) -> ModelConfig:
    try:
        return _config_from_hf(hf_config, None, None, max_seq_len)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def from_hf(hf_model: Any, structure: str | None = None,
            keep: float | list[float] | None = None, *,
            max_seq_len: int | None = None) -> SubLLM:
    """A SubLLM of the given structure whose blocks are those of a `transformers`
    LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or MistralForCausalLM
    (design.md §2.1).

    Scorers and bypass scales are freshly initialised; with structure None (all "T") the
    result is the same LLaMA. The weights are copied: training the result leaves the Llama
    untouched. max_seq_len: the result's context (default: max_position_embeddings). The
    source's bos/eos/pad ids and generation config are kept for `to_hf`.
    """
    config = hf_model.config
    if type(hf_model).__name__ == "MistralForCausalLM" and getattr(config, "layer_types", None):
        config = copy_module.copy(config)  # this class slides on every layer, whatever
        config.layer_types = None  # layer_types says (AutoModel loads those as Ministral)
    dtype = next(hf_model.parameters()).dtype
    model = from_llama_weights(config, hf_model.state_dict(), structure, keep, dtype=dtype,
                               copy=True, max_seq_len=max_seq_len)
    model.hf_token_ids = {k: v for k in TOKEN_ID_KEYS
                          if (v := getattr(hf_model.config, k, None)) is not None}
    model.hf_generation_config = copy_module.deepcopy(getattr(hf_model, "generation_config",
                                                              None))
    return model


from_hf_llama = from_hf  # the name of the Llama-only version


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def from_llama_weights(hf_config: Any, weights: Mapping[str, Tensor],
                       structure: str | None = None, keep: float | list[float] | None = None,
                       *, dtype: torch.dtype | None = None, copy: bool = False,
                       source: str = "the checkpoint", max_seq_len: int | None = None
                       ) -> SubLLM:
    """`from_hf` from a `transformers` config and weights by name (`model.layers.0...`).

    `weights` may read lazily (`TensorFiles`): tensors are taken one at a time into a model
    built on the meta device. dtype: of the result (default: that of the embedding).
    """
    config = _config_from_hf(hf_config, structure, keep, max_seq_len)
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if (config.tie_embeddings and head in weights and embed in weights
            and not _same_tensor(weights[head], weights[embed])):
        # transformers keeps a head the checkpoint holds apart from the embedding (it warns
        # and does not tie, whatever tie_word_embeddings says): so do we
        config = dataclasses.replace(config, tie_embeddings=False)
    with torch.device("meta"):
        model = SubLLM(config)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    names = {}  # our key -> Llama key
    for k in shapes:
        hk = _ours_to_hf_key(k)
        if hk is not None and not (config.tie_embeddings and hk == "lm_head.weight"):
            names[k] = hk
    check_keys(weights.keys(), names.values(), source,
                optional=("lm_head.weight",) if config.tie_embeddings else (),
                ignored=lambda key: key.endswith("rotary_emb.inv_freq"))
    state = {}
    for k, hk in names.items():
        t = weights[hk]
        check_shape(hk, t, shapes[k], source)
        dtype = dtype or t.dtype
        state[k] = t.to(dtype, copy=copy)
    return assign_weights(model, state, dtype)


def from_hf_dir(directory: str | Path, structure: str | None = None,
                keep: float | list[float] | None = None, *,
                dtype: torch.dtype | None = None, max_seq_len: int | None = None) -> SubLLM:
    """`from_hf` on a local checkpoint directory of a supported family (config.json +
    safetensors or pytorch_model*.bin, sharded or not), without building the model. The
    bos/eos/pad ids config.json states and generation_config.json are kept for `to_hf`."""
    d = Path(directory)
    raw = read_json(d / "config.json", f"{d} is not a Hugging Face model directory")
    family = raw.get("model_type")
    if family not in FAMILIES:
        archs = raw.get("architectures") or []
        what = f"{family!r} ({archs[0]})" if archs else repr(family)
        raise SubLLMError(
            f"{d} holds a {what} model; --from-hf converts model_type "
            f"{', '.join(FAMILIES)} (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
            "MistralForCausalLM)"
        )
    where = str(d / "config.json")
    hf_config = hf_config_from_dict(raw, where)
    _checked_config(hf_config, where, max_seq_len)  # what info and estimate accept
    _config_from_hf(hf_config, structure, keep, max_seq_len)  # and the flags; before weights
    generation = None
    if (d / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            with _quiet():
                generation = GenerationConfig.from_pretrained(str(d))
        except Exception as e:  # transformers raises many types
            raise SubLLMError(f"cannot read {d / 'generation_config.json'}: "
                              f"{first_line(e)}") from None
    model = from_llama_weights(hf_config, TensorFiles(d), structure, keep, dtype=dtype,
                               source=str(d), max_seq_len=max_seq_len)
    model.hf_token_ids = {k: raw[k] for k in TOKEN_ID_KEYS if raw.get(k) is not None}
    model.hf_generation_config = generation
    return model


from_hf_llama_dir = from_hf_dir  # the name of the Llama-only version


@torch.no_grad()
def assign_weights(model: SubLLM, state: dict[str, Tensor], dtype: torch.dtype | None) -> SubLLM:
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
            for name in CUTOFF_BUFFERS:  # the calibrated cut-off starts at 0
                if getattr(m, name).is_meta:
                    m.register_buffer(name, torch.zeros(()))
        elif isinstance(m, Bypass) and m.scale.is_meta:
            m.to_empty(device="cpu")
            m.scale.fill_(c.bypass_init)
    if c.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    left = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # an internal invariant: the tables above must be complete
        raise RuntimeError(f"weights left uninitialised: {left}")
    return model.to(dtype) if dtype is not None else model


def hf_config_shape(path: str) -> Any:
    """The ModelShape of a transformers config.json (or a directory holding one), read by
    the validation `subllm convert --from-hf` uses: what one accepts, the other does."""
    from subllm.planner import load_hf_config, shape_from_hf_config

    cfg = load_hf_config(path)
    p = Path(path)
    model_config_of_hf(cfg, str(p / "config.json" if p.is_dir() else p))
    return shape_from_hf_config(cfg, p.parent.name if p.name == "config.json" else p.stem)
