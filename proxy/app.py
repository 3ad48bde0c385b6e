"""ASGI wiring: lifespan (store, upstream pool), route matching, and pass-through streaming.

The hot path is a plain ASGI callable: no middleware stack, no per-request
work that can be done once at start-up. Longer than the other modules for that reason:
what a framework would hold (the head checks, reading the body bounded in size and time,
pass-through streaming both ways, writing the reply) is raw ASGI here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive, Scope, Send

from proxy import logs, problems
from proxy.config import Settings, redact_url
from proxy.errorformat import REQUEST_ID
from proxy.forwarding import Reply, forward_unrecorded, outgoing_headers, problem_reply, raw_target
from proxy.keys import KeyHasher
from proxy.lifecycle import Lifecycle
from proxy.metrics import Metrics
from proxy.problems import Problem
from proxy.protocol import HeadLimits
from proxy.replay import ReplayCache, http_date
from proxy.request import ProxyRequest
from proxy.routes import RouteTable
from proxy.safety import check_store
from proxy.store import Store, StoreUnavailable, open_store
from proxy.tracing import Tracing
from proxy.upstream import make_upstream

logger = logging.getLogger("idempotency_proxy")

SHUTDOWN_GRACE_SECONDS = 30.0
# How long recording abandoned late answers as UNKNOWN may take at shutdown.
ABANDON_SECONDS = 5.0


# A client's X-Request-Id is kept when it is 1 to 128 printable ASCII characters; anything
# else (control bytes, non-ASCII, a novel) would corrupt log lines, so it is replaced.
MAX_REQUEST_ID = 128
_PRINTABLE = re.compile(rb"[\x20-\x7e]+")
# Generated ids: unique, not secret, so a random per-process prefix and a counter.
_RID_PREFIX = secrets.token_hex(6)
_rid_counter = itertools.count(1)


class ProxyApp:
    """The traffic port's ASGI application."""

    def __init__(
        self, settings: Settings, store: Store | None = None, tracing: Tracing | None = None
    ) -> None:
        if not settings.upstream:
            raise ValueError("an upstream URL is required")
        self.settings = settings
        self.routes = RouteTable(settings)
        self.metrics = Metrics()
        self.store: Store = store or open_store(
            settings.store,
            # After a data loss, fail closed until every request that may have been
            # in flight has finished, timed out, or given up waiting for its late answer.
            safe_mode_seconds=max(
                r.policy.lease + r.policy.upstream_timeout + r.policy.outcome_wait
                for r in self.routes.routes
            ),
        )
        self._owns_store = store is None
        self.upstream = make_upstream(settings.upstream, settings.upstream_pool)
        # Pass-through traffic has a pool of its own: slow uploads to unprotected paths
        # must not take the connections that protected routes need.
        self.passthrough_upstream = make_upstream(
            settings.upstream, settings.upstream_pool, passthrough=True
        )
        self.lifecycle = Lifecycle(
            self.store,
            self.upstream,
            self.metrics,
            tenant_header=settings.tenant.header,
            cache=ReplayCache(
                settings.store.replay_cache_entries,
                settings.store.replay_cache_bytes,
                settings.store.replay_cache_ttl,
            ),
            date=http_date,
            hasher=KeyHasher(settings.key_hash_secret),
            tracing=tracing,
            max_held_exchanges=settings.upstream_pool.max_held_exchanges,
            wake_waiters=settings.store.wake_waiters,
        )
        self.tracing = tracing
        self.metrics.health.attach(self.store, self.lifecycle.cache)
        self.ready = False
        self.draining = False
        self._max_header_bytes = settings.max_header_bytes
        # Read by the traffic port's protocol (proxy/protocol.py) for every connection. The
        # wire also carries the request line and each line's framing, hence the slack.
        self.head_limits = HeadLimits(
            max_bytes=2 * settings.max_header_bytes + 8192,
            timeout=settings.header_read_timeout,
        )
        self._passthrough_timeout = settings.defaults.upstream_timeout
        self._passthrough_read_time = settings.defaults.max_body_read_time

    def render_problem(
        self, problem: Problem, headers: list[tuple[bytes, bytes]] | None = None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """An answer the protocol makes before any route is known (a head over its cap or
        its deadline, the concurrency cap), in the default error format, with a request id."""
        reply = problem_reply(problem, "", http_date())
        status, out, rendered = self.routes.default_error_format.render(
            problem, reply.headers, _request_id(headers or [])
        )
        return status, out, reply.body if rendered is None else rendered

    # -- ASGI ------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)
        else:  # websockets are not proxied
            await send({"type": "websocket.close", "code": 1003})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # one line, not a traceback
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        try:
            await self.store.start()
        except StoreUnavailable as exc:
            # Fail closed per request rather than crash-loop: readiness and 503s tell the story.
            logger.error("store unavailable at start-up", extra={"reason": str(exc)})
        if self.store.name == "memory":
            logger.warning(
                "using the in-process memory store: records are NOT shared between replicas "
                "and are lost on restart; set --redis-url for more than one replica"
            )
        else:
            await check_store(self.store, self.settings)
        if not self.settings.key_hash_secret:
            logger.warning(
                "key_hash_secret is not set: the key_hash in the logs is an unkeyed hash, "
                "and a guessable key (an order id) can be recovered from one log line; set "
                "key_hash_secret or key_hash_secret_file, or their environment variables "
                "(docs/security.md)"
            )
        await self.upstream.start()
        await self.passthrough_upstream.start()
        self.ready = True
        logger.info(
            "proxy started",
            extra={
                "upstream": redact_url(self.settings.upstream or ""),
                "listen": f"{self.settings.listen.host}:{self.settings.listen.port}",
                "admin": (
                    f"{self.settings.admin.host}:{self.settings.admin.port}"
                    if self.settings.admin.enabled and self.settings.workers == 1
                    else None
                ),
                "store": self.store.name,
                "routes": [route.name for route in self.routes.routes],
            },
        )

    async def shutdown(self) -> None:
        """Let forwards and completions that are still running finish, then close."""
        self.draining = True
        self.lifecycle.checker.stop()
        pending = set(self.lifecycle.tasks)
        if pending:
            logger.info("waiting for in-flight requests", extra={"count": len(pending)})
        deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        # Until none is left: an owner that finishes starts its completion as a new task.
        while pending and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(pending, timeout=left)
            pending = set(self.lifecycle.tasks)
        # Exchanges still waiting for a late answer after the grace period: their records
        # turn UNKNOWN now (they were sent, so never released) rather than by lease expiry.
        abandoned = self.lifecycle.late.abandon()
        if abandoned:
            logger.warning("abandoning late answers at shutdown", extra={"count": abandoned})
            await asyncio.wait(set(self.lifecycle.tasks), timeout=ABANDON_SECONDS)
        await self.upstream.close()
        await self.passthrough_upstream.close()
        if self._owns_store:
            await self.store.close()
        if self.tracing is not None:
            # Flushes the spans still queued; an exporter may block on its network.
            await asyncio.to_thread(self.tracing.shutdown)

    # -- one request -----------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        path: str = scope["path"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        route_name = "-"
        request_id = _request_id(headers)
        error_format = self.routes.default_error_format
        try:
            if sum(len(k) + len(v) for k, v in headers) > self._max_header_bytes:
                raise problems.headers_too_large("the request headers exceed the limit")
            raw_path: bytes = scope.get("raw_path") or path.encode("latin-1")
            if not raw_path.startswith(b"/") or method == "CONNECT":
                reply = _not_origin_form(method, raw_path)
            elif (match := self.routes.match(method, path)) is None:
                reply = await self.passthrough(scope, receive, request_id)
            else:
                route, params = match
                route_name = route.name
                error_format = route.error_format
                body = await _read_body(
                    receive,
                    headers,
                    route.policy.max_request_body,
                    route.policy.max_body_read_time,
                )
                request = ProxyRequest(
                    method=method,
                    path=path,
                    raw_path=raw_path,
                    query_string=scope.get("query_string", b""),
                    headers=headers,
                    body=body,
                    client=_client(scope),
                    scheme=scope.get("scheme", "http"),
                    request_id=request_id,
                )
                reply = await self.lifecycle.handle(request, route, params)
        except Problem as problem:
            reply = problem_reply(problem, problem.name.replace("-", "_"), http_date())
        if reply.problem is not None:
            # The proxy's own answer, in the route's format, always with the request id.
            reply.status, reply.headers, rendered = error_format.render(
                reply.problem, reply.headers, request_id
            )
            if rendered is not None:
                reply.body = rendered
        elif reply.outcome in ("replayed", "options"):
            # The current request's id (a replay's original was never stored); `OPTIONS *`
            # is the proxy's own answer too.
            reply.headers.append((REQUEST_ID, request_id))
        await _send_reply(send, reply)
        self.metrics.count(route_name, reply.outcome)
        # An answer nobody knows the outcome of needs an operator: warning, not info.
        level = logging.WARNING if reply.outcome == "outcome_unknown" else logging.INFO
        if logs.access.isEnabledFor(level):
            logs.access.log(
                level,
                "request",
                extra={
                    "request_id": request_id.decode("ascii"),
                    "route": route_name,
                    "method": method,
                    "outcome": reply.outcome,
                    "status": reply.status,
                    "key_hash": reply.scoped.log_hash if reply.scoped else None,
                    "upstream_ms": _round(reply.upstream_ms),
                    "store_ms": _round(reply.store_ms) if reply.store_ms else None,
                    "total_ms": _round((time.perf_counter() - started) * 1000),
                    **reply.extra,
                },
            )

    async def passthrough(self, scope: Scope, receive: Receive, request_id: bytes) -> Reply:
        """Traffic no route protects: streamed both ways, no record, no replay header."""
        target = raw_target(
            scope.get("raw_path") or b"", scope["path"], scope.get("query_string", b"")
        )
        framing = [(k, v) for k, v in scope["headers"] if k == b"content-length"]
        has_body = bool(framing) or any(k == b"transfer-encoding" for k, _ in scope["headers"])
        read = _BodyRead(self._passthrough_read_time)
        body: bytes | AsyncIterator[bytes] = _stream_body(receive, read) if has_body else b""
        # A streamed body keeps its declared length: some legacy backends refuse chunked
        # requests, and the client's framing is not the proxy's to change.
        forward = outgoing_headers(
            scope["headers"],
            _client(scope),
            scope.get("scheme", "http"),
            _host(scope["headers"]),
            request_id,
        )
        forward += framing[:1]
        reply = await forward_unrecorded(
            self.passthrough_upstream,
            scope["method"],
            target,
            forward,
            body,
            timeout=self._passthrough_timeout,
            outcome="passthrough",
        )
        if read.timed_out:
            # The backend got part of the body and no end: the upload was aborted.
            if reply.close is not None:
                reply.close()
            raise problems.body_timeout()
        return reply


async def _read_body(
    receive: Receive, headers: list[tuple[bytes, bytes]], limit: int, read_time: float
) -> bytes:
    """The whole request body, refused (413) as soon as it passes `limit`, before any claim,
    and (408) when it takes longer than `read_time` seconds (0: no limit) to arrive."""
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise problems.body_invalid("Content-Length is not a number") from None
            if declared > limit:
                # Answered at once, without reading (and so without asking for the body
                # with a 100 Continue): the traffic port drains what still comes before it
                # closes (proxy/protocol.py), so the client reads the 413.
                raise problems.body_too_large()
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(read_time or None):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise problems.body_invalid("the client went away while sending the body")
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise problems.body_too_large()  # the rest is drained, as above
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise problems.body_timeout() from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _BodyAborted(Exception):
    """Raised into the upstream client so that it aborts the request instead of ending a
    body the client never finished (a chunked body would otherwise look complete)."""


class _BodyRead:
    """A streamed body's deadline, and whether it passed."""

    __slots__ = ("read_time", "timed_out")

    def __init__(self, read_time: float) -> None:
        self.read_time = read_time
        self.timed_out = False


async def _stream_body(receive: Receive, read: _BodyRead) -> AsyncIterator[bytes]:
    """The client's body as it arrives, within `read.read_time` seconds in all (0: no limit):
    a trickled upload must not hold an upstream connection for as long as it likes."""
    deadline = asyncio.get_running_loop().time() + read.read_time if read.read_time else None
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            read.timed_out = True
            raise _BodyAborted("body-timeout") from None
        if message["type"] == "http.disconnect":
            raise _BodyAborted("disconnect")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_reply(send: Send, reply: Reply) -> None:
    try:
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": reply.headers}
        )
        await send(
            {"type": "http.response.body", "body": reply.body, "more_body": reply.rest is not None}
        )
        if reply.rest is not None:
            while True:
                try:
                    chunk = await anext(reply.rest)
                except StopAsyncIteration:
                    break
                except Exception:
                    # The backend closed, reset or went silent (the upstream read timeout)
                    # in the middle of its body. The status went out already: closing the
                    # client's connection early is the only way left to say "incomplete".
                    # A protected answer was recorded before it streamed (docs/design.md).
                    reply.outcome = "upstream_cut"
                    _abort(send)
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        # The client hung up: the outcome is already recorded; the server closes.
        pass
    finally:
        if reply.close is not None:
            reply.close()


def _abort(send: Send) -> None:
    """Close the client's connection in the middle of a response.

    ASGI has no message for it. uvicorn closes the connection when the app returns with
    the response unfinished, but logs an error saying so; closing its transport here and
    marking the exchange disconnected (as a lost connection would) leaves the request's
    own log line as the only one.
    """
    cycle: Any = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return  # another server: it closes the connection when the app returns
    cycle.disconnected = True
    transport.close()


def _not_origin_form(method: str, raw_path: bytes) -> Reply:
    """Only a path and query ever travel upstream; absolute-form reaches the app as its path
    already. `OPTIONS *` asks about the server itself, so the proxy answers it; any other
    asterisk-form, and CONNECT's authority-form, would name no path or another host."""
    if raw_path == b"*" and method == "OPTIONS":
        return Reply(204, [(b"date", http_date())], outcome="options")
    raise problems.target_invalid()


def _request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-Id (its first line) when valid, else a generated one."""
    for name, value in headers:
        if name == b"x-request-id":
            if len(value) <= MAX_REQUEST_ID and _PRINTABLE.fullmatch(value):
                return value
            break
    return f"{_RID_PREFIX}-{next(_rid_counter):x}".encode("ascii")


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _host(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"host":
            return value
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
