"""Hugging Face integration: `SubLLMConfig`, `SubLLMForCausalLM` and the Trainer callback.

The classes live in `subllm.model.hf` (the model package, exported verbatim); this module
is their public home and registers them with `AutoConfig` / `AutoModelForCausalLM` under
`model_type="subllm"`, so `AutoModelForCausalLM.from_pretrained(dir)` loads an exported
SUBLLM without `trust_remote_code`. (`import subllm` alone registers them too, lazily: see
`subllm.autoregister`.)
"""

from __future__ import annotations

from subllm.autoregister import register
from subllm.interop.trainer import SubLLMScheduleCallback
from subllm.model.hf import SubLLMCausalLMOutput, SubLLMConfig, SubLLMForCausalLM

register()

__all__ = ["SubLLMCausalLMOutput", "SubLLMConfig", "SubLLMForCausalLM",
           "SubLLMScheduleCallback"]
