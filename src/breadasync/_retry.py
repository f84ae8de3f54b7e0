"""The retry rules: which answers are worth another try, and how long to wait first."""

from __future__ import annotations

import datetime
import email.utils
import math
import random
import re
import time
from collections.abc import Mapping
from typing import Final

from ._config import RetryPolicy

NEVER_RETRIED = frozenset({400, 401, 402, 403, 404, 409, 422})
"""Permanent answers: retrying cannot change them (409 too: the service uses it for an
immutable target changed, not for a lock timeout)."""

BACKPRESSURE = frozenset({429, 503})
"""Answers that mean "slow down"; counted as ``throttled`` in the client's stats. Only the
request that got one waits its ``Retry-After``; the client as a whole slows on evidence
(:mod:`breadasync._limits`)."""


def is_retryable_status(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an error status is worth another try.

    408, 429 and 5xx are; the permanent statuses in :data:`NEVER_RETRIED` never are. An
    ``x-should-retry: true|false`` header from the service decides the rest, and may veto a
    retry of a retryable status.
    """
    if status in NEVER_RETRIED:
        return False
    hint = headers.get("x-should-retry")
    if hint == "false":
        return False
    if hint == "true":
        return True
    return status in (408, 429) or status >= 500


_SECONDS: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
"""RFC 9110's delay-seconds (digits), with a decimal fraction accepted; nothing else that
``float`` would read (``1_0``, ``+5``, ``1e1``, other scripts' digits)."""


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the service asks to wait: ``retry-after-ms``, else ``Retry-After`` as seconds
    (a decimal fraction is accepted) or as an HTTP date in any of RFC 9110's three forms
    (against ``now``, seconds since the epoch, default the system clock); ``None`` if absent
    or unreadable."""
    ms = (headers.get("retry-after-ms") or "").strip()
    if _SECONDS.fullmatch(ms) and math.isfinite(float(ms)):
        return float(ms) / 1000
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if _SECONDS.fullmatch(raw):
        seconds = float(raw)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # The asctime form carries no zone; HTTP dates are always GMT.
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff(
    policy: RetryPolicy,
    retry: int,
    retry_after: float | None,
    rng: random.Random | None = None,
    *,
    read: bool = False,
    escalate: bool = True,
) -> float:
    """Seconds to wait before retry number ``retry`` (0 for the first retry).

    Exponential with jitter, capped at ``max_backoff``; ``retry_after`` is a floor. A
    ``read`` (a GET) whose failure came without a ``Retry-After`` (a 500, a dropped
    connection) waits ``first_read_backoff`` before its first retry if that is shorter, and
    then follows the schedule one step later (``initial_backoff``, twice that...); with a
    ``Retry-After`` (the service's own signal, and overload's) the schedule is unchanged.

    ``escalate=False`` (the client as a whole says this request's failures are bad luck, see
    :meth:`breadasync._limits.Governor.bad_luck`) keeps the schedule at its first step:
    doubling the wait of one request among many that succeed protects no one (the retry
    budget bounds what retries add) and holds back whatever waits for that request.
    """
    if not escalate:
        retry = 0
    step = retry
    if read and retry_after is None and policy.first_read_backoff < policy.initial_backoff:
        if retry == 0:
            return _jittered(policy, policy.first_read_backoff, None, rng)
        step = retry - 1
    base = min(policy.max_backoff, policy.initial_backoff * (2.0 ** min(step, 60)))
    return _jittered(policy, base, retry_after, rng)


def _jittered(
    policy: RetryPolicy, base: float, retry_after: float | None, rng: random.Random | None
) -> float:
    draw = (rng or random).random()
    wait = base * (1.0 - policy.jitter * draw)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return wait
