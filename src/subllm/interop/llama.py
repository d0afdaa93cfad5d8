"""Our models to and from `transformers`' Llama.

Our block weights carry Hugging Face's names, so the mapping is a prefix table:
`layers.*`, `embed_tokens`, `norm` live under `model.` in transformers; `lm_head` at the
top. Subsampling scorers and bypass scales have no Llama counterpart and start freshly
initialised. `from_hf_llama` takes a `LlamaForCausalLM`; `from_hf_llama_dir` reads a
checkpoint directory one tensor at a time into a model built on the meta device, so
converting holds one copy of the weights, never two.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from subllm.errors import ConfigError, SubLLMError
from subllm.interop.weights import TensorFiles, check_keys, check_shape, first_line, read_json
from subllm.model.bypass import Bypass
from subllm.model.config import ModelConfig, parse_structure
from subllm.model.subllm import SubLLM
from subllm.model.subsample import CUTOFF_BUFFERS, Subsampler


def _ours_to_hf_key(key: str) -> str | None:
    if key.startswith(("subsamplers.", "bypasses.")):
        return None
    if key.startswith("lm_head."):
        return key
    return "model." + key


def hf_llama_config(config: ModelConfig) -> LlamaConfig:
    """The `transformers.LlamaConfig` of a LLaMA-structured ModelConfig."""
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
    """A SubLLM of the given structure whose blocks are the Llama's (design.md §2).

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


def from_hf_llama_dir(directory: str | Path, structure: str | None = None,
                      keep: float | list[float] | None = None, *,
                      dtype: torch.dtype | None = None) -> SubLLM:
    """`from_hf_llama` on a local Llama checkpoint directory (config.json + safetensors or
    pytorch_model*.bin, sharded or not), without building a `LlamaForCausalLM`."""
    d = Path(directory)
    raw = read_json(d / "config.json", f"{d} is not a Hugging Face model directory")
    if raw.get("model_type") != "llama":
        raise SubLLMError(
            f"{d} holds a {raw.get('model_type')!r} model; --from-hf converts Llama checkpoints "
            "(model_type 'llama') only"
        )
    try:
        hf_config = LlamaConfig.from_pretrained(str(d))
    except (OSError, ValueError, TypeError) as e:
        raise SubLLMError(f"cannot read {d / 'config.json'}: {first_line(e)}") from None
    return from_llama_weights(hf_config, TensorFiles(d), structure, keep, dtype=dtype,
                              source=str(d))


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
