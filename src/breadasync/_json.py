"""JSON read exactly: orjson first (fast, strict), Python's ``json`` where orjson would turn
an integer beyond 64 bits into a float."""

from __future__ import annotations

import json
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


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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
    # orjson reads an integer beyond 64 bits as a float: Python's parser keeps it exact.
    return json.loads(text, parse_constant=_constant)
