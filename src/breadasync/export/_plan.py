"""The export plan: which rows go to which part file, and which pages fetch them.

Pure values, so a worker elsewhere (a distributed reader) can be handed a range and fetch
exactly what a local export would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from breadasync._models import TargetRef

FINGERPRINT_ROWS = 8
"""Rows of page 0 hashed into a job's identity when the service gives no ``job_id``."""


def _digest(value: Any) -> str:
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        # An integer beyond 64 bits (orjson writes none): Python's encoder, as stable.
        data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """Which job an export reads: its ``job_id`` when the service sends one, else its
    config and a fingerprint of its first rows (a re-run with the same config produces
    other rows).

    Attributes:
        job_id: The service's job id, or ``None``.
        config: A digest of the job's config.
        first_rows: A digest of the first :data:`FINGERPRINT_ROWS` rows (without a
            ``job_id``, or for a job not complete; ``None`` for a job without rows).
        model: The config's ``model_name``, to name the job in messages.
    """

    job_id: int | str | None
    config: str
    first_rows: str | None = None
    model: str | None = None

    @classmethod
    def of(
        cls,
        job_id: int | str | None,
        config: Mapping[str, Any],
        first_rows: Sequence[Mapping[str, Any]] | None = None,
    ) -> JobIdentity:
        """The identity of a job from its status (and its first rows, without a job id)."""
        model = config.get("model_name")
        return cls(
            job_id,
            _digest(dict(config)),
            None if first_rows is None else _digest(list(first_rows)),
            model if isinstance(model, str) else None,
        )

    def same_status(self, job_id: int | str | None, config: Mapping[str, Any]) -> bool:
        """Whether a status read still shows this job: its id when both reads give one,
        else its config (a service may name a job only while it runs; the exporter then
        compares the first rows too)."""
        if self.job_id is not None and job_id is not None:
            return job_id == self.job_id
        return _digest(dict(config)) == self.config

    def to_dict(self) -> dict[str, Any]:
        """What a resumed export must find again (part of the export's identity)."""
        if self.job_id is not None:
            return {"job_id": self.job_id}
        return {"config": self.config, "first_rows": self.first_rows}

    def describe(self) -> str:
        """The job in a few words, for messages."""
        return describe_job(self.to_dict(), self.model)


def describe_job(found: Mapping[str, Any] | None, model: str | None = None) -> str:
    """A job identity (as :meth:`JobIdentity.to_dict` wrote it) in a few words."""
    if not isinstance(found, Mapping):
        return "a job of unknown identity"
    if found.get("job_id") is not None:
        return f"job {found['job_id']}"
    config = str(found.get("config", "?"))[:8]
    rows = str(found.get("first_rows") or "none")[:8]
    named = f" (model {model})" if model else ""
    return f"the job with config {config} and first rows {rows}{named}"


@dataclass(frozen=True, slots=True)
class Part:
    """Rows ``start..stop-1`` of a job, written to one Parquet file."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """The part's file name."""
        return f"part-{self.index:05d}.parquet"

    @property
    def rows(self) -> int:
        """How many rows it holds."""
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """What an export of one target will write.

    Attributes:
        target: The target.
        lines: Rows the export holds (the job's ``lines`` when the export began).
        status: The job's status then (``complete``, or what a partial export saw).
        rows_per_part: Rows per part file (the last may hold fewer).
        page_size: Rows asked per page.
        job: The job's identity, read when the export was planned.
    """

    target: TargetRef
    lines: int
    status: str
    rows_per_part: int
    page_size: int
    job: JobIdentity | None = None

    @property
    def parts(self) -> list[Part]:
        """The part files, in offset order."""
        return [
            Part(i, start, min(start + self.rows_per_part, self.lines))
            for i, start in enumerate(range(0, self.lines, self.rows_per_part))
        ]

    def pages(self, part: Part) -> Iterator[tuple[int, int]]:
        """``(offset, limit)`` of the pages that fetch a part (pages never cross parts)."""
        for offset in range(part.start, part.stop, self.page_size):
            yield offset, min(self.page_size, part.stop - offset)
