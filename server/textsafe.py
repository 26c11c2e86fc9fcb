"""Text that agents supplied, made safe for an operator's terminal."""

from __future__ import annotations

import unicodedata


def escape_controls(text: str) -> str:
    """Escape control and format characters (ANSI escapes, bidi overrides) as visible `\\x..` codes."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
