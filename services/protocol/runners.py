"""What Ollama does with a runner's context length, as a pure rule shared by routers and agents."""

from __future__ import annotations


def effective_ctx(asked: int, trained: int) -> int:
    """The num_ctx Ollama gives a runner asked for ``asked``: capped at the model's trained context
    (0 = unknown: no cap)."""
    return min(asked, trained) if asked and trained else asked
