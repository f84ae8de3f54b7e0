"""The resources of the client: ``client.targets``, ``.targets.stim``, ``.targets.rollout``.

Names and argument shapes are the official SDK's (``aibread``): ``repo_name`` may be passed
positionally where the SDK takes it so (``targets.list("repo")``, ``targets.create("repo",
...)``), by keyword everywhere. Every method also takes the SDK's per-call ``x_user_id`` (the
same as ``user_id``), ``extra_headers``, ``extra_query`` and ``extra_body``: added to every
request of the call (a run's polls too), winning over its own values, never over the key,
user or idempotency headers. Each resource talks to the API layer (:class:`Api`); waits go
through the one watch engine (``_fanout.watch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._api import Api, Extras, JobKind
from ._config import NOT_GIVEN, NotGiven, PollPolicy, TimeoutArg
from ._errors import InvalidArgumentError
from ._fanout import check_poll_policy, watch
from ._models import (
    JobStatus,
    OutputPage,
    Target,
    TargetList,
    TargetRef,
    parse_page,
    parse_target,
    parse_target_list,
)
from ._validation import (
    check_limit,
    check_name,
    check_offset,
    check_seconds,
    repo_path,
    target_path,
)


def _sdk_call(
    api: Api,
    user_id: str | NotGiven | None,
    x_user_id: str | NotGiven,
    extra_headers: Mapping[str, str] | None,
    extra_query: Mapping[str, Any] | None,
    extra_body: Mapping[str, Any] | None,
) -> tuple[Api, str | NotGiven | None]:
    """The API one call works with, and the user it acts for, from the SDK's per-call
    arguments: ``x_user_id`` is ``user_id`` (both go out as ``X-User-Id``)."""
    if x_user_id is not NOT_GIVEN:
        if user_id is not NOT_GIVEN and user_id != x_user_id:
            raise InvalidArgumentError(
                "user_id and x_user_id name two users; give one (both act for the user named)"
            )
        user_id = x_user_id
    return api.with_extras(Extras.of(extra_headers, extra_query, extra_body)), user_id


class Targets:
    """``client.targets``: create, get and list targets; ``.stim`` and ``.rollout`` jobs."""

    def __init__(self, api: Api) -> None:
        self._api = api
        self.stim = Stim(api)
        """Stimulus-generation jobs."""
        self.rollout = Rollout(api)
        """Rollout (trajectory-generation) jobs."""

    async def create(
        self,
        repo_name: str,
        *,
        target_name: str,
        template: str = "default",
        overrides: Mapping[str, Any] | None = None,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Target:
        """Create a target (idempotent: the same config again returns the existing one).

        Raises:
            ConflictError: The target exists with a different config (targets are immutable).
            UnprocessableEntityError: An override has the wrong type or range.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        path = repo_path(repo_name)
        check_name(target_name, "target_name")
        check_name(template, "template")
        if overrides is not None and not isinstance(overrides, Mapping):
            raise InvalidArgumentError(
                f"overrides must be a mapping, got {type(overrides).__name__}"
            )
        body: dict[str, Any] = {"target_name": target_name, "template": template}
        if overrides is not None:
            body["overrides"] = dict(overrides)
        return await api.call(
            "POST",
            path,
            parse_target,
            body=body,
            user_id=user_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def get(
        self,
        target_name: str,
        *,
        repo_name: str,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> Target:
        """A target and its config.

        Raises:
            NotFoundError: No such target.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        return await api.call(
            "GET",
            target_path(repo_name, target_name),
            parse_target,
            user_id=user_id,
            timeout=timeout,
        )

    async def list(
        self,
        repo_name: str,
        *,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> TargetList:
        """The names of a repo's targets.

        Raises:
            NotFoundError: No such repo.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        return await api.call(
            "GET",
            repo_path(repo_name),
            parse_target_list,
            user_id=user_id,
            timeout=timeout,
        )


class _Jobs:
    """What stim and rollout jobs share: run, get, get_output, wait."""

    _kind: JobKind

    def __init__(self, api: Api) -> None:
        self._api = api

    async def run(
        self,
        target_name: str,
        *,
        repo_name: str,
        poll: bool = True,
        poll_timeout: float | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        raise_on_failure: bool = True,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> JobStatus:
        """Start the job (idempotent: if it exists, its current state comes back).

        With ``poll=True`` (the default) it then waits, as :meth:`wait` does, until the job
        is ``complete`` or ``failed``.

        Args:
            poll: Wait for a terminal state.
            poll_timeout: Seconds to wait at most (default: no bound); then
                :class:`PollTimeoutError`, the job still running on the service.
            poll_policy: Poll spacing for this call (default: the client's).
            raise_on_failure: Raise :class:`JobFailedError` for a job that failed (or stopped
                otherwise: ``cancelled``...) instead of returning its status.
            user_id: Act for this user on every request of the call, polls included
                (``x_user_id`` is the same, by the SDK's name).
            timeout: Per-request timeout (not the wait: see ``poll_timeout``); ``None``:
                no bound.
            extra_headers, extra_query, extra_body: Added to every request of the call,
                as in the SDK.
            idempotency_key: The POST's ``Idempotency-Key`` (default: a fresh one, reused by
                the POST's own retries).

        Raises:
            NotFoundError: No such target.
            BadRequestError: A prerequisite is missing (stim not complete, no ``model_name``).
            PaymentRequiredError: No credit left.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        ref = TargetRef.of(target_name, repo_name)
        # Checked before anything is sent, whether or not they are used.
        poll_timeout = check_seconds(poll_timeout, "poll_timeout")
        check_poll_policy(poll_policy)
        if not poll:
            return await api.start_job(
                ref, self._kind, user_id=user_id, timeout=timeout, idempotency_key=idempotency_key
            )
        return await watch(
            api,
            ref,
            self._kind,
            start=True,
            poll_timeout=poll_timeout,
            poll_policy=poll_policy,
            raise_on_failure=raise_on_failure,
            user_id=user_id,
            timeout=timeout,
            idempotency_key=idempotency_key,
        )

    async def get(
        self,
        target_name: str,
        *,
        repo_name: str,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> JobStatus:
        """The job's current status (``not_started`` if it was never started).

        Raises:
            NotFoundError: No such target.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        return await api.get_job(
            TargetRef.of(target_name, repo_name), self._kind, user_id=user_id, timeout=timeout
        )

    async def get_output(
        self,
        target_name: str,
        *,
        repo_name: str,
        limit: int | NotGiven = NOT_GIVEN,
        offset: int | NotGiven = NOT_GIVEN,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> OutputPage:
        """One page of the job's output.

        Args:
            limit: Rows per page, 1..1000 (the service's default is 100). A page may hold
                fewer rows than asked even before the end: continue from
                ``offset + len(page.output)``, not ``offset + limit``.
            offset: The first row, from 0.

        Raises:
            InvalidArgumentError: ``limit`` or ``offset`` out of range (nothing is sent).
            NotFoundError: No such target.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        params: dict[str, int] = {}
        if limit is not NOT_GIVEN:
            params["limit"] = check_limit(limit)
        if offset is not NOT_GIVEN:
            params["offset"] = check_offset(offset)
        return await api.call(
            "GET",
            target_path(repo_name, target_name, self._kind, "output"),
            parse_page,
            params=params,
            user_id=user_id,
            timeout=timeout,
        )

    async def wait(
        self,
        target_name: str,
        *,
        repo_name: str,
        poll_timeout: float | None = None,
        poll_policy: PollPolicy | NotGiven = NOT_GIVEN,
        raise_on_failure: bool = True,
        user_id: str | NotGiven | None = NOT_GIVEN,
        timeout: TimeoutArg | NotGiven = NOT_GIVEN,
        x_user_id: str | NotGiven = NOT_GIVEN,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> JobStatus:
        """Wait until an already started job is ``complete`` or ``failed``.

        Polls adaptively (see :class:`PollPolicy`): often at first, then toward the docs'
        10-30 s, and just after the finish the job's progress predicts.

        Raises:
            JobError: The job was never started.
            JobFailedError: It failed (unless ``raise_on_failure=False``).
            PollTimeoutError: ``poll_timeout`` passed first.
        """
        api, user_id = _sdk_call(
            self._api, user_id, x_user_id, extra_headers, extra_query, extra_body
        )
        return await watch(
            api,
            TargetRef.of(target_name, repo_name),
            self._kind,
            start=False,
            poll_timeout=check_seconds(poll_timeout, "poll_timeout"),
            poll_policy=poll_policy,
            raise_on_failure=raise_on_failure,
            user_id=user_id,
            timeout=timeout,
        )


class Stim(_Jobs):
    """``client.targets.stim``: stimulus-generation jobs (a rollout needs one complete)."""

    _kind = "stim"


class Rollout(_Jobs):
    """``client.targets.rollout``: rollout (trajectory-generation) jobs and their output."""

    _kind = "rollout"
