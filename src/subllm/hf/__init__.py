"""Hugging Face integration: `SubLLMConfig` and `SubLLMForCausalLM`.

Importing this package (which `import subllm` does) registers them with `AutoConfig` and
`AutoModelForCausalLM` under `model_type="subllm"`, so `AutoModelForCausalLM.
from_pretrained(dir)` loads an exported SUBLLM without `trust_remote_code`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from subllm.hf.configuration_subllm import SubLLMConfig
from subllm.hf.modeling_subllm import SubLLMCausalLMOutput, SubLLMForCausalLM
from subllm.hf.trainer import SubLLMScheduleCallback

AutoConfig.register(SubLLMConfig.model_type, SubLLMConfig, exist_ok=True)
AutoModelForCausalLM.register(SubLLMConfig, SubLLMForCausalLM, exist_ok=True)

__all__ = ["SubLLMCausalLMOutput", "SubLLMConfig", "SubLLMForCausalLM",
           "SubLLMScheduleCallback"]
