"""JSON read exactly: orjson first (fast, strict), Python's ``json`` where orjson would turn
an integer beyond 64 bits into a float."""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

_DIGITS: Final = bytes(48 if 48 <= i <= 57 else 120 if i == 46 else 32 for i in range(256))
"""Digits to ``0``, the decimal point to ``x``, anything else to a space."""
_LONG_INT: Final = b" " + b"0" * 19
"""19 digits after neither a digit nor a point: an integer that orjson may read as a float
(beyond int64 or uint64); a fraction's digits do not count."""


def has_long_digits(data: bytes | str) -> bool:
    """Whether ``data`` has a run of 19 or more digits not after a decimal point (an
    integer orjson may read as a float; a string of digits counts too, which only costs a
    slower parse)."""
    raw = data if isinstance(data, bytes) else data.encode()
    digits = raw.translate(_DIGITS)
    return _LONG_INT in digits or digits.startswith(_LONG_INT[1:])


def refuse_constant(name: str) -> Any:
    """``parse_constant`` for Python's ``json``: ``NaN`` and ``Infinity`` are not JSON."""
    raise ValueError(f"{name} is not JSON")


_NON_FINITE: Final = re.compile(r"-?(?:NaN|Infinity)")
_BROKEN: Final = (
    "unexpected end of data",
    "Input is a zero-length",
    "unexpected content after document",
    "invalid literal",
)
_CUT_SHORT: Final = ("Unterminated string", "Extra data")
"""Python's parser's refusals of a text that ends too soon, or goes on after its end."""
_CUT_TAIL: Final = 8
"""Characters that may follow where Python's parser stopped in a text cut short: a token
cut in two (``0.``, ``1e-``, ``nul``, ``\\u12``) is refused where it begins."""


def is_broken_text(exc: ValueError, data: bytes | str) -> bool:
    """Whether a parser's refusal says the text is not JSON at all (cut short, even inside
    a character of several bytes; an error page in its place; garbage), which another try
    may mend, rather than JSON the client refuses whatever the try (NaN, a lone surrogate
    escape, a byte-order mark, a number beyond a double, bytes that are not UTF-8 within
    the text, a control character).

    ``exc`` is orjson's error, or Python's parser's for a text orjson stopped reading at a
    number beyond a double's range."""
    if isinstance(exc, UnicodeDecodeError):
        return _cut_in_a_character(data)
    if not isinstance(exc, orjson.JSONDecodeError):
        # Python's parser: only a text that ends too soon (or runs on) may be mended; NaN,
        # integers past its digit limit, control characters and bad escapes are not.
        if not isinstance(exc, json.JSONDecodeError):
            return False
        return exc.msg.startswith(_CUT_SHORT) or len(exc.doc.rstrip()) - exc.pos <= _CUT_TAIL
    if exc.msg.startswith("str is not valid UTF-8"):
        # orjson says so for a body cut inside a character of several bytes, and for one
        # with bytes that are not UTF-8 within it (a server's bug, the same on every try).
        return _cut_in_a_character(data)
    if exc.msg.startswith(_BROKEN):
        return True
    if exc.msg.startswith(("unexpected character", "no digit after sign")):
        # orjson's position counts characters, not bytes (an error path: decoding is fine).
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        # A NaN or Infinity token where a value belongs is JSON refused, not a broken text.
        start = exc.pos - 1 if exc.msg.startswith("no digit") else exc.pos
        return _NON_FINITE.match(text, max(0, start)) is None
    return False


def _cut_in_a_character(data: bytes | str) -> bool:
    """Whether ``data``'s only fault as UTF-8 is a character cut at its end."""
    if isinstance(data, str):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.reason == "unexpected end of data"
    return False


def loads_exact(text: str | bytes) -> Any:
    """``text`` decoded with integers of any size kept.

    Raises:
        orjson.JSONDecodeError: orjson refused it (not JSON, NaN, too deep...).
        ValueError, RecursionError: Python's parser refused a text orjson stopped reading at
            a number beyond a double's range.
    """
    if not has_long_digits(text):
        return orjson.loads(text)
    try:
        orjson.loads(text)  # its checks first: depth, NaN tokens, lone surrogates, UTF-8
    except orjson.JSONDecodeError as exc:
        if "infinity" not in str(exc):
            raise
        # orjson stopped at a number beyond a double: what follows was not checked by it.
        data = json.loads(text, parse_constant=refuse_constant)
        json.dumps(data, ensure_ascii=False).encode()  # a lone surrogate: ValueError
        return data
    # orjson reads an integer beyond 64 bits as a float: Python's parser keeps it exact.
    return json.loads(text)
