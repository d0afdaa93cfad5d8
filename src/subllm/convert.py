"""Conversion between our models and `transformers.LlamaForCausalLM`.

Our block weights carry Hugging Face's names, so the mapping is a prefix table:
`layers.*`, `embed_tokens`, `norm` live under `model.` in transformers; `lm_head` at the
top. Subsampling scorers and bypass scales have no Llama counterpart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from subllm.config import ModelConfig
from subllm.errors import ConfigError, SubLLMError
from subllm.model import SubLLM

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
    result is the same LLaMA.
    """
    config = _config_from_hf(hf_model.config, structure, keep)
    model = SubLLM(config)
    hf_state = hf_model.state_dict()
    state = {}
    for k in model.state_dict():
        hk = _ours_to_hf_key(k)
        if hk is None:
            continue
        if hk not in hf_state:
            if hk == "lm_head.weight" and config.tie_embeddings:
                continue
            raise SubLLMError(f"the Llama checkpoint has no weight {hk!r}")
        state[k] = hf_state[hk]
    missing, _ = model.load_state_dict(state, strict=False)
    fresh = [m for m in missing if not m.startswith(("subsamplers.", "bypasses."))]
    fresh = [m for m in fresh if not (config.tie_embeddings and m == "lm_head.weight")]
    if fresh:
        raise RuntimeError(f"weights left uninitialised: {fresh}")
    dtype = next(hf_model.parameters()).dtype
    return model.to(dtype=dtype) if dtype != torch.float32 else model
