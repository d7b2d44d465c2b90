"""Request data made safe for a log line or an audit event field.

A path, a header value or a claim can carry line breaks and terminal escapes (``/x%0d%0a``
arrives percent-decoded): written raw, it forges log lines. Characters that are not printable
are written as Python escapes, and the text is bounded, since queued audit events must not let
a caller buy memory with long URLs.
"""

from __future__ import annotations

MAX_CHARS = 1024


def printable(text: str, limit: int = MAX_CHARS) -> str:
    """``text`` with every non-printable character escaped (``\\r``, ``\\x1b``, ``\\u2028``)
    and cut to ``limit`` characters, marked with ``...``."""
    if not text.isprintable():
        # repr() of one character that is not printable is its escape, quoted.
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return text if len(text) <= limit else text[: limit - 3] + "..."
