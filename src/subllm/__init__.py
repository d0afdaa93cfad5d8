"""subllm: SUBLLM and Mini-Sequence Transformer for efficient long-sequence language models.

The package imports nothing heavy on `import subllm`: the names below resolve on first
use (PEP 562), so the CLI starts without torch or transformers. transformers' Auto
classes learn `model_type="subllm"` as soon as transformers loads (`subllm.autoregister`).
"""

from __future__ import annotations

# first: in the `subllm` command, Ctrl-C is one line from here on (subllm.interrupt)
from subllm import interrupt  # isort: split

import importlib
from typing import TYPE_CHECKING, Any

from subllm import autoregister
from subllm.errors import ConfigError, SubLLMError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "PRESETS": "subllm.model.config",
    "ModelConfig": "subllm.model.config",
    "parse_structure": "subllm.model.config",
    "SubLLM": "subllm.model.subllm",
    "ModelOutput": "subllm.model.subllm",
    "document_ids": "subllm.model.subllm",
    "KVCache": "subllm.model.kv_cache",
    "apply_mst": "subllm.model.mst",
    "SubLLMConfig": "subllm.hf",
    "SubLLMForCausalLM": "subllm.hf",
    "from_hf_llama": "subllm.interop.llama",
    "to_hf_llama": "subllm.interop.llama",
    "from_hf": "subllm.interop.llama",
    "to_hf": "subllm.interop.llama",
}

__all__ = ["ConfigError", "SubLLMError", "__version__", *_LAZY]

autoregister.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'subllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from subllm.hf import SubLLMConfig, SubLLMForCausalLM
    from subllm.interop.llama import from_hf, from_hf_llama, to_hf, to_hf_llama
    from subllm.model.config import PRESETS, ModelConfig, parse_structure
    from subllm.model.kv_cache import KVCache
    from subllm.model.mst import apply_mst
    from subllm.model.subllm import ModelOutput, SubLLM, document_ids
