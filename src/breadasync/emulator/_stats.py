"""Request counters, so tests can assert how a client behaved from the server's side."""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the emulator saw it."""

    method: str
    route: str
    repo: str | None
    target: str | None
    status: int
    fault: str | None
    """The fault injected into this request, if any (``"503"``, ``"drop"``, ``"429"``...)."""
    user_id: str | None
    idempotency_key: str | None
    offset: int | None
    limit: int | None
    rows: int | None
    """Rows an output page returned."""
    peer: str | None
    """The client's address and port: one per connection, so pooling shows."""
    started: float
    """Real monotonic time at which the request arrived."""
    elapsed: float


class Stats:
    """Counters per route, status, target and fault, the peak of requests in flight, jobs
    started, and a bounded log of recent requests. Safe to read from any thread."""

    def __init__(self, log_size: int = 200_000) -> None:
        self._lock = threading.Lock()
        self._log_size = log_size
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far (jobs already running keep running)."""
        with self._lock:
            self._by_route: Counter[tuple[str, int]] = Counter()
            self._by_target: Counter[tuple[str | None, str | None, str, int]] = Counter()
            self._faults: Counter[str] = Counter()
            self._jobs: Counter[tuple[str, str, str]] = Counter()
            self._log: deque[RequestRecord] = deque(maxlen=self._log_size)
            self._in_flight = 0
            self._max_in_flight = 0

    def enter(self) -> None:
        """A request arrived."""
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def leave(self, record: RequestRecord) -> None:
        """A request was answered (or its connection dropped)."""
        with self._lock:
            self._in_flight -= 1
            self._by_route[(record.route, record.status)] += 1
            self._by_target[(record.repo, record.target, record.route, record.status)] += 1
            if record.fault:
                self._faults[record.fault] += 1
            self._log.append(record)

    def job_started(self, repo: str, target: str, kind: str) -> None:
        """A POST started a new job (not a repeat that returned the current state)."""
        with self._lock:
            self._jobs[(repo, target, kind)] += 1

    def count(
        self,
        route: str | None = None,
        *,
        status: int | None = None,
        repo: str | None = None,
        target: str | None = None,
    ) -> int:
        """Requests answered, filtered by route name, status, repo and target."""
        with self._lock:
            if repo is None and target is None:
                return sum(
                    n
                    for (r, s), n in self._by_route.items()
                    if (route is None or r == route) and (status is None or s == status)
                )
            return sum(
                n
                for (rp, tg, r, s), n in self._by_target.items()
                if (route is None or r == route)
                and (status is None or s == status)
                and (repo is None or rp == repo)
                and (target is None or tg == target)
            )

    def faults(self, kind: str | None = None) -> int:
        """Faults injected, of one kind (``"503"``, ``"drop"``, ``"429"``...) or all."""
        with self._lock:
            if kind is None:
                return sum(self._faults.values())
            return self._faults[kind]

    def jobs_started(
        self, kind: str | None = None, *, repo: str | None = None, target: str | None = None
    ) -> int:
        """Jobs started by POSTs, filtered by kind (``stim``/``rollout``), repo and target."""
        with self._lock:
            return sum(
                n
                for (rp, tg, k), n in self._jobs.items()
                if (kind is None or k == kind)
                and (repo is None or rp == repo)
                and (target is None or tg == target)
            )

    @property
    def in_flight(self) -> int:
        """Requests being answered right now."""
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most requests ever in flight at once since the last reset."""
        return self._max_in_flight

    def records(self) -> list[RequestRecord]:
        """The most recent requests, oldest first (bounded by ``log_size``)."""
        with self._lock:
            return list(self._log)

    def snapshot(self) -> dict[str, Any]:
        """Everything counted, JSON-ready (what ``GET /_emulator/stats`` returns)."""
        with self._lock:
            by_route: dict[str, dict[str, int]] = {}
            for (route, status), n in sorted(self._by_route.items()):
                by_route.setdefault(route, {})[str(status)] = n
            return {
                "requests": sum(self._by_route.values()),
                "by_route": by_route,
                "faults": dict(self._faults),
                "jobs_started": sum(self._jobs.values()),
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
            }

    def dump_records(self) -> list[dict[str, Any]]:
        """The request log, JSON-ready."""
        return [asdict(r) for r in self.records()]
