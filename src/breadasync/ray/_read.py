"""``read_rollouts``: the one call most users need."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ray
import ray.data

from breadasync._models import TargetLike

from ._datasource import TRANSIENT_ERRORS, BreadDatasource

__all__ = ["TRANSIENT_ERRORS", "read_rollouts"]


def read_rollouts(
    targets: Iterable[TargetLike],
    *,
    override_num_blocks: int | None = None,
    **options: Any,
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
        override_num_blocks: Read tasks wanted (default: Ray's choice from the size).
        options: The keyword arguments of :class:`BreadDatasource` (``repo_name``,
            ``api_key``, ``base_url``, ``max_concurrency``, ``max_requests_per_second``,
            ``max_tasks``, ``allow_partial``, ``page_size``, ``max_retries``,
            ``task_retries``, ``timeout``, ``user_id``, ``allow_insecure_http``,
            ``columns``), passed to it as they are: its signature is the one list of them,
            with their defaults and meanings.
    """
    datasource = BreadDatasource(targets, **options)
    # Ray warns when allowed more tasks at once than it gets
    at_once = min(datasource.max_tasks, datasource.most_tasks, override_num_blocks or 1 << 30)
    dataset: ray.data.Dataset = ray.data.read_datasource(
        datasource,
        concurrency=at_once,
        override_num_blocks=override_num_blocks,
    )
    return dataset
