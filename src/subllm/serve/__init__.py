"""`subllm serve`: an OpenAI-compatible server with continuous batching (docs/design.md §3.9)."""

from subllm.serve.engine import Engine, Sampling

__all__ = ["Engine", "Sampling"]
