"""``read_rollouts``: the one call most users need."""

from __future__ import annotations

from collections.abc import Iterable

import ray
import ray.data

from breadasync._config import Timeouts
from breadasync._models import TargetLike
from breadasync._validation import MAX_PAGE_SIZE

from ._bridge import ColumnMode
from ._datasource import TRANSIENT_ERRORS, BreadDatasource

__all__ = ["TRANSIENT_ERRORS", "read_rollouts"]


def read_rollouts(
    targets: Iterable[TargetLike],
    *,
    repo_name: str | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    max_concurrency: int = 64,
    max_requests_per_second: float | None = None,
    max_tasks: int | None = None,
    allow_partial: bool = False,
    page_size: int = MAX_PAGE_SIZE,
    max_retries: int = 5,
    task_retries: int = 3,
    timeout: float | Timeouts = Timeouts(),  # noqa: B008 (frozen)
    user_id: str | None = None,
    allow_insecure_http: bool = False,
    override_num_blocks: int | None = None,
    columns: ColumnMode = "json",
) -> ray.data.Dataset:
    """The rollout outputs of ``targets`` as a Ray dataset.

    Targets take the same forms as in :meth:`~breadasync.BreadClient.rollout_many` (names
    with ``repo_name=``, ``(repo, target)`` pairs, :class:`~breadasync.TargetRef`); each is
    read once. The columns and types are those of the Parquet export, then ``repo`` and
    ``target``; each target's rows are exactly its ``lines`` at planning time.

    Planning runs now, on the driver (see :class:`BreadDatasource`): an unfinished job
    raises :class:`~breadasync.UnfinishedJobError` (unless ``allow_partial``), a missing
    target :class:`~breadasync.NotFoundError`, a bad key
    :class:`~breadasync.AuthenticationError`, each with the service's message.

    Args:
        max_concurrency: Requests in flight across the whole cluster (default 64).
        max_requests_per_second: Requests per second across the whole cluster.
        max_tasks: Read tasks running at once (default: the cluster's CPUs, at most
            ``max_concurrency``); the budget is split evenly between them.
        max_retries: Retries of one request by a task's client (default 5).
        task_retries: Times a read task reads again, after a transient error (one of
            :data:`TRANSIENT_ERRORS`) outlasts its client's retries, the rows it has not
            yielded yet (default 3); rows already yielded are skipped, so none is
            duplicated. A worker that dies is rerun by Ray, which replaces the blocks of
            the lost run with the same blocks.
        override_num_blocks: Read tasks wanted (default: Ray's choice from the size).
        columns: ``"json"`` (default) or ``"typed"``: the exporter's column modes, with
            the same columns and types (docs/SCHEMA.md).
        api_key, base_url, timeout, user_id, allow_insecure_http, page_size, allow_partial:
            As for :class:`~breadasync.BreadClient` and the exporter. The key travels to the
            workers inside the serialized read tasks; it is in no task name, repr or
            metadata.
    """
    datasource = BreadDatasource(
        targets,
        repo_name=repo_name,
        api_key=api_key,
        base_url=base_url,
        max_concurrency=max_concurrency,
        max_requests_per_second=max_requests_per_second,
        max_tasks=max_tasks,
        allow_partial=allow_partial,
        page_size=page_size,
        max_retries=max_retries,
        task_retries=task_retries,
        timeout=timeout,
        user_id=user_id,
        allow_insecure_http=allow_insecure_http,
        columns=columns,
    )
    # Ray warns when allowed more tasks at once than it gets
    at_once = min(datasource.max_tasks, datasource.most_tasks, override_num_blocks or 1 << 30)
    dataset: ray.data.Dataset = ray.data.read_datasource(
        datasource,
        concurrency=at_once,
        override_num_blocks=override_num_blocks,
    )
    return dataset
