"""Serving an :class:`Emulator` over HTTP: on the running loop, or in a background thread."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from aiohttp import web

from ._app import Emulator


class EmulatorServer:
    """Serves an emulator on the current event loop.

    ``async with EmulatorServer(Emulator()) as server: ... server.url ...``

    Binds ``127.0.0.1`` and a free port by default; sets ``emulator.url`` while serving.
    """

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL clients should use, e.g. ``http://127.0.0.1:43117``."""
        if self.emulator.url is None:
            raise RuntimeError("the emulator is not serving; call start() first")
        return self.emulator.url

    async def start(self) -> str:
        """Start serving; returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("this server is already started")
        # Requests still in flight at shutdown (a drip-fed body, say) are cut off quickly:
        # a test run must not wait a minute for them.
        runner = web.AppRunner(
            self.emulator.app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port = port
        shown = f"[{host}]" if ":" in host else host
        self.emulator.url = f"http://{shown}:{port}"
        return self.emulator.url

    async def aclose(self) -> None:
        """Stop serving and close every connection."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self.emulator.url = None
            await runner.cleanup()

    async def __aenter__(self) -> EmulatorServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class EmulatorThread:
    """Serves an emulator from a background thread with its own event loop.

    Works from sync code and from any async framework, and keeps the emulator's work off the
    caller's loop::

        with EmulatorThread(Emulator()) as server:
            requests.get(server.url + "/v1/repo/r/targets", headers=...)
    """

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self._server = EmulatorServer(emulator, host, port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL clients should use."""
        return self._server.url

    def start(self) -> str:
        """Start the thread and wait until the server listens; returns the base URL."""
        if self._thread is not None:
            raise RuntimeError("this emulator thread is already started")
        self._thread = threading.Thread(target=self._run, name="bread-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self.url

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._server.start())
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self._server.aclose())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop serving and join the thread."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join()

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
