"""breadasync: drive the Bread rollout API at scale from asyncio.

async with BreadClient() as client:
    status = await client.targets.rollout.run("coding_target", repo_name="my_repo")
"""

from ._client import BreadClient, Rollout, Stim, Targets
from ._config import NOT_GIVEN, Limits, PollPolicy, RetryPolicy, Timeouts
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BreadError,
    ClientClosedError,
    ConfigError,
    ConflictError,
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
    UnprocessableEntityError,
)
from ._models import JobState, JobStatus, OutputPage, Target, TargetList
from ._transport import ClientStats
from ._version import __version__

__all__ = [
    "NOT_GIVEN",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BreadClient",
    "BreadError",
    "ClientClosedError",
    "ClientStats",
    "ConfigError",
    "ConflictError",
    "InternalServerError",
    "InvalidArgumentError",
    "JobError",
    "JobFailedError",
    "JobState",
    "JobStatus",
    "Limits",
    "NotFoundError",
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
    "Stim",
    "Target",
    "TargetList",
    "Targets",
    "Timeouts",
    "UnprocessableEntityError",
    "__version__",
]
