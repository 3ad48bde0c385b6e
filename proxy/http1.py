"""The proxy's own HTTP/1.1 client for the backend: one request, one connection, no magic.

Why not only aiohttp: on the miss path aiohttp's request and response objects, payload
registry, URL handling and timers were about a third of the proxy's CPU per request
(docs/benchmarks.md). The proxy needs much less: one fixed origin, whole request bodies,
byte-exact targets, a keep-alive pool, and an exact line between "nothing was sent" and
"the backend may have acted". This client is that and no more. Parsing is httptools
(llhttp, the parser uvicorn serves with); framing, pooling and deadlines are here.

What it never does: re-send a request (a pooled connection that turns out closed after the
request was written is `OutcomeUnknown("reset")`), follow redirects, decode bodies, or
send a request body that is not whole bytes (pass-through streams go through aiohttp).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import cast

import httptools

from proxy.config import UpstreamPool
from proxy.upstream import (
    Headers,
    NotSent,
    OutcomeUnknown,
    PoolSettings,
    UpstreamResponse,
    split_target,
    with_authorization,
)

# A backend that sends more header bytes than this is broken or hostile: the exchange
# is a protocol error, not an unbounded buffer. It bounds the head (with any 1xx heads
# before it) and the trailer section, each counted on the wire while it arrives.
MAX_RESPONSE_HEAD_BYTES = 64 * 1024
# While a long answer streams to the client, read no further ahead than this.
STREAM_HIGH_WATER = 256 * 1024

# Methods whose requests carry a Content-Length even when empty (RFC 9110 §8.6: a client
# should not send one for a method that does not anticipate content).
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Answers without a body whatever their headers say (RFC 9112 §6.3).
_NO_BODY_STATUSES = frozenset({204, 304})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Bytes that would end the request line early or split it.
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")


class _Failure(Exception):
    """Why an exchange ended without a whole answer: timeout | reset | protocol."""


class _Connection(asyncio.Protocol):
    """One connection to the backend and the state of the answer it is reading.

    The parser's callbacks fill the answer; the request's coroutine waits on `_waiter`,
    which every callback that changes the picture wakes.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Holds one of the pool's slots (from checkout until release or discard).
        self.leased = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # made by loop.create_connection
        # Counts the requests this connection carried: a response's late `close()` must
        # only ever end its own exchange, not a later one on the same connection.
        self.exchange = 0
        self.begin(head=False)

    def begin(self, *, head: bool) -> None:
        """Forget the last answer: the connection is about to carry a new request."""
        self.exchange += 1
        self.status = 0
        self.headers: Headers = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.headers_done = False
        self.done = False
        self.failure: str | None = None
        # Body bytes the caller waits for past the head (None: the whole answer).
        self.wanted: int | None = None
        self.reusable = True
        self._head = head
        self._head_bytes = 0
        # Wire bytes read while a header section (head or trailers) was open: httptools
        # buffers a header line until it ends, so one that never ends is cut by this.
        self._section_bytes = 0
        self._in_trailers = False
        # Whether the head framed the body (Content-Length or Transfer-Encoding).
        self._framed = False
        self._until_eof = False
        self._informational = False
        # Set once the answer streams to the client: from then on read no further ahead
        # than STREAM_HIGH_WATER (before, the caller's read limit bounds the buffer).
        self.streaming = False
        self._paused = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.done or self.failure is not None:
            # Bytes nobody asked for (after an answer ended): the connection is out of step.
            self.reusable = False
            self.abort()
            return
        # Counted before parsing, judged after: the read that ends a section may carry
        # body bytes, which do not count against it.
        if not self.headers_done or self._in_trailers:
            self._section_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # The parser stays stopped after an error: the connection can carry nothing
            # more, also when the answer was whole before it (stray bytes after it).
            self.reusable = False
            self._fail("protocol")
            return
        if (
            not self.headers_done or self._in_trailers
        ) and self._section_bytes > MAX_RESPONSE_HEAD_BYTES:
            self.reusable = False
            self._fail("protocol")

    def eof_received(self) -> bool:
        if self._until_eof and self.headers_done and not self.done:
            self.done = True  # a body delimited by the end of the connection
        self.reusable = False
        self.closed = True
        self._fail("reset")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._fail("reset")

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # Bytes after the whole answer, in the same read (a body longer than its
            # Content-Length, an answer nobody asked for): read on, they would become this
            # answer's status and headers, or the start of the next request's answer.
            raise _Failure("protocol")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise _Failure("protocol")  # surfaces as HttpParserCallbackError
        if self.headers_done:
            # A trailer field, after a chunked body: dropped, never merged into the head
            # the caller may already have answered with (RFC 9110 6.5.1).
            return
        name = name.lower()
        if name in _FRAMING:
            self._framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise _Failure("protocol")  # nobody asked to switch protocols
            # 103 Early Hints and the like: a message of its own, then the real answer.
            self._informational = True
            self.headers = []
            self._head_bytes = 0
            self._framed = False
            return
        self.status = status
        self.headers_done = True
        if not self._parser.should_keep_alive():
            self.reusable = False
        if self._head:
            # The answer to HEAD has no body, whatever its Content-Length says; the parser
            # cannot be told, so the exchange ends here and the connection is not reused.
            self.done = True
            self.reusable = False
            self._wake()
        elif status not in _NO_BODY_STATUSES and not self._framed:
            self._until_eof = True
            self.reusable = False
        # No wake-up for the head alone: the caller waits for body bytes or the end (a
        # backend that writes head and body apart would otherwise wake it twice).

    def on_chunk_header(self) -> None:
        # Trailer fields may follow (after the last chunk's size line) until body bytes do.
        self._in_trailers = True
        self._section_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._in_trailers = False
        if self.done:
            return
        self.chunks.append(body)
        self.size += len(body)
        if (
            self.streaming
            and self.size > STREAM_HIGH_WATER
            and not self._paused
            and self.transport is not None
        ):
            self._paused = True
            self.transport.pause_reading()
        # Wake the caller only once it has what it waits for: bytes past its read limit,
        # or (streaming) any bytes at all.
        if self.streaming or (self.wanted is not None and self.size > self.wanted):
            self._wake()

    def on_message_complete(self) -> None:
        self._in_trailers = False
        if self._informational:
            self._informational = False
            return
        self.done = True
        self._wake()

    # -- the request's side ----------------------------------------------------------

    def take_body(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def changed(self) -> None:
        """Wait until a callback changes the answer's state (or `expire` is called)."""
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def time(self) -> float:
        return self._loop.time()

    def expire(self) -> None:
        """The exchange's deadline passed."""
        self.reusable = False
        self._fail("timeout")

    def _fail(self, reason: str) -> None:
        if not self.done and self.failure is None:
            self.failure = reason
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


class Http1Upstream(PoolSettings):
    """Sends each request once on a pooled keep-alive connection to the fixed upstream."""

    def __init__(self, base_url: str, pool: UpstreamPool, *, passthrough: bool = False) -> None:
        super().__init__(base_url, pool, passthrough=passthrough)
        upstream = self.upstream
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if upstream.scheme == "https" else None
        )
        self._host_line = b"host: " + _host_value(upstream.host, upstream.port, upstream.scheme)
        self._prefix = upstream.prefix.encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(self._max_connections)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        # Connections are made on demand; the loop is looked up once, not per request.
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().abort()

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes],
        *,
        timeout: float,
        read_limit: int | None,
    ) -> UpstreamResponse:
        if not isinstance(body, bytes):
            raise TypeError("the built-in client sends whole bodies only")
        split_target(target)
        request = self._serialise(method, target, headers, body)
        loop = self._loop or asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._acquire_slot(deadline)
        try:
            connection = await self._connection(deadline)
        except BaseException:
            self._slots.release()
            raise
        connection.leased = True
        # From here on bytes may reach the backend: every failure is OutcomeUnknown.
        connection.begin(head=method == "HEAD")
        connection.wanted = read_limit
        assert connection.transport is not None
        connection.transport.write(request)
        timer = loop.call_at(deadline, connection.expire)
        try:
            while not (
                connection.done
                or (
                    connection.headers_done
                    and read_limit is not None
                    and connection.size > read_limit
                )
            ):
                if connection.failure is not None:
                    raise OutcomeUnknown(connection.failure)
                await connection.changed()
        except BaseException:
            # A failure, or a held exchange abandoned (proxy.outcome): this connection is
            # in an unknown state, so it is closed, never reused.
            self._discard(connection)
            raise
        finally:
            timer.cancel()
        data = connection.take_body()
        if connection.done:
            self._release(connection)
            return UpstreamResponse(connection.status, connection.headers, data)
        connection.streaming = True
        exchange = connection.exchange
        return UpstreamResponse(
            connection.status,
            connection.headers,
            data,
            complete=False,
            rest=self._rest(connection, timeout),
            # Called by the app after the client got its last byte; the stream may have
            # given the connection back, and another request taken it, long before.
            _release=lambda: self._discard(connection, exchange),
        )

    def _serialise(self, method: str, target: str, headers: Headers, body: bytes) -> bytes:
        lines = [
            name + b": " + value + b"\r\n"
            for name, value in with_authorization(headers, self.upstream.authorization)
        ]
        if body or method in _BODY_METHODS:
            lines.append(b"content-length: %d\r\n" % len(body))
        block = b"".join(lines)
        # One CR and one LF per line, no NUL: a value that smuggles a line break would
        # let a client write headers (or a second request) of its own.
        if block.count(b"\n") != len(lines) or block.count(b"\r") != len(lines) or b"\0" in block:
            raise NotSent("header-invalid")
        if _UNSAFE_TARGET.search(target):  # the parser never lets one through; kept honest
            raise NotSent("target-invalid")
        start = b"%s %s%s HTTP/1.1\r\n" % (
            method.encode("ascii"),
            self._prefix,
            target.encode("latin-1"),
        )
        return b"".join((start, self._host_line, block, b"\r\n", body))

    async def _acquire_slot(self, deadline: float) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            # Waited for a connection that never came free: nothing left the proxy.
            raise NotSent("pool-timeout") from None

    async def _connection(self, deadline: float) -> _Connection:
        """An idle connection still open and fresh, else a new one."""
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            connection = self._idle.pop()
            transport = connection.transport
            if (
                not connection.closed
                and transport is not None
                and not transport.is_closing()
                and now - connection.idle_since < self._keepalive
            ):
                return connection
            connection.abort()
        if self._closed:
            raise NotSent("client-closed")
        upstream = self.upstream
        try:
            async with asyncio.timeout_at(min(deadline, now + self._connect_timeout)):
                _, protocol = await loop.create_connection(
                    _Connection,
                    upstream.host,
                    upstream.port,
                    ssl=self._ssl,
                    server_hostname=upstream.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise NotSent("connect-timeout") from None
        except OSError as exc:  # refused, unreachable, name unknown, TLS handshake
            raise NotSent(type(exc).__name__) from exc
        return protocol

    def _release(self, connection: _Connection) -> None:
        """The answer was read to its end: keep the connection for the next request."""
        if not connection.leased:
            return
        connection.leased = False
        if connection.reusable and not connection.closed and not self._closed:
            connection.idle_since = connection.time()
            self._idle.append(connection)
        else:
            connection.abort()
        self._slots.release()

    def _discard(self, connection: _Connection, exchange: int | None = None) -> None:
        """Close a connection whose exchange did not end cleanly (or whose long answer the
        client stopped reading). Safe to call more than once: the slot comes free once.
        `exchange`: only while the connection still carries that one."""
        if not connection.leased or exchange not in (None, connection.exchange):
            return
        connection.leased = False
        connection.abort()
        self._slots.release()

    async def _rest(self, connection: _Connection, silence: float) -> AsyncIterator[bytes]:
        """The rest of a long answer as it arrives; a backend silent for `silence` seconds,
        or one that breaks off, ends it with OutcomeUnknown."""
        loop = asyncio.get_running_loop()
        while True:
            if connection.chunks:
                yield connection.take_body()
                continue
            if connection.done:
                self._release(connection)
                return
            if connection.failure is not None:
                self._discard(connection)
                raise OutcomeUnknown(connection.failure)
            timer = loop.call_later(silence, connection.expire)
            try:
                await connection.changed()
            finally:
                timer.cancel()


def _host_value(host: str, port: int, scheme: str) -> bytes:
    """The Host header's value and line end: the name in its ASCII (IDNA) form, brackets
    around an IPv6 address, the port unless it is the scheme's default."""
    name = f"[{host}]" if ":" in host else host.encode("idna").decode("ascii")
    default = 443 if scheme == "https" else 80
    value = name if port == default else f"{name}:{port}"
    return value.encode("ascii") + b"\r\n"
