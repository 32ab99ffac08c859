"""Command output for people: bytes shown as text, safely.

Output chunks arrive as the API shows them (`backend._plain`): a string when the chunk is valid
UTF-8, else {"base64": ...}. A page shows the latter decoded with U+FFFD for each invalid byte
and marks it binary; it never interprets any of it (the browser inserts it as text, never as
HTML, see static/app.js and the templates' autoescaping).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

__all__ = ["as_text", "display_chunk"]


def as_text(data: Any) -> tuple[str, bool]:
    """(text, binary): the text to show for an API byte value, and whether it was not UTF-8."""
    if isinstance(data, str):
        return data, False
    if isinstance(data, dict) and isinstance(data.get("base64"), str):
        try:
            raw = base64.b64decode(data["base64"], validate=True)
        except (binascii.Error, ValueError):
            return "", True
        return raw.decode("utf-8", "replace"), True
    return "", False


def display_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """An output chunk as the page shows it: {"n", "stream", "text", "binary"}."""
    text, binary = as_text(chunk.get("data"))
    return {"n": chunk.get("n"), "stream": chunk.get("stream"), "text": text, "binary": binary}
