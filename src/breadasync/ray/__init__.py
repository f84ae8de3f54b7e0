"""Rollout outputs as a Ray Data dataset (``pip install 'breadasync[ray]'``).

::

    import ray
    from breadasync.ray import read_rollouts

    ray.init()
    ds = read_rollouts(["t1", "t2"], repo_name="my_repo", max_concurrency=32)
    ds.write_parquet("s3://bucket/rollouts")

``import breadasync`` never imports Ray; this module does.
"""

from __future__ import annotations

try:
    import ray.data  # noqa: F401 (here, to fail with a hint rather than deep inside)
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("breadasync.ray needs Ray Data: pip install 'breadasync[ray]'") from exc

from ._datasource import (
    BLOCK_ROWS,
    SCHEMA,
    TRANSIENT_ERRORS,
    TYPED_SCHEMA,
    BreadDatasource,
    read_schema,
)
from ._planner import Segment, TargetRows, split
from ._read import read_rollouts

__all__ = [
    "BLOCK_ROWS",
    "SCHEMA",
    "TRANSIENT_ERRORS",
    "TYPED_SCHEMA",
    "BreadDatasource",
    "Segment",
    "TargetRows",
    "read_rollouts",
    "read_schema",
    "split",
]
