"""Reading an output page's JSON exactly, and refusing a hostile one before it costs much.

The order is the defence. The body's size is checked first; then orjson, the only parser
that ever sees an unchecked body, reads it: it never recurses past 1024 levels, and it
refuses ``NaN``/``Infinity`` tokens, lone surrogates, invalid UTF-8, a byte-order mark and
numbers beyond a double's range, each with an error (not a crash). The decoded value is
then walked, bounded by :class:`DecodeLimits` (depth, values), and its keys are counted
against the key separators in the text, which finds duplicate keys (orjson keeps the last
one silently); a text with whitespace before a colon, which the count cannot see, is
reread by Python's parser instead. orjson reads an integer beyond the 64-bit range as a
float, so the walk also looks at every float: one of 2**63 or more in magnitude (such an
integer, or a float that large, rare either way) sends the body to Python's own ``json``
module, which keeps integers of any size exact. Every refusal is a
:class:`~breadasync.ProtocolError` naming the request (its path carries the page's offset)
and, where it is one row's fault, that row's offset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import orjson

from breadasync._errors import AnswerTooLargeError, ProtocolError
from breadasync._json import has_long_digits, is_broken_text, loads_exact, refuse_constant

__all__ = ["DEFAULT_LIMITS", "DecodeLimits", "dumps_exact", "loads_exact", "read_page_json"]

_MAX_DEPTH_ALLOWED: Final = 512
"""Above this the checking walk itself would come near Python's recursion limit."""


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one output page may hold before it is refused as hostile.

    Args:
        max_body_bytes: The largest body decoded (the client's ``max_body_bytes`` already
            bounds what it reads; this bounds what the decoder accepts from anywhere).
        max_depth: Nesting levels, the page's own object and its ``output`` list included
            (a realistic row's ``tool_calls`` reach 6).
        max_values: Keys plus list items in the whole page (a realistic 1000-row page has
            about 30,000).
    """

    max_body_bytes: int = 64 * 1024 * 1024
    max_depth: int = 64
    max_values: int = 500_000

    def __post_init__(self) -> None:
        if not 3 <= self.max_depth <= _MAX_DEPTH_ALLOWED:
            raise ValueError(f"max_depth must be 3..{_MAX_DEPTH_ALLOWED}, not {self.max_depth}")
        if self.max_body_bytes < 1 or self.max_values < 1:
            raise ValueError("max_body_bytes and max_values must be positive")


DEFAULT_LIMITS: Final = DecodeLimits()


@dataclass(frozen=True, slots=True)
class _Where:
    method: str
    path: str
    status: int

    def too_many(self, limits: DecodeLimits) -> NoReturn:
        self.fail(f"larger than {limits.max_values:,} keys and list items", too_large=True)

    def fail(
        self, problem: str, body: bytes = b"", *, retryable: bool = False, too_large: bool = False
    ) -> NoReturn:
        excerpt = body[:40].decode("utf-8", "replace")
        # Too large: a page of fewer rows may pass, and the reader asks for one.
        raise (AnswerTooLargeError if too_large else ProtocolError)(
            f"{self.method} {self.path} -> {self.status}: the answer is {problem}",
            method=self.method,
            path=self.path,
            status=self.status,
            excerpt=excerpt,
            retryable=retryable,
        )


_BIG: Final = float(2**63)
"""orjson reads integers in [-2**63, 2**64) as ints, anything beyond as a float of at least
this magnitude."""
_NAN: Final = re.compile(rb"(?<![\w\"])-?(?:NaN|Infinity)(?![\w\"])")
_SPACED_COLON: Final = re.compile(rb'"[ \t\r\n]+:')
"""Whitespace between a quote and a colon: between a key and its colon it hides the key
from the separator count (JSON allows it; compact and pretty-printed JSON never do it).
Inside a string it takes an escaped quote before the spaces, which is rare (" :" alone in
text does not match)."""


def _key_separators(body: bytes, parsed: int) -> int:
    """How many ``"key":`` separators the text has outside strings (``parsed`` when a
    single count can tell), for a text with no whitespace before a colon.

    A quote inside a string is escaped (an odd run of backslashes before it); one that ends
    a key is not. Counting ``":`` after at least k backslashes for k = 0, 1, 2... and adding
    them with alternating signs leaves those after an even run. The first count alone is
    an upper bound, so when it equals the keys ``parsed`` there is nothing more to count.
    """
    total, sign, pattern = 0, 1, b'":'
    while True:
        found = body.count(pattern)
        if not found or (pattern == b'":' and found == parsed):
            return total + sign * found
        total += sign * found
        sign, pattern = -sign, b"\\" + pattern


class _Budget:
    __slots__ = ("big", "keys", "left", "limits", "where")

    def __init__(self, limits: DecodeLimits, where: _Where) -> None:
        self.limits = limits
        self.left = limits.max_values
        self.keys = 0
        self.big = False
        self.where = where


def _walk(value: list[Any] | dict[str, Any], depth: int, budget: _Budget, row: int) -> None:
    """Checks depth and size below ``value``, counting keys and noting floats of
    :data:`_BIG` magnitude (recursion is bounded by ``max_depth``, at most 512)."""
    if depth > budget.limits.max_depth:
        _refuse_row(budget, row, f"nested too deeply (over {budget.limits.max_depth} levels)")
    budget.left -= len(value)
    if budget.left < 0:
        budget.where.too_many(budget.limits)
    children: Any = value
    if type(value) is dict:
        budget.keys += len(value)
        children = value.values()
    for child in children:
        kind = type(child)
        if kind is dict or kind is list:
            _walk(child, depth + 1, budget, row)
        elif kind is float and not -_BIG < child < _BIG:
            budget.big = True


def _is_big(value: Any) -> bool:
    """Whether ``value`` is a float of :data:`_BIG` magnitude (the walk's hot loops test
    the same inline)."""
    return type(value) is float and not -_BIG < value < _BIG


def _refuse_row(budget: _Budget, row: int, problem: str) -> NoReturn:
    where = f"the row at offset {row:,} is " if row >= 0 else ""
    budget.where.fail(f"refused: {where}{problem}")


class _Duplicate(Exception):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Duplicate(next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])))
    return result


def _stdlib(body: bytes, where: _Where, *, vet: bool = False) -> Any:
    """The body read by Python's ``json``: exact integers, duplicate keys found. With
    ``vet``, for a body orjson did not read, also what orjson would have refused: lone
    surrogates and numbers beyond a double's range."""
    try:
        data = json.loads(body, parse_constant=refuse_constant, object_pairs_hook=_pairs)
        if vet:
            json.dumps(data, ensure_ascii=False, allow_nan=False).encode()
        return data
    except _Duplicate as exc:
        where.fail(f"refused: a key appears twice in one object ({str(exc)[:60]!r})", body)
    except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        if isinstance(exc, ValueError) and is_broken_text(exc, body):
            # Cut short after a number beyond a double: another try may bring the page.
            where.fail(f"not JSON ({exc})", body, retryable=where.method == "GET")
        # Integers of more than 4300 digits (Python's limit), and the like.
        where.fail(f"refused: {str(exc).splitlines()[0][:120]}", body)


def read_page_json(
    body: bytes,
    *,
    method: str,
    path: str,
    status: int,
    offset: int,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Any:
    """The body of an output page at ``offset``, decoded exactly and checked against
    ``limits``.

    Raises:
        ProtocolError: the body is not JSON, has ``NaN``/``Infinity`` tokens, a lone
            surrogate, a duplicate key, or goes past a limit; the message names the
            request and, for one row's fault, the row's offset.
    """
    where = _Where(method, path, status)
    if len(body) > limits.max_body_bytes:
        where.fail(
            f"refused: {len(body):,} bytes, over the limit of {limits.max_body_bytes:,}",
            too_large=True,
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "recursion" in text or "depth" in text:
            where.fail("JSON nested too deeply (over 1024 levels)", body)
        if "infinity" in text and has_long_digits(body):
            # An integer beyond a double's range is still JSON, and kept exactly.
            data = _stdlib(body, where, vet=True)
        elif is_broken_text(exc, body):
            # Cut short, or a proxy's page in its place: another try may bring the page.
            where.fail(f"not JSON ({text})", body, retryable=method == "GET")
        elif _NAN.search(body):
            where.fail("not JSON: it has a NaN or Infinity token, which JSON does not allow")
        else:
            where.fail(f"not JSON ({text})", body)
    budget = _Budget(limits, where)
    if type(data) is dict:
        budget.keys += len(data)
        budget.left -= len(data)
        rows = data.get("output")
        for value in data.values():
            kind = type(value)
            if value is rows and kind is list:
                budget.left -= len(rows)
                if budget.left < 0:
                    where.too_many(limits)
                for i, row in enumerate(rows):
                    if type(row) is dict:
                        # A row's own level inline: most rows hold no containers at all.
                        budget.keys += len(row)
                        budget.left -= len(row)
                        if budget.left < 0:
                            where.too_many(limits)
                        for child in row.values():
                            kind = type(child)
                            if kind is dict or kind is list:
                                _walk(child, 4, budget, offset + i)
                            elif kind is float and not -_BIG < child < _BIG:
                                budget.big = True
                    elif type(row) is list:
                        _walk(row, 3, budget, offset + i)
                    else:
                        budget.big |= _is_big(row)
            elif kind is dict or kind is list:
                _walk(value, 2, budget, -1)
            else:
                budget.big |= _is_big(value)
    elif type(data) is list:
        _walk(data, 1, budget, -1)
    else:
        budget.big |= _is_big(data)
    if budget.big:
        # Possibly an integer orjson could only read as a float: reread it exactly (the
        # limits were checked on the same structure).
        data = _stdlib(body, where)
    elif budget.keys != _key_separators(body, budget.keys) or _SPACED_COLON.search(body):
        # A duplicate key (orjson kept its last value), or only spacing before a colon
        # (which can also hide a duplicate from the count): Python's parser tells which.
        data = _stdlib(body, where)
    return data


def dumps_exact(value: Any) -> bytes:
    """``value`` as compact JSON text, integers of any size kept."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
