"""The user-facing exception types; they live with the model (`subllm.model.errors`), which
must import nothing from outside its own package."""

from subllm.model.errors import ConfigError, SubLLMError

__all__ = ["ConfigError", "SubLLMError"]
