"""Checks of call arguments (names, ints, seconds, user ids) and the paths built from them,
made before anything is sent."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ._errors import BreadError, InvalidArgumentError

MAX_PAGE_SIZE = 1000
"""The most rows the service returns per output page."""
MAX_OFFSET = 2**63 - 1
"""The largest offset a 64-bit service accepts."""


def check_name(value: Any, what: str) -> str:
    """``value`` if it can name a repo or target; else an :class:`InvalidArgumentError`.

    Any other character is fine: names travel percent-encoded as one path segment.
    """
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidArgumentError(f"{what} must not be empty")
    if value in (".", ".."):
        raise InvalidArgumentError(f"{what} must not be {value!r} (it would change the URL path)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate (e.g. from os.fsdecode of a bad file name) cannot travel in a URL.
        raise InvalidArgumentError(
            f"{what} {value!r} is not valid Unicode (a lone surrogate at index {exc.start})"
        ) from None
    bad = next((c for c in value if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)
    if bad is not None:
        raise InvalidArgumentError(
            f"{what} {value!r} contains the control character {bad!r}, which no name may hold"
        )
    return value


def check_int(
    value: Any,
    what: str,
    low: int,
    high: int | None = None,
    *,
    error: type[BreadError] = InvalidArgumentError,
) -> int:
    """``value`` if it is an int (not a bool) within ``low..high``; else ``error``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bounds = f">= {low}" if high is None else f"within {low}..{high}"
        raise error(f"{what} must be an int {bounds}, got {value!r}")
    return value


def check_seconds(
    value: Any,
    what: str,
    *,
    allow_none: bool = True,
    error: type[BreadError] = InvalidArgumentError,
) -> float | None:
    """``value`` if it is a number of seconds > 0 (or ``None``, "no bound", when allowed);
    else ``error``. The one seconds check of every option, call arguments and settings."""
    if value is None:
        if not allow_none:
            raise error(f"{what} must be a positive number of seconds, not None")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        # ``not value > 0`` also refuses NaN.
        raise error(f"{what} must be a positive number of seconds, got {value!r}")
    return value


def check_limit(value: Any) -> int:
    """A page size within 1..1000."""
    return check_int(value, "limit", 1, MAX_PAGE_SIZE)


def check_offset(value: Any) -> int:
    """An offset >= 0."""
    return check_int(value, "offset", 0, MAX_OFFSET)


def check_user_id(value: Any) -> str | None:
    """A user override: ``None`` or a non-empty string without control characters."""
    if value is None:
        return None
    user_id = check_name(value, "user_id")
    if not user_id.isascii():
        raise InvalidArgumentError(f"user_id {user_id!r} must be ASCII (it travels in a header)")
    return user_id


def encode_segment(value: str) -> str:
    """Percent-encode one path segment: ``/``, ``?``, ``#``, ``%`` and the rest included."""
    return quote(value, safe="")


def repo_path(repo_name: Any) -> str:
    """``/v1/repo/{repo}/targets`` for a checked, encoded repo name."""
    return f"/v1/repo/{encode_segment(check_name(repo_name, 'repo_name'))}/targets"


def target_path(repo_name: Any, target_name: Any, *rest: str) -> str:
    """The path of a target (and of ``rest`` below it), its names checked and encoded."""
    target = encode_segment(check_name(target_name, "target_name"))
    return "/".join((repo_path(repo_name), target, *rest))
