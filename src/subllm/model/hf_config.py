"""`SubLLMConfig`: the Hugging Face configuration of a SUBLLM / LLaMA model.

Standard fields carry `transformers`' names (`hidden_size`, `num_hidden_layers`, ...), so
tools that read a config.json generically (lm-eval, planners, our own `subllm estimate
--hf-config`) understand it; the SUBLLM-specific fields carry the names of `ModelConfig`.
`to_model_config()` / `from_model_config()` convert.

It imports only `transformers.PretrainedConfig` (no torch model code), so registering it
with `AutoConfig` is cheap; see `subllm.autoregister`.
"""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from .config import (
    SAVED_WITHOUT_RANK_BAND,
    SAVED_WITHOUT_THRESHOLD,
    ModelConfig,
    drop_retired,
)

# SubLLMConfig field -> ModelConfig field, where the names differ.
HF_TO_OURS = {
    "hidden_size": "dim",
    "intermediate_size": "ffn_dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_std",
    # not `rope_scaling` / `rope_parameters`: PretrainedConfig rewrites those (transformers
    # v5's rope standardisation); ours is ModelConfig.rope_scaling as it is
    "rope_scaling_params": "rope_scaling",
}
# ModelConfig fields stored under their own name.
SAME_NAME = (
    "vocab_size", "structure", "keep", "rope_theta", "head_dim",
    "bypass_init", "bypass_min_start", "bypass_min_end", "bypass_min_steps", "bypass_limit_prob",
    "balancer_prob_start", "balancer_prob_end", "balancer_prob_steps", "balancer_strength",
    "balancer_margin", "balancer_rms_min", "balancer_rms_max", "balancer", "threshold",
    "threshold_decay", "rank_band",
    "rope_positions",
    "qkv_bias", "o_bias", "qk_norm", "sliding_window", "hf_family",
)
_D = ModelConfig.__dataclass_fields__


def _default(name: str):
    return _D[name].default


class SubLLMConfig(PretrainedConfig):
    """Configuration of `SubLLMForCausalLM` (`model_type="subllm"`).

    `structure` is the SUBLLM structure string ("T" per block, "(" subsampling, ")"
    upsampling + bypass; all "T" = LLaMA) and `keep` the keep ratio (one float, or one per
    nesting depth). Everything else is a LLaMA hyper-parameter.
    """

    model_type = "subllm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = _default("vocab_size")
    hidden_size: int = _default("dim")
    intermediate_size: int = _default("ffn_dim")
    num_hidden_layers: int = _default("n_layers")
    num_attention_heads: int = _default("n_heads")
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = _default("max_seq_len")
    rope_theta: float = _default("rope_theta")
    rms_norm_eps: float = _default("norm_eps")
    tie_word_embeddings: bool = _default("tie_embeddings")
    initializer_range: float = _default("init_std")
    structure: str | None = None
    keep: float | list[float] = _default("keep")
    bypass_init: float = _default("bypass_init")
    bypass_min_start: float = _default("bypass_min_start")
    bypass_min_end: float = _default("bypass_min_end")
    bypass_min_steps: int = _default("bypass_min_steps")
    bypass_limit_prob: float = _default("bypass_limit_prob")
    balancer_prob_start: float = _default("balancer_prob_start")
    balancer_prob_end: float = _default("balancer_prob_end")
    balancer_prob_steps: int = _default("balancer_prob_steps")
    balancer_strength: float = _default("balancer_strength")
    balancer_margin: float = _default("balancer_margin")
    balancer_rms_min: float = _default("balancer_rms_min")
    balancer_rms_max: float = _default("balancer_rms_max")
    balancer: str = _default("balancer")
    threshold: str = _default("threshold")
    threshold_decay: float = _default("threshold_decay")
    rank_band: float | None = _default("rank_band")
    rope_positions: str = _default("rope_positions")
    rope_scaling_params: dict | None = None
    qkv_bias: bool = _default("qkv_bias")
    o_bias: bool = _default("o_bias")
    qk_norm: bool = _default("qk_norm")
    sliding_window: int | None = None
    hf_family: str | None = None
    hidden_act: str = "silu"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.structure is None:
            self.structure = "T" * self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.keep, tuple):
            self.keep = list(self.keep)
        super().__post_init__(**kwargs)
        self.to_model_config()  # validate: a bad structure or shape fails here, by name

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # a config.json without `threshold` was exported before the rule was a choice
        if "threshold" not in config_dict and "threshold" not in kwargs:
            config_dict = {**config_dict, "threshold": SAVED_WITHOUT_THRESHOLD}
        if "rank_band" not in config_dict and "rank_band" not in kwargs:  # exported before it
            config_dict = {**config_dict, "rank_band": SAVED_WITHOUT_RANK_BAND}
        config_dict = drop_retired(config_dict)
        return super().from_dict(config_dict, **kwargs)

    def model_config_kwargs(self) -> dict:
        kwargs = {ours: getattr(self, hf) for hf, ours in HF_TO_OURS.items()}
        kwargs.update({name: getattr(self, name) for name in SAME_NAME})
        return kwargs

    def to_model_config(self, config_class: type = ModelConfig) -> ModelConfig:
        """The `ModelConfig`. Exported model code passes its own ModelConfig class: under
        `trust_remote_code` transformers loads this file and the modeling file as separate
        copies of the core modules, whose classes must not mix."""
        return config_class(**self.model_config_kwargs())

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs) -> SubLLMConfig:
        values = {hf: getattr(config, ours) for hf, ours in HF_TO_OURS.items()}
        values.update({name: getattr(config, name) for name in SAME_NAME})
        values = {k: (list(v) if isinstance(v, (list, tuple)) else dict(v) if isinstance(v, dict)
                      else v) for k, v in values.items()}
        return cls(**values, **kwargs)


assert {f.name for f in dataclasses.fields(ModelConfig)} == set(HF_TO_OURS.values()) | set(
    SAME_NAME
), "SubLLMConfig must carry every ModelConfig field"
