"""The SUBLLM authors' release (`from_official`): their `SubllmModel` state_dict and
config JSON, mapped key by key (`w12` = [gate; up], bypasses numbered in the order of the
`)`)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

from subllm.errors import ConfigError, SubLLMError
from subllm.interop.llama import assign_weights
from subllm.interop.weights import check_keys, check_shape
from subllm.model.config import ModelConfig, parse_structure
from subllm.model.subllm import SubLLM

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
# Their model's constants (design.md §2): RMSNorm eps 1e-5, rotary base 10000, no grouped KV.
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
    return set(PretrainedConfig().to_dict()) | set(_HF4_CONFIG_KEYS)


def official_model_config(cfg: Mapping[str, Any], source: str = "the config",
                          rope_positions: str = "parent") -> ModelConfig:
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
            threshold="zero",  # the authors' inference rule: their model was trained for it
            # their full pass numbers nested tokens by the enclosing segment (they trained
            # with full passes); their cached decoding by original position (design.md §3.3)
            rope_positions=rope_positions,
        )
    except ConfigError as e:
        raise SubLLMError(f"{source}: {e}") from None


def _check_inv_freq(state: Mapping[str, Tensor], config: ModelConfig, source: str) -> None:
    """The release stores its rotary `inv_freq` buffers; we compute base-10000 ones. Refuse
    a checkpoint whose buffers say otherwise (its logits would silently differ). Compared
    in the dtype stored (the release's `--bf16` saves bf16 buffers), within one unit of it
    or 1e-3, whichever is larger."""
    hd = config.resolved_head_dim
    expected = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    for key, t in state.items():
        if not key.endswith(".inv_freq"):
            continue
        got = t.detach().reshape(-1)
        close = got.is_floating_point() and got.shape == expected.shape
        if close:
            rtol = max(1e-3, torch.finfo(got.dtype).eps)
            close = torch.allclose(got.double(), expected.to(got.dtype).double(), rtol=rtol,
                                   atol=0.0)
        got = got.double()
        if not close:
            first = ", ".join(f"{v:.4g}" for v in got[:3].tolist())
            raise SubLLMError(f"{source}: {key!r} ({first}, ...) is not the base-"
                              f"{config.rope_theta:g} rotary frequencies this converter "
                              "reproduces; the checkpoint uses another RoPE base or scaling")


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
                  config_source: str = "the config", rope_positions: str = "parent"
                  ) -> SubLLM:
    """A SubLLM holding a checkpoint of the authors' release (`SubllmModel.state_dict()`).

    Eval-mode logits equal those of the authors' model on the same weights (design.md §3).
    dtype: of the result (default: that of the embedding).
    """
    config = official_model_config(official_config, config_source, rope_positions)
    _check_inv_freq(state, config, source)
    with torch.device("meta"):
        model = SubLLM(config)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    names = _official_names(config)
    theirs_shape = {}
    for k, (theirs, rows) in names.items():
        s = shapes[k]
        theirs_shape[theirs] = (2 * s[0], *s[1:]) if rows is not None else s
    tied_out = "decoder.output_projection.weight"
    check_keys(state.keys(), theirs_shape, source,
                optional=(tied_out,) if config.tie_embeddings else (),
                ignored=lambda key: key.endswith(".inv_freq"))
    for key, shape in theirs_shape.items():
        check_shape(key, state[key], shape, source)
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
    return assign_weights(model, ours, dtype)
