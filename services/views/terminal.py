"""What a terminal may be shown of the fleet's state: text other processes wrote (an agent's host
name, its GPUs' names) goes to an operator's terminal only with its control characters escaped, so
an agent cannot retitle the window, recolour or rewrite the screen, or worse, through `corral
status`, `corral ps` or `corral top`."""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with each character that is not printable (ESC, BEL, newlines, C1 controls...)
    written as its Python escape (``\\x1b``); printable text is returned as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
