"""breadasync: drive the Bread rollout API at scale from asyncio.

async with BreadClient() as client:
    status = await client.targets.rollout.run("coding_target", repo_name="my_repo")

Everything public is importable from here; each part loads on first use.
"""

import importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BreadError,
    CertificateError,
    ClientClosedError,
    ConfigError,
    ConflictError,
    DataIntegrityError,
    DestinationError,
    ExportError,
    ExportLockedError,
    ExportMismatchError,
    InternalServerError,
    InvalidArgumentError,
    JobError,
    JobFailedError,
    NotFoundError,
    PaymentRequiredError,
    PermissionDeniedError,
    PollTimeoutError,
    ProtocolError,
    RateLimitError,
    RedirectError,
    UnfinishedJobError,
    UnprocessableEntityError,
)
from ._version import __version__

if _TYPE_CHECKING:
    from ._aiohttp_transport import AiohttpTransport
    from ._client import BreadClient, Rollout, Stim, Targets
    from ._config import NOT_GIVEN, Limits, PollPolicy, RetryPolicy, Timeouts
    from ._fanout import AsCompleted
    from ._models import (
        JobState,
        JobStatus,
        OutputPage,
        Target,
        TargetLike,
        TargetList,
        TargetRef,
    )
    from ._results import FanoutSummary, Outcome, RolloutResult, RolloutResults, RolloutUpdate
    from ._transport import ClientStats
    from ._transports import (
        AsyncBaseTransport,
        MockTransport,
        TransportRequest,
        TransportResponse,
    )
    from .export import ExportResult, ExportResults

_LAZY = {
    **dict.fromkeys(("BreadClient", "Rollout", "Stim", "Targets"), "breadasync._client"),
    **dict.fromkeys(
        ("NOT_GIVEN", "Limits", "PollPolicy", "RetryPolicy", "Timeouts"), "breadasync._config"
    ),
    "AsCompleted": "breadasync._fanout",
    **dict.fromkeys(
        ("JobState", "JobStatus", "OutputPage", "Target", "TargetLike", "TargetList", "TargetRef"),
        "breadasync._models",
    ),
    **dict.fromkeys(
        ("FanoutSummary", "Outcome", "RolloutResult", "RolloutResults", "RolloutUpdate"),
        "breadasync._results",
    ),
    "ClientStats": "breadasync._transport",
    **dict.fromkeys(
        ("AsyncBaseTransport", "MockTransport", "TransportRequest", "TransportResponse"),
        "breadasync._transports",
    ),
    "AiohttpTransport": "breadasync._aiohttp_transport",
    "ExportResult": "breadasync.export",
    "ExportResults": "breadasync.export",
}
"""Names loaded on first use (PEP 562), so importing one part of the package does not load
the rest: a decoding child process needs the decoder, not the client (0.14 s of its
start-up); ``breadasync --version`` needs neither. Only the errors load at once."""


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'breadasync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AiohttpTransport",
    "AsCompleted",
    "AsyncBaseTransport",
    "AuthenticationError",
    "BadRequestError",
    "BreadClient",
    "BreadError",
    "CertificateError",
    "ClientClosedError",
    "ClientStats",
    "ConfigError",
    "ConflictError",
    "DataIntegrityError",
    "DestinationError",
    "ExportError",
    "ExportLockedError",
    "ExportMismatchError",
    "ExportResult",
    "ExportResults",
    "FanoutSummary",
    "InternalServerError",
    "InvalidArgumentError",
    "JobError",
    "JobFailedError",
    "JobState",
    "JobStatus",
    "Limits",
    "MockTransport",
    "NotFoundError",
    "Outcome",
    "OutputPage",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "PollPolicy",
    "PollTimeoutError",
    "ProtocolError",
    "RateLimitError",
    "RedirectError",
    "RetryPolicy",
    "Rollout",
    "RolloutResult",
    "RolloutResults",
    "RolloutUpdate",
    "Stim",
    "Target",
    "TargetLike",
    "TargetList",
    "TargetRef",
    "Targets",
    "Timeouts",
    "TransportRequest",
    "TransportResponse",
    "UnfinishedJobError",
    "UnprocessableEntityError",
    "__version__",
]
