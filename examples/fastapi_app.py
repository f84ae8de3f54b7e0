"""A FastAPI backend on breadasync: job status, rollout start, and a target's rows streamed
as NDJSON or as an Arrow IPC stream.

One :class:`BreadClient` for the process, made in the app's ``lifespan``. Under uvicorn (or
any ASGI server) a client that disconnects never cancels the endpoint: the server only
reports ``http.disconnect`` to whoever reads the request's ``receive``. Starlette's own
``StreamingResponse`` listens for it; so does :class:`RowStream` here, which cancels the
stream (and with it every page fetch) as soon as the client is gone. An endpoint that waits
(``rollout.run(poll=True)``) runs to its end for nobody: bound it (``poll_timeout=``), or
start the job and let the caller poll, as ``POST .../rollout`` does. Run from the
repository's root, with ``BREAD_API_KEY`` (and ``BREAD_BASE_URL``) set::

    uvicorn examples.fastapi_app:app        # http://127.0.0.1:8000
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from breadasync import APIStatusError, BreadClient, JobStatus, NotFoundError, UnfinishedJobError

from .encoding import ARROW_STREAM, NDJSON, NOT_COMPLETE, PAGE_SIZE, WINDOW, ArrowStream, ndjson

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, BreadClient]]:
    """The process's one client, closed when the app stops (``request.state.bread``)."""
    async with BreadClient(max_concurrency=32) as client:
        yield {"bread": client}


app = FastAPI(lifespan=lifespan)


def bread(request: Request) -> BreadClient:
    """The process's client."""
    client: BreadClient = request.state.bread
    return client


@app.exception_handler(APIStatusError)
async def service_errors(request: Request, exc: Exception) -> JSONResponse:
    """The service's refusals as the same status (404, 400...); its failures as 502."""
    assert isinstance(exc, APIStatusError)
    status = exc.status if 400 <= exc.status < 500 else 502
    return JSONResponse({"error": exc.server_message or str(exc)}, status_code=status)


def job(status: JobStatus) -> dict[str, Any]:
    """What the endpoints say about a job."""
    return {"status": status.status, "lines": status.lines, "job_id": status.job_id}


@app.get("/repos/{repo}/targets/{target}/rollout")
async def rollout_status(repo: str, target: str, request: Request) -> dict[str, Any]:
    """The rollout job's status."""
    return job(await bread(request).targets.rollout.get(target, repo_name=repo))


@app.post("/repos/{repo}/targets/{target}/rollout", status_code=202)
async def rollout_start(repo: str, target: str, request: Request) -> dict[str, Any]:
    """Start the rollout (idempotent) and answer at once."""
    return job(await bread(request).targets.rollout.run(target, repo_name=repo, poll=False))


class RowStream(Response):
    """A target's rows, streamed; the stream stops when the client disconnects.

    The batch stream is entered, and so the target checked, before anything is sent: a
    missing target is a 404 (an unfinished job a 409) with a JSON body, not a 200 with an
    empty one. It is entered and left in the task that serves the request, as its task
    group requires (Starlette's ``StreamingResponse`` iterates its body in another task).
    """

    def __init__(self, client: BreadClient, repo: str, target: str, *, arrow: bool) -> None:
        # As StreamingResponse does: no body, so no Content-Length header.
        self.status_code = 200
        self.media_type = ARROW_STREAM if arrow else NDJSON
        self.background = None
        self.init_headers()
        self._client, self._repo, self._target, self._arrow = client, repo, target, arrow
        self.rows = 0
        """Rows taken from the batch stream so far."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = False
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                nonlocal gone
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            try:
                await self._stream(scope, receive, send)
            except OSError:
                gone = True  # how a server of ASGI 2.4 or later says "disconnected"
            tg.cancel_scope.cancel()
        if gone:
            # Leaving the batch stream's ``async with`` stopped every fetch.
            log.info(
                "stream of %s/%s stopped after %d rows: the client went away",
                self._repo,
                self._target,
                self.rows,
            )

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = self._client.iter_rollout_batches(
            self._target,
            repo_name=self._repo,
            page_size=PAGE_SIZE,
            concurrency=WINDOW,
            window=WINDOW,
        )
        async with AsyncExitStack() as stack:
            try:
                batches = await stack.enter_async_context(stream)
            except NotFoundError as exc:
                refusal = JSONResponse({"error": exc.server_message or "target not found"}, 404)
                await refusal(scope, receive, send)
                return
            except UnfinishedJobError:
                await JSONResponse({"error": NOT_COMPLETE}, 409)(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            encoder = ArrowStream()
            async for batch in batches:
                self.rows += batch.num_rows
                if self._arrow:
                    chunk = encoder.batch(batch)
                else:
                    chunk = await anyio.to_thread.run_sync(ndjson, batch)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            end = encoder.end() if self._arrow else b""
            await send({"type": "http.response.body", "body": end, "more_body": False})


@app.get("/repos/{repo}/targets/{target}/rows.ndjson", response_class=Response)
async def rows_ndjson(repo: str, target: str, request: Request) -> Response:
    """Every row of a complete rollout, one JSON object a line."""
    return RowStream(bread(request), repo, target, arrow=False)


@app.get("/repos/{repo}/targets/{target}/rows.arrow", response_class=Response)
async def rows_arrow(repo: str, target: str, request: Request) -> Response:
    """Every row of a complete rollout, as an Arrow IPC stream."""
    return RowStream(bread(request), repo, target, arrow=True)
