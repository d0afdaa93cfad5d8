"""subllm: SUBLLM and Mini-Sequence Transformer for efficient long-sequence language models."""

from subllm.config import PRESETS, ModelConfig, parse_structure
from subllm.convert import from_hf_llama, to_hf_llama
from subllm.errors import ConfigError, SubLLMError
from subllm.hf import SubLLMConfig, SubLLMForCausalLM  # registers the Auto classes
from subllm.model import KVCache, ModelOutput, SubLLM

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "ConfigError", "KVCache", "ModelConfig", "ModelOutput", "SubLLM", "SubLLMConfig",
    "SubLLMError", "SubLLMForCausalLM",
    "from_hf_llama", "parse_structure", "to_hf_llama", "__version__",
]
