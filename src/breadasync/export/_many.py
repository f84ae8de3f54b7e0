"""``export_many``: many targets into one Hive-style dataset folder or prefix
(``repo=R/target=T/``), each exported by the shared :class:`~._exporter.Exporter`, one
target's failure recorded in its result without stopping the others."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import quote

import anyio

from breadasync._errors import BreadError, cancel_requests, reraise
from breadasync._models import TargetLike, TargetRef, normalise_targets
from breadasync._validation import check_int

from ._commit import refuse_single_export
from ._dest import DestinationLike, resolve_destination
from ._exporter import Exporter, in_thread
from ._options import ExportResult, ExportResults


def hive_segment(key: str, value: str) -> str:
    """``key=value`` with ``value`` percent-encoded, so no name can leave its folder or
    collide with another; names too long for a file name keep a prefix and a hash."""
    encoded = quote(value, safe="")
    if len(encoded) > 180:
        prefix = encoded[:120]
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut != -1:
            prefix = prefix[:cut]
        encoded = f"{prefix}~{hashlib.sha256(value.encode()).hexdigest()[:16]}"
    return f"{key}={encoded}"


async def export_many(
    exporter: Exporter,
    targets: Iterable[TargetLike],
    repo_name: str | None,
    dest: DestinationLike,
    target_concurrency: int,
) -> ExportResults:
    """Export many targets into one Hive-style dataset folder or prefix."""
    cancels = cancel_requests()
    refs = normalise_targets(targets, repo_name)
    check_int(target_concurrency, "target_concurrency", 1)
    root = await in_thread(resolve_destination, dest)
    await in_thread(root.prepare)
    await in_thread(refuse_single_export, root)
    unique = list(dict.fromkeys(refs))
    results: dict[TargetRef, ExportResult] = {}
    slots = anyio.CapacityLimiter(target_concurrency)

    async def one(ref: TargetRef) -> None:
        folder = root.child(
            hive_segment("repo", ref.repo_name), hive_segment("target", ref.target_name)
        )
        async with slots:
            try:
                results[ref] = await exporter.export(ref, folder)
            except BreadError as exc:
                results[ref] = ExportResult(target=ref, dest=folder.display, error=exc)

    try:
        async with anyio.create_task_group() as tg:
            for ref in unique:
                tg.start_soon(one, ref)
    except BaseExceptionGroup as group:
        reraise(group, cancels)  # a cancellation stays exactly that
    return ExportResults([results[ref] for ref in refs])
