"""An aiohttp backend on breadasync: job status, rollout start, and a target's rows streamed
as NDJSON or as an Arrow IPC stream.

One :class:`BreadClient` for the process, made in the app's cleanup context (its connection
pool and limits are shared by every request). Serve it with ``handler_cancellation=True``:
aiohttp then cancels a handler whose client disconnects, which stops the handler's calls and
the stream's page fetches at once. Without it, a handler that waits (a long poll) runs to
its end for nobody, and a stream stops only at its next write. Run from the repository's
root, with ``BREAD_API_KEY`` (and ``BREAD_BASE_URL``) set::

    python -m examples.aiohttp_app          # http://127.0.0.1:8080

    curl -X POST localhost:8080/repos/my_repo/targets/coding_target/rollout
    curl localhost:8080/repos/my_repo/targets/coding_target/rollout
    curl localhost:8080/repos/my_repo/targets/coding_target/rows.ndjson
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from aiohttp import web

from breadasync import APIStatusError, BreadClient, JobStatus, NotFoundError, UnfinishedJobError

from .encoding import ARROW_STREAM, NDJSON, NOT_COMPLETE, PAGE_SIZE, WINDOW, ArrowStream, ndjson

log = logging.getLogger(__name__)

BREAD = web.AppKey("bread", BreadClient)


async def bread_client(app: web.Application) -> AsyncIterator[None]:
    """The process's one client, closed when the app stops."""
    async with BreadClient(max_concurrency=32) as client:
        app[BREAD] = client
        yield


def error(status: int, message: str) -> web.Response:
    """A JSON error body."""
    return web.json_response({"error": message}, status=status)


@web.middleware
async def service_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The service's refusals as the same status (404, 400...); its failures as 502."""
    try:
        return await handler(request)
    except APIStatusError as exc:
        status = exc.status if 400 <= exc.status < 500 else 502
        return error(status, exc.server_message or str(exc))


def job(status: JobStatus) -> dict[str, Any]:
    """What the endpoints say about a job."""
    return {"status": status.status, "lines": status.lines, "job_id": status.job_id}


async def rollout_status(request: web.Request) -> web.Response:
    """``GET .../rollout``: the rollout job's status."""
    repo, target = request.match_info["repo"], request.match_info["target"]
    status = await request.app[BREAD].targets.rollout.get(target, repo_name=repo)
    return web.json_response(job(status))


async def rollout_start(request: web.Request) -> web.Response:
    """``POST .../rollout``: start the rollout (idempotent) and answer at once."""
    repo, target = request.match_info["repo"], request.match_info["target"]
    status = await request.app[BREAD].targets.rollout.run(target, repo_name=repo, poll=False)
    return web.json_response(job(status), status=202)


async def stream_rows(request: web.Request) -> web.StreamResponse:
    """``GET .../rows.ndjson`` or ``.../rows.arrow``: every row of a complete rollout."""
    repo, target = request.match_info["repo"], request.match_info["target"]
    arrow = request.match_info["format"] == "arrow"
    rows = 0  # taken from the stream
    try:
        async with contextlib.AsyncExitStack() as stack:
            stream = request.app[BREAD].iter_rollout_batches(
                target, repo_name=repo, page_size=PAGE_SIZE, concurrency=WINDOW, window=WINDOW
            )
            try:
                # Entering checks the target and its job: a refusal is an answer of its own,
                # before the 200 and any byte of the body.
                batches = await stack.enter_async_context(stream)
            except NotFoundError as exc:
                return error(404, exc.server_message or "target not found")
            except UnfinishedJobError:
                return error(409, NOT_COMPLETE)
            media_type = ARROW_STREAM if arrow else NDJSON
            response = web.StreamResponse(headers={"Content-Type": media_type})
            await response.prepare(request)
            encoder = ArrowStream()
            async for batch in batches:
                rows += batch.num_rows
                if arrow:
                    await response.write(encoder.batch(batch))
                else:
                    await response.write(await anyio.to_thread.run_sync(ndjson, batch))
            if arrow:
                await response.write(encoder.end())
            await response.write_eof()
            return response
    except (asyncio.CancelledError, ConnectionResetError):
        # The client went away: leaving the ``async with`` stopped every fetch.
        log.info("stream of %s/%s stopped after %d rows: the client went away", repo, target, rows)
        raise


def make_app() -> web.Application:
    """The application (serve it with ``handler_cancellation=True``)."""
    app = web.Application(middlewares=[service_errors])
    app.cleanup_ctx.append(bread_client)
    base = "/repos/{repo}/targets/{target}"
    app.router.add_get(base + "/rollout", rollout_status)
    app.router.add_post(base + "/rollout", rollout_start)
    app.router.add_get(base + "/rows.{format:ndjson|arrow}", stream_rows)
    return app


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    web.run_app(make_app(), host="127.0.0.1", port=8080, handler_cancellation=True)
