"""The model: everything a SUBLLM / LLaMA needs and nothing else.

    config.py     ModelConfig, presets, the structure-string parser
    llama.py      RMSNorm, RoPE, attention, SwiGLU MLP, Block (LLaMA's building blocks)
    subsample.py  Subsampler (the `(`), Selection, the score balancer
    bypass.py     Bypass (the `)`: upsampling + bypass), its limit and schedules
    kv_cache.py   the KV cache with per-level slot validity
    subllm.py     SubLLM, the model (a structure of only "T" is a LLaMA)
    mst.py        Mini-Sequence Transformer: chunked MLP and LM-head cross-entropy
    decode.py     sampling and autoregressive generation
    hf_config.py  SubLLMConfig (transformers PretrainedConfig)
    hf.py         SubLLMForCausalLM (transformers PreTrainedModel + GenerationMixin)

Every file imports only its siblings, with relative imports, so `subllm export` copies the
package verbatim into a Hugging Face model directory. torch-heavy names resolve on first
use (PEP 562), so reading a config here does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import PRESETS, ModelConfig, Segment, parse_structure
from .errors import ConfigError, SubLLMError

_LAZY = {
    "SubLLM": "subllm", "ModelOutput": "subllm", "document_ids": "subllm",
    "KVCache": "kv_cache", "LayerKV": "kv_cache", "LevelState": "kv_cache",
    "Bypass": "bypass",
    "Subsampler": "subsample", "ScoreBalancer": "subsample", "Selection": "subsample",
    "Block": "llama", "RMSNorm": "llama",
    "apply_mst": "mst", "chunked_cross_entropy": "mst", "enable_checkpointing": "mst",
    "generate": "decode",
}

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "Segment", "SubLLMError",
           "parse_structure", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .bypass import Bypass
    from .decode import generate
    from .kv_cache import KVCache, LayerKV, LevelState
    from .llama import Block, RMSNorm
    from .mst import apply_mst, chunked_cross_entropy, enable_checkpointing
    from .subllm import ModelOutput, SubLLM, document_ids
    from .subsample import ScoreBalancer, Selection, Subsampler
