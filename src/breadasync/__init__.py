"""breadasync: drive the Bread rollout API at scale from asyncio.

async with BreadClient() as client:
    status = await client.targets.rollout.run("coding_target", repo_name="my_repo")

Everything public is importable from here; each part loads on first use.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._errors import (
    AnswerTooLargeError,
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
from ._lazy import lazy_names as _lazy_names
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
    **dict.fromkeys(("BreadClient", "Rollout", "Stim", "Targets"), "._client"),
    **dict.fromkeys(("NOT_GIVEN", "Limits", "PollPolicy", "RetryPolicy", "Timeouts"), "._config"),
    "AsCompleted": "._fanout",
    **dict.fromkeys(
        ("JobState", "JobStatus", "OutputPage", "Target", "TargetLike", "TargetList", "TargetRef"),
        "._models",
    ),
    **dict.fromkeys(
        ("FanoutSummary", "Outcome", "RolloutResult", "RolloutResults", "RolloutUpdate"),
        "._results",
    ),
    "ClientStats": "._transport",
    **dict.fromkeys(
        ("AsyncBaseTransport", "MockTransport", "TransportRequest", "TransportResponse"),
        "._transports",
    ),
    "AiohttpTransport": "._aiohttp_transport",
    "ExportResult": ".export",
    "ExportResults": ".export",
}
"""Names loaded on first use (PEP 562), so importing one part of the package does not load
the rest: a decoding child process needs the decoder, not the client (0.14 s of its
start-up); ``breadasync --version`` needs neither. Only the errors load at once."""


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)

__all__ = [
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AiohttpTransport",
    "AnswerTooLargeError",
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
