"""Shared test helpers: a thin raw-HTTP caller for emulator tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from breadasync.emulator import Emulator


@dataclass
class Reply:
    """One raw HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class RawApi:
    """Speaks plain HTTP to an emulator, so emulator tests do not depend on our client."""

    def __init__(self, session: aiohttp.ClientSession, emulator: Emulator) -> None:
        self.session = session
        self.emulator = emulator

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
        allow_redirects: bool = False,
    ) -> Reply:
        sent = {"Authorization": f"Bearer {self.emulator.api_key}"} if auth else {}
        sent.update(headers or {})
        if json is not None:
            data = orjson.dumps(json)
            sent["Content-Type"] = "application/json"
        assert self.emulator.url is not None
        async with self.session.request(
            method,
            self.emulator.url + path,
            data=data,
            params=params,
            headers=sent,
            allow_redirects=allow_redirects,
        ) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.read())

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> Reply:
        return await self.call("POST", path, **kwargs)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, bread_emulator: Emulator) -> RawApi:
    return RawApi(http, bread_emulator)
