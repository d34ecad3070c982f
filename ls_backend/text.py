"""Text as the tools downstream take it."""

from __future__ import annotations


def utf8_safe(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate ("\\ud800": valid JSON, yet no UTF-8 can hold it,
    and a fast tokenizer fails the whole batch on it) read as "?": one character for one, so
    character offsets stay."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
