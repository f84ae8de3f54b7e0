"""Hiding a secret (the API key) in the texts the client shows: every copy of it, and every
run of its characters long enough to matter, so a copy that an excerpt cut short is hidden
too (but for at most ``FRAGMENT - 1`` characters at the run's end)."""

from __future__ import annotations

import re
from typing import Final

HIDDEN: Final = "***"
"""What a secret, or a fragment of one, is shown as."""

FRAGMENT: Final = 12
"""Characters of the secret, in a row, that are hidden wherever they appear: an excerpt cut
inside a copy of the key shows fewer than this many of its characters. Long enough that a
key's fixed prefix (``sk-live-``) alone is never hidden in other text."""


class Redactor:
    """Replaces ``secret``, and each run of :data:`FRAGMENT` or more of its characters, with
    :data:`HIDDEN` (one ``***`` per run; the run is matched in pieces of :data:`FRAGMENT`,
    so fewer than that many of its last characters may remain)."""

    __slots__ = ("_bytes", "_text")

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("nothing to redact")
        # The whole secret first, so a full copy is one match; then its fragments, chained.
        parts = [
            secret,
            *sorted({secret[i : i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)}),
        ]
        self._text = re.compile("(?:" + "|".join(map(re.escape, parts)) + ")+")
        self._bytes = re.compile(b"(?:" + b"|".join(re.escape(p.encode()) for p in parts) + b")+")

    def text(self, text: str) -> str:
        """``text`` without the secret."""
        return self._text.sub(HIDDEN, text)

    def bytes(self, data: bytes) -> bytes:
        """``data`` (UTF-8) without the secret."""
        return self._bytes.sub(HIDDEN.encode(), data)
