"""Our models to and from `transformers`' Llama-family causal LMs: Llama (2, 3, 3.1's rope
scaling), Qwen2 / Qwen2.5, Qwen3 and Mistral (design.md §2.1).

Our block weights carry Hugging Face's names (`q_proj`, `q_proj.bias`, `q_norm`, ...), so
the mapping is a prefix table: `layers.*`, `embed_tokens`, `norm` live under `model.` in
transformers; `lm_head` at the top. Subsampling scorers and bypass scales have no
counterpart and start freshly initialised. `from_hf` takes a model object; `from_hf_dir`
reads a checkpoint directory one tensor at a time into a model built on the meta device, so
converting holds one copy of the weights, never two. What a family can express that our
blocks cannot (MLP biases, other activations, unknown rope types, partial rotary, longrope)
is an error naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def hf_config_of(config: ModelConfig, family: str | None = None) -> Any:
    """The `transformers` config (LlamaConfig, Qwen2Config, ...) of a ModelConfig."""
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
        hidden_act="silu", initializer_range=c.init_std,
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


def to_hf(model: SubLLM, family: str | None = None) -> Any:
    """The `transformers` causal LM of a LLaMA-structured model, with the same weights: of
    the family it was converted from (LlamaForCausalLM, Qwen2ForCausalLM, ...), or `family`."""
    if model.config.is_subllm:
        raise SubLLMError(
            f"to_hf needs a LLaMA structure (only 'T'), this model has "
            f"{model.config.structure!r}; subsampled models export with `subllm export`"
        )
    hf_config = hf_config_of(model.config, family)
    _, model_class = _family_classes(hf_config.model_type)
    hf = model_class(hf_config)
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
    if family == "mistral":
        return getattr(c, "sliding_window", None)
    kinds = set(getattr(c, "layer_types", None) or [])
    if family in ("qwen2", "qwen3") and "sliding_attention" in kinds:
        if kinds != {"sliding_attention"}:  # Qwen: layers from max_window_layers on slide
            raise ConfigError(
                f"a sliding window on some layers only (use_sliding_window with "
                f"max_window_layers={getattr(c, 'max_window_layers', None)}) is not "
                "supported; one window for every layer is")
        return c.sliding_window
    return None


def _config_from_hf(hf_config: Any, structure: str | None, keep: float | list[float] | None
                    ) -> ModelConfig:
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
        ffn_dim=c.intermediate_size, max_seq_len=c.max_position_embeddings,
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


def model_config_of_hf(raw: dict[str, Any], where: str) -> ModelConfig:
    """The all-"T" ModelConfig a `transformers` config.json (a dict) converts into: what
    `subllm convert --from-hf` would build (`subllm info`)."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise SubLLMError(f"{where}: model_type {family!r} is not supported; supported: "
                          f"{', '.join(FAMILIES)}")
    config_class, _ = _family_classes(family)
    try:
        hf_config = config_class.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise SubLLMError(f"cannot read {where}: {first_line(e)}") from None
    return _config_from_hf(hf_config, None, None)


def from_hf(hf_model: Any, structure: str | None = None,
            keep: float | list[float] | None = None) -> SubLLM:
    """A SubLLM of the given structure whose blocks are those of a `transformers`
    LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or MistralForCausalLM
    (design.md §2.1).

    Scorers and bypass scales are freshly initialised; with structure None (all "T") the
    result is the same LLaMA. The weights are copied: training the result leaves the Llama
    untouched.
    """
    dtype = next(hf_model.parameters()).dtype
    return from_llama_weights(hf_model.config, hf_model.state_dict(), structure, keep,
                              dtype=dtype, copy=True)


from_hf_llama = from_hf  # the name of the Llama-only version


def from_llama_weights(hf_config: Any, weights: Mapping[str, Tensor],
                       structure: str | None = None, keep: float | list[float] | None = None,
                       *, dtype: torch.dtype | None = None, copy: bool = False,
                       source: str = "the checkpoint") -> SubLLM:
    """`from_hf` from a `transformers` config and weights by name (`model.layers.0...`).

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
                dtype: torch.dtype | None = None) -> SubLLM:
    """`from_hf` on a local checkpoint directory of a supported family (config.json +
    safetensors or pytorch_model*.bin, sharded or not), without building the model."""
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
    config_class, _ = _family_classes(family)
    try:
        hf_config = config_class.from_pretrained(str(d))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise SubLLMError(f"cannot read {d / 'config.json'}: {first_line(e)}") from None
    _config_from_hf(hf_config, structure, keep)  # what is unsupported, before any weights
    return from_llama_weights(hf_config, TensorFiles(d), structure, keep, dtype=dtype,
                              source=str(d))


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
