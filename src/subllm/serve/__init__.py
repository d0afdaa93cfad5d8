"""`subllm serve`: an OpenAI-compatible server with continuous batching (docs/design.md §5)."""

from subllm.serve.engine import Engine, Sampling

__all__ = ["Engine", "Sampling"]
