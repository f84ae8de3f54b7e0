"""``iter_rollout_batches``: :class:`BatchStream`, a rollout's rows as Arrow record
batches in offset order, fetched by the exporter's range reader inside a task group that
lives exactly as long as the caller's ``async with`` block."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from breadasync._errors import cancel_requests, first_error, reraise
from breadasync._models import TargetRef

if TYPE_CHECKING:
    # This module is light on purpose: the exporter and pyarrow load on entering the
    # stream, in a worker thread (``load``), never on the event loop.
    import pyarrow as pa
    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from ._exporter import Exporter
    from ._plan import ExportPlan
    from ._reader import Page


class BatchStream:
    """A rollout's rows as ``pyarrow.RecordBatch`` objects, in offset order: an async
    context manager whose body iterates it::

        async with client.iter_rollout_batches("t", repo_name="r") as batches:
            async for batch in batches:
                ...

    Entering it checks the options (:class:`InvalidArgumentError`), reads the job's status
    (a missing target raises :class:`NotFoundError`, an unfinished job
    :class:`UnfinishedJobError`, before any batch is asked for) and starts
    fetching pages in a task group that lives exactly as long as the ``async with`` block:
    leaving the block, early or by an error or a cancellation, stops every fetch and waits
    for the threads decoding pages. An error of the fetches is raised by the iteration. At
    the end, the job's status is read once more: rows of a job re-run meanwhile raise
    :class:`DataIntegrityError` instead of ending the stream.
    """

    def __init__(
        self,
        target: TargetRef,
        exporter: Callable[[], Exporter],
        load: Callable[[], Awaitable[None]],
    ) -> None:
        """The stream of ``target``'s rows, read by the exporter ``exporter()`` builds once
        ``load()`` has imported it."""
        self._target = target
        self._make = exporter
        self._load = load
        self._exporter: Exporter | None = None
        self._cancels = 0
        self._receive: MemoryObjectReceiveStream[tuple[Page, list[pa.RecordBatch]]] | None = None
        self._group: TaskGroup | None = None
        self._scope = anyio.CancelScope()
        self._error: BaseException | None = None
        self._queue: list[pa.RecordBatch] = []
        self._entered = False
        self._finished = False
        self.plan: ExportPlan | None = None
        """The plan (lines, status, the job's identity), once entered."""

    async def __aenter__(self) -> BatchStream:
        if self._entered:
            raise RuntimeError("a batch stream is entered once; call iter_rollout_batches again")
        self._entered = True
        self._cancels = cancel_requests()
        await self._load()
        from ._exporter import pages_of
        from ._plan import Part

        self._exporter = exporter = self._make()
        plan, _ = await exporter.plan(self._target, "")
        self.plan = plan
        reader = exporter.reader(plan)
        pair: tuple[
            MemoryObjectSendStream[tuple[Page, list[pa.RecordBatch]]],
            MemoryObjectReceiveStream[tuple[Page, list[pa.RecordBatch]]],
        ] = anyio.create_memory_object_stream()
        send, receive = pair
        group = anyio.create_task_group()
        await group.__aenter__()
        self._group, self._receive = group, receive

        async def produce() -> None:
            # A failure reaches the consumer through the stream (the end, then the error),
            # so it never cancels the consumer's own code in the ``async with`` block; a
            # scope of its own, so stopping early cancels the fetches and nothing else.
            with self._scope:
                try:
                    await reader.run(pages_of(plan, [Part(0, 0, plan.lines)]), send)
                except ExceptionGroup as failed:
                    self._error = first_error(failed)
                except Exception as exc:
                    self._error = exc
                finally:
                    send.close()

        group.start_soon(produce)
        return self

    def __aiter__(self) -> BatchStream:
        return self

    async def __anext__(self) -> pa.RecordBatch:
        if not self._entered:
            raise RuntimeError(
                "iterate the batches inside 'async with client.iter_rollout_batches(...) as "
                "batches:', which checks the target first and stops every fetch when left"
            )
        if self._finished or self._receive is None:
            raise StopAsyncIteration
        while not self._queue:
            try:
                _, batches = await self._receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                await self._end()
                raise StopAsyncIteration from None
            self._queue.extend(batches)
        return self._queue.pop(0)

    async def _end(self) -> None:
        self._finished = True
        error, self._error = self._error, None
        if error is not None:
            raise error
        assert self.plan is not None
        assert self._exporter is not None
        if self.plan.lines:
            await self._exporter.check_job(self.plan, "", final=True)

    async def aclose(self) -> None:
        """Stop fetching (the ``async with`` block does this when it ends)."""
        self._finished = True
        self._scope.cancel()
        if self._receive is not None:
            self._receive.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        await self.aclose()
        if group is None:
            return
        # The block's own exception (or cancellation) goes on as it is; the group only
        # waits for the fetches, already cancelled, and for their decoding threads.
        try:
            await group.__aexit__(None, None, None)
        except BaseExceptionGroup as failed:
            reraise(failed, self._cancels)
