"""Fault execution: the middleware every API request passes through.

It records each request in :class:`Stats`, applies the fault switches of :class:`Faults`
(latency, overload, rate limits, injected errors, then, on a successful answer, corrupt,
hostile, truncated, dropped and drip-fed bodies) and checks the key. The handlers themselves
(``_handlers``) know nothing of faults beyond ``page_cap`` and ``growing_lines``.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hmac
import math
import time

import orjson
from aiohttp import web

from ._core import (
    JSON_TYPE,
    REQUEST,
    EmulatorCore,
    Handler,
    RequestContext,
    retry_after_headers,
)
from ._faults import Faults
from ._stats import RequestRecord

_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_HTML_504 = _HTML_502.replace(b"502 Bad Gateway", b"504 Gateway Time-out")


class FaultExecution(EmulatorCore):
    """The request middleware: observation, faults and authentication."""

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        name = request.match_info.route.name
        if name is not None and name.startswith("control:"):
            return await self._guard(handler, request, control=True)
        route = name or "unmatched"
        info = request.match_info
        repo, target = info.get("repo"), info.get("target")
        started = time.monotonic()
        self.stats.enter()
        status, fault, rows = 499, None, None
        try:
            if name is None:
                # An unknown path gets a JSON 404/405 before any auth, as the service does.
                response: web.StreamResponse = await self._guard(handler, request)
                status = response.status
                return response
            faults, scope = self._faults_for(route, repo, target)
            context = RequestContext(faults)
            REQUEST.set(context)
            response, fault = await self._serve(request, handler, faults, scope)
            status = response.status
            rows = context.rows
            return response
        finally:
            query = request.rel_url.query
            self.stats.leave(
                RequestRecord(
                    method=request.method,
                    route=route,
                    repo=repo,
                    target=target,
                    status=status,
                    fault=fault,
                    user_id=request.headers.get("X-User-Id") or query.get("user_id"),
                    idempotency_key=request.headers.get("Idempotency-Key"),
                    offset=_int_or_none(query.get("offset")),
                    limit=_int_or_none(query.get("limit")),
                    rows=rows,
                    peer=_peer(request),
                    started=started,
                    elapsed=time.monotonic() - started,
                )
            )

    async def _guard(
        self, handler: Handler, request: web.Request, *, control: bool = False
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return self._error(exc.status, exc.reason)
        except (ValueError, KeyError, TypeError) as exc:
            if not control:
                raise
            return self._error(400, f"bad control request: {exc}")

    async def _serve(
        self,
        request: web.Request,
        handler: Handler,
        faults: Faults | None,
        scope: tuple[str, str] | None,
    ) -> tuple[web.StreamResponse, str | None]:
        if faults is not None:
            # The key's bucket is a gateway's: it sees each request as it arrives, before
            # the backend's latency (whose jitter would otherwise reorder the arrivals and
            # turn a one-token bucket into a lottery whatever the client's pace).
            key_wait = (
                0.0
                if faults.key_rate_limit is None
                else self._take_key_token(faults, scope, request)
            )
            delay = faults.latency + (self._rng.random() * faults.jitter if faults.jitter else 0)
            if delay > 0:
                await asyncio.sleep(delay)
            early = self._early_fault(faults, scope, request, key_wait)
            if early is not None:
                return early
        denied = self._authenticate(request)
        if denied is not None:
            return denied, None
        response = await self._guard(handler, request)
        if faults is None or response.status >= 300 or not isinstance(response, web.Response):
            return response, None
        return await self._late_fault(request, response, faults, scope)

    def _faults_for(
        self, route: str, repo: str | None, target: str | None
    ) -> tuple[Faults | None, tuple[str, str] | None]:
        with self._lock:
            if repo is not None and target is not None:
                state = self._find(repo, target)
                if state is not None and state.faults is not None:
                    if state.faults.applies_to(route):
                        return state.faults, (repo, target)
                    return None, None
            if self._faults is not None and self._faults.applies_to(route):
                return self._faults, None
            return None, None

    def _take_fault(self, faults: Faults, scope: tuple[str, str] | None) -> bool:
        """Spend one fault of the scope's budget; False when it is used up."""
        if faults.max_faults is None:
            return True
        used = self._fault_budget.get(scope, 0)
        if used >= faults.max_faults:
            return False
        self._fault_budget[scope] = used + 1
        return True

    def _early_fault(
        self,
        faults: Faults,
        scope: tuple[str, str] | None,
        request: web.Request,
        key_wait: float = 0.0,
    ) -> tuple[web.Response, str] | None:
        with self._lock:
            if faults.redirect_to and self._take_fault(faults, scope):
                location = faults.redirect_to.rstrip("/") + "/v1/elsewhere"
                return web.Response(status=307, headers={"Location": location}), "redirect"
            if faults.overload_seconds and faults.overload_start is not None:
                now = self.clock.now()
                if faults.overload_start <= now < faults.overload_start + faults.overload_seconds:
                    headers = (
                        {}
                        if faults.overload_retry_after is None
                        else {"Retry-After": str(math.ceil(faults.overload_retry_after))}
                    )
                    return self._error(503, "Service overloaded", headers), "overload"
            if key_wait > 0 and self._take_fault(faults, scope):
                return self._error(
                    429, "Rate limit exceeded", self._key_rate_headers(key_wait, faults)
                ), "rate_limit"
            if faults.rate_limit is not None:
                wait = self._take_token(faults, scope)
                if wait > 0 and self._take_fault(faults, scope):
                    headers = retry_after_headers(wait, faults.retry_after_format)
                    headers.update(self._should_retry(faults))
                    return self._error(429, "Rate limit exceeded", headers), "429"
            if faults.errors:
                draw = self._rng.random()
                for status, rate in faults.errors.items():
                    if draw < rate:
                        if self._take_fault(faults, scope):
                            error = self._injected_error(status, faults, request)
                            return error, str(status)
                        break
                    draw -= rate
        return None

    def _take_key_token(
        self, faults: Faults, scope: tuple[str, str] | None, request: web.Request
    ) -> float:
        """Take a token of the key's bucket; 0 if one was free, else seconds until one is."""
        assert faults.key_rate_limit is not None
        rate = faults.key_rate_limit
        burst = max(1, faults.key_rate_burst)
        key = (scope, request.headers.get("Authorization", ""))
        now = time.monotonic()
        tokens, stamp = self._key_buckets.get(key, (float(burst), now))
        tokens = min(burst, tokens + (now - stamp) * rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / rate
        self._key_buckets[key] = (tokens, now)
        return wait

    def _key_rate_headers(self, wait: float, faults: Faults) -> dict[str, str]:
        """``Retry-After`` as a gateway writes it: whole seconds, rounded up, as a delta or
        as an HTTP-date (1 s resolution); or no header at all."""
        draw = self._rng.random()
        if draw < faults.key_rate_no_header:
            return {}
        seconds = max(1, math.ceil(wait))
        if draw < faults.key_rate_no_header + (1 - faults.key_rate_no_header) / 2:
            return {"Retry-After": str(seconds)}
        # The date is rounded up too, so a client reading it never comes back early.
        when = math.ceil(time.time()) + seconds
        return {"Retry-After": email.utils.formatdate(when, usegmt=True)}

    def _take_token(self, faults: Faults, scope: tuple[str, str] | None) -> float:
        """Take a rate-limit token; 0 if one was free, else seconds until the next one."""
        assert faults.rate_limit is not None
        now = time.monotonic()
        state = None if scope is None else self._find(*scope)
        tokens, stamp = (
            (self._server_tokens, self._server_stamp)
            if state is None
            else (state.rate_tokens, state.rate_stamp)
        )
        burst = max(1, faults.rate_burst)
        tokens = burst if tokens is None else min(burst, tokens + (now - stamp) * faults.rate_limit)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / faults.rate_limit
        if state is None:
            self._server_tokens, self._server_stamp = tokens, now
        else:
            state.rate_tokens, state.rate_stamp = tokens, now
        return wait

    @staticmethod
    def _should_retry(faults: Faults) -> dict[str, str]:
        if faults.should_retry is None:
            return {}
        return {"x-should-retry": "true" if faults.should_retry else "false"}

    def _injected_error(self, status: int, faults: Faults, request: web.Request) -> web.Response:
        headers = self._should_retry(faults)
        if faults.echo_request:
            echoed = "; ".join(f"{k}: {v}" for k, v in request.headers.items())
            return self._error(
                status, f"Upstream failed for request with headers {echoed}", headers
            )
        if status in (502, 504):
            body = _HTML_502 if status == 502 else _HTML_504
            return web.Response(body=body, status=status, content_type="text/html", headers=headers)
        if status in (429, 503):
            headers.update(retry_after_headers(faults.retry_after, faults.retry_after_format))
        messages = {
            500: "Internal server error",
            503: "Service temporarily unavailable",
            429: "Rate limit exceeded",
            408: "Request timeout",
        }
        return self._error(status, messages.get(status, f"Injected error {status}"), headers)

    async def _late_fault(
        self,
        request: web.Request,
        response: web.Response,
        faults: Faults,
        scope: tuple[str, str] | None,
    ) -> tuple[web.StreamResponse, str | None]:
        body = response.body
        assert isinstance(body, bytes)
        with self._lock:
            # One draw per switch, each independent of the others and of other requests.
            corrupt = (
                faults.corrupt > 0
                and self._rng.random() < faults.corrupt
                and self._take_fault(faults, scope)
            )
            truncate = (
                not corrupt
                and faults.truncate > 0
                and self._rng.random() < faults.truncate
                and self._take_fault(faults, scope)
            )
            drop = (
                not corrupt
                and not truncate
                and faults.drop > 0
                and self._rng.random() < faults.drop
                and self._take_fault(faults, scope)
            )
            drip = (
                not drop
                and faults.drip > 0
                and self._rng.random() < faults.drip
                and self._take_fault(faults, scope)
            )
        fault: str | None = None
        if corrupt:
            fault = "corrupt"
            if faults.corrupt_kind in ("huge", "huge-string"):
                return await self._write_huge(request, faults.corrupt_kind == "huge-string"), fault
            response = self._corrupted(body, faults, request)
            body = response.body
            assert isinstance(body, bytes)
        elif truncate:
            fault = "truncate"
            body = body[: max(1, len(body) // 2)]
            response = web.Response(body=body, status=response.status, content_type=JSON_TYPE)
        if drop:
            return await self._write_stream(request, response, body, half=True, rate=None), "drop"
        rate = faults.drip_rate if drip else faults.slow_body
        if rate is not None:
            streamed = await self._write_stream(request, response, body, half=False, rate=rate)
            return streamed, ("drip" if drip and fault is None else fault)
        return response, fault

    def _corrupted(self, body: bytes, faults: Faults, request: web.Request) -> web.Response:
        kind = faults.corrupt_kind
        if kind == "echo":
            echoed = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
            return web.Response(text=f"debug proxy saw:\n{echoed}", content_type="text/plain")
        if kind == "html":
            return web.Response(
                body=b"<html><body><h1>Maintenance</h1></body></html>", content_type="text/html"
            )
        if kind == "truncated":
            return web.Response(body=body[: max(1, len(body) // 2)], content_type=JSON_TYPE)
        if kind == "deep":
            depth = faults.hostile_depth
            return web.Response(body=b"[" * depth + b"]" * depth, content_type=JSON_TYPE)
        if kind == "deep-object":
            return web.Response(body=_deep(faults.hostile_depth, True), content_type=JSON_TYPE)
        data = orjson.loads(body)
        if kind in _ROW_HOSTILE:
            return web.Response(body=_hostile_page(data, kind, faults), content_type=JSON_TYPE)
        if kind == "wrong-types":
            if "lines" in data:
                data["lines"] = f"{data['lines']} lines"
            if "output" in data:
                data["output"] = {"rows": data["output"]}
        elif kind == "has-more-lies" and "has_more" in data:
            data["has_more"] = not data["has_more"]
        elif kind == "overlong" and isinstance(data.get("output"), list) and data["output"]:
            data["output"].append(data["output"][-1])
        elif kind == "empty" and isinstance(data.get("output"), list):
            data["output"] = []
        return web.Response(body=orjson.dumps(data), content_type=JSON_TYPE)

    async def _write_stream(
        self,
        request: web.Request,
        response: web.Response,
        body: bytes,
        *,
        half: bool,
        rate: float | None,
    ) -> web.StreamResponse:
        stream = web.StreamResponse(status=response.status, headers=response.headers)
        stream.content_length = len(body)
        await stream.prepare(request)
        data = body[: len(body) // 2] if half else body
        if rate is None:
            await stream.write(data)
        else:
            # Drip-feed: each chunk resets a per-read timeout, so only a total deadline helps.
            chunk = max(1, int(rate / 20))
            for start in range(0, len(data), chunk):
                piece = data[start : start + chunk]
                await asyncio.sleep(len(piece) / rate)
                await stream.write(piece)
        if half:
            if request.transport is not None:
                request.transport.close()
            return stream
        await stream.write_eof()
        return stream

    async def _write_huge(self, request: web.Request, in_row: bool) -> web.StreamResponse:
        # Chunked, without a Content-Length, so only a client-side size limit stops it.
        stream = web.StreamResponse(status=200)
        stream.content_type = JSON_TYPE
        stream.enable_chunked_encoding()
        await stream.prepare(request)
        await stream.write(b'{"output":[{"response":"' if in_row else b'{"output":["')
        size = 1024 * 1024
        chunk = b"x" * size
        left = self._huge_body_bytes
        while left > 0:
            await stream.write(chunk[: min(size, left)])
            left -= size
        await stream.write(b'"}]}' if in_row else b'"]}')
        await stream.write_eof()
        return stream

    def _authenticate(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization")
        if not header:
            return self._error(
                401,
                "Missing API key: send 'Authorization: Bearer <key>'",
                {"WWW-Authenticate": "Bearer"},
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8", "replace"), self.api_key.encode()
        ):
            return self._error(401, "Invalid API key", {"WWW-Authenticate": "Bearer"})
        override = request.headers.get("X-User-Id") or request.rel_url.query.get("user_id")
        if override and not self.master_key:
            return self._error(403, "User override (X-User-Id) requires a master API key")
        return None


def _peer(request: web.Request) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if peer else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --- hostile bodies -------------------------------------------------------------------------

_ROW_HOSTILE = frozenset(
    {
        "deep-row",
        "deep-row-object",
        "deep-field",
        "deep-field-object",
        "many-keys",
        "nan",
        "lone-surrogate",
        "duplicate-keys",
        "big-int",
    }
)


@functools.lru_cache(maxsize=8)
def _deep(depth: int, objects: bool) -> bytes:
    if objects:
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b"[" * depth + b"]" * depth


@functools.lru_cache(maxsize=2)
def _many_keys(count: int) -> bytes:
    return b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(count)) + b"}"


def _hostile_value(kind: str, faults: Faults) -> bytes:
    """The field(s) a hostile kind adds to a row, as ``,"name":value`` bytes."""
    if kind in ("deep-field", "deep-row"):
        return b',"metadata":' + _deep(faults.hostile_depth, False)
    if kind in ("deep-field-object", "deep-row-object"):
        return b',"metadata":' + _deep(faults.hostile_depth, True)
    if kind == "many-keys":
        return b',"features":' + _many_keys(faults.hostile_keys)
    if kind == "nan":
        return b',"score":NaN,"logprob":-Infinity,"ratio":Infinity'
    if kind == "lone-surrogate":
        return b',"note":"half an emoji: \\ud83d and a stray low half \\udc00"'
    if kind == "duplicate-keys":
        return b',"tokens":"duplicate","tokens":-1'
    return b',"seed":123456789012345678901234567890,"offset_id":-9223372036854775809'


def _hostile_page(data: dict[str, object], kind: str, faults: Faults) -> bytes:
    """``data`` (an answer) with one hostile row in the middle of its page, or, for an answer
    without rows, with the hostile value as a top-level field."""
    rows = data.pop("output", None)
    envelope = orjson.dumps(data)
    if not isinstance(rows, list):
        fields = _hostile_value(kind, faults)
        if kind in ("deep-row", "deep-row-object"):
            fields = b',"output":[' + _deep(faults.hostile_depth, kind.endswith("object")) + b"]"
        return envelope[:-1] + fields + b"}"
    encoded = [orjson.dumps(row) for row in rows]
    middle = len(encoded) // 2
    if kind in ("deep-row", "deep-row-object"):
        bad = _deep(faults.hostile_depth, kind.endswith("object"))
        if encoded:
            encoded[middle] = bad
        else:
            encoded.append(bad)
    elif encoded:
        encoded[middle] = encoded[middle][:-1] + _hostile_value(kind, faults) + b"}"
    else:
        encoded.append(b'{"response":""' + _hostile_value(kind, faults) + b"}")
    separator = b"," if len(envelope) > 2 else b""
    return envelope[:-1] + separator + b'"output":[' + b",".join(encoded) + b"]}"
