"""The traffic port's HTTP/1.1 protocol: uvicorn's httptools protocol with a bounded request head.

httptools buffers a request head of any size before the application sees it, so a
50 MiB header block sat in memory before the application's 431. This protocol
counts the bytes of each head as they arrive and answers 431 once they pass the
cap, and ends a connection whose head does not arrive within the header timeout:
otherwise connections that never finish a head would hold the concurrency cap
(`max_concurrency`, uvicorn's `limit_concurrency`) forever. Requests over that cap
get a 503 problem instead of uvicorn's plain-text one, and whatever the parser refuses
before the application sees it is a problem too, not a plain-text 400: CONNECT's
authority-form and a target with no path (`http://host`) are `target-invalid`, other
bad bytes `request-invalid`.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy import problems
from proxy.problems import Problem, target_invalid
from proxy.replay import http_date

Headers = list[tuple[bytes, bytes]]
# The application's renderer (`ProxyApp.render_problem`): the answer in its error format.
Render = Callable[[Problem, Headers | None], tuple[int, Headers, bytes]]


# Closing with request bytes still unread makes the kernel reset the connection, and a
# client still sending never reads the answer it was sent (a 413, a 431). So a refused
# request's remaining bytes are read and dropped first, up to this much and this long;
# past that the reset is the lesser evil.
DRAIN_BYTES = 4 * 1024 * 1024
DRAIN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What an application asks of the protocol (`ProxyApp.head_limits`)."""

    # Bytes of one request head on the wire: request line, header lines, framing.
    max_bytes: int = 2 * 32 * 1024 + 8192
    # Seconds from a connection's start (or a request's first byte) to the end of its head.
    timeout: float = 10.0


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request head bounded in bytes and time."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(self.app, "head_limits", None)
        if not isinstance(limits, HeadLimits):
            limits = HeadLimits()
        self._head_cap = limits.max_bytes
        self._head_timeout = limits.timeout
        self._metrics = getattr(self.app, "metrics", None)
        self._render: Render = getattr(self.app, "render_problem", None) or _render_problem
        self._in_head = True
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # After a chunk's size line and before its data: the last chunk's trailer fields
        # come here, and their bytes are counted against the head's cap.
        self._after_chunk_size = False
        self._trailer_bytes = 0
        # After a refusal: bytes still to drop before closing (None: not refused).
        self._drain_left: int | None = None
        self._drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._writes = OneSendPerTurn(transport, self.loop, self._close_unread)
        super().connection_made(self._writes)  # type: ignore[arg-type]
        self._start_head_timer()

    def on_response_complete(self) -> None:
        # The whole answer was written in this turn: it leaves now, in one send.
        self._writes.flush()
        cycle = self.cycle
        early = cycle is not None and cycle.more_body and not self.pipeline
        super().on_response_complete()
        if early and not self.transport.is_closing():
            # Answered before the request's body arrived (`OPTIONS *`, a 431): uvicorn
            # would time the connection again only at a new request, and every read cancels
            # its keep-alive timer, so a client trickling the body would keep it for ever.
            # The connection ends here, after the drain (`_close_unread`).
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._drain_left is not None:
            # Refused: what the client still sends is dropped unparsed, then the close.
            self._drain_left -= len(data)
            if self._drain_left <= 0:
                self._writes.close()
            return
        if not self._in_head:
            if not self._after_chunk_size:
                super().data_received(data)
                return
            # Possibly trailer fields, which the parser buffers: bounded like a head.
            self._trailer_bytes += len(data)
            super().data_received(data)
            if (
                self._after_chunk_size
                and self._trailer_bytes > self._head_cap
                and not self.transport.is_closing()
            ):
                self._refuse(
                    problems.headers_too_large("the request trailers exceed the limit"),
                    "headers_too_large",
                )
            return
        # Counted before parsing, judged after: the chunk that ends a head may carry
        # body bytes, which must not count against the head.
        self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self._head_cap and not self.transport.is_closing():
            self._refuse(
                problems.headers_too_large("the request head exceeds the limit"),
                "headers_too_large",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        if self._head_timer is None:
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._stop_head_timer()
        # Reads are counted as they come, but a head that arrives within one read (or
        # behind a pipelined request in one) was never judged: its own size, exactly.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._head_cap:
            self._refuse(
                problems.headers_too_large("the request head exceeds the limit"),
                "headers_too_large",
            )
            raise _Refused  # stops the parser: nothing more of this connection is read
        super().on_headers_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer field (after a chunked body): dropped, never merged into the headers
            # the application already holds. It comes after the body, past where the gateway
            # sets the tenant header and strips the client's, so as a header it could name
            # another tenant or reach the backend as anything (RFC 9110 6.5.1).
            return
        super().on_header(name, value)

    def on_chunk_header(self) -> None:
        self._after_chunk_size = True
        self._trailer_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._after_chunk_size = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        # What follows on this connection is the next request's head.
        self._in_head = True
        self._after_chunk_size = False
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable:
            app = self._overloaded
        super()._start_asgi_task(cycle, app)

    async def _overloaded(self, scope: Any, receive: Any, send: Any) -> None:
        status, headers, body = self._render(problems.overloaded(), scope["headers"])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._count("overloaded")

    def send_400_response(self, msg: str) -> None:
        """Whatever the parser refused (bad bytes, a target the server cannot split into a
        path, such as `http://host` without one) is a problem, not plain text."""
        if self.transport.is_closing():  # refused already (_Refused)
            return
        if self._method() == b"CONNECT" or (self.url and not self.url.startswith(b"/")):
            self._refuse(target_invalid(), "target_invalid")
            return
        self._refuse(
            problems.request_invalid(),
            "request_invalid",
        )

    def _method(self) -> bytes | None:
        try:
            method: bytes = self.parser.get_method()
        except Exception:  # nothing parsed yet
            return None
        return method

    # -- the head's bounds -----------------------------------------------------------

    def _start_head_timer(self) -> None:
        if self._head_timeout > 0:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0 or self._busy():
            # An idle connection (or one whose earlier answer is still being written):
            # there is nothing to answer, only a slot to free.
            self.transport.close()
            return
        self._refuse(
            problems.header_timeout(),
            "header_timeout",
        )

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _refuse(self, problem: Problem, outcome: str) -> None:
        """Answer from the protocol (no application call was made for this head) and close."""
        self._stop_head_timer()
        if not self._busy():
            status, headers, body = self._render(problem, None)
            lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
            lines += [name + b": " + value + b"\r\n" for name, value in headers]
            lines.append(b"connection: close\r\n\r\n")
            if self._method() == b"HEAD":
                body = b""  # the answer to HEAD has its headers only
            self.transport.write(b"".join(lines) + body)
        self._in_head = False
        self._close_after_drain()
        self._count(outcome)

    def _close_unread(self) -> bool:
        """uvicorn closes the connection after an answer that says `Connection: close`. If
        that answer came before the request's body was read (503 `overloaded`, a 413), the
        close drains first; True: it took the close."""
        if self._drain_left is not None or self.cycle is None or not self.cycle.more_body:
            return False
        self._close_after_drain()
        return True

    def _close_after_drain(self) -> None:
        """End the connection without losing the answer just written: send it and the end
        of the stream, drop what the client still sends (DRAIN_BYTES, DRAIN_SECONDS), and
        close when the client closes its side or a bound is reached."""
        if not self._writes.close_write():
            return  # closed at once: the transport cannot half-close (TLS)
        self._drain_left = DRAIN_BYTES
        self._drain_timer = self.loop.call_later(DRAIN_SECONDS, self._writes.close)
        self._writes.resume_reading()  # reads paused for a body would never drain

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.count("-", outcome)


class OneSendPerTurn:
    """The connection's transport, with the writes made in one turn of the event loop sent
    together.

    uvicorn writes an answer's head and its body apart: two sends (system calls) per
    answer. Here writes are held and leave in one send when the answer is complete
    (`on_response_complete`), at the end of the loop's turn (a streamed answer's first
    chunk, a `100 Continue`), or before the connection closes, whichever comes first.
    On the replay path, where the send is most of the work, that was about 16 µs less
    CPU per answer (docs/benchmarks.md).
    """

    __slots__ = ("_held", "_loop", "_transport", "_unread", "_write_closed")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        unread: Callable[[], bool] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        # Asked on close: True when it takes the close over (request bytes still to drain).
        self._unread = unread
        self._held: list[bytes] | None = None
        self._write_closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._write_closed:
            return  # after the end of the stream (close_write) nothing more is sent
        if self._held is None:
            self._held = [bytes(data)]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(bytes(data))

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        if self._unread is not None and self._unread():
            return
        self.flush()
        self._transport.close()

    def close_write(self) -> bool:
        """Send what is held and then the end of the stream, keeping the reading side open;
        closes at once (False) where the transport cannot half-close. Either way the
        connection counts as closing from here on: nothing more is written to it."""
        self.flush()
        self._write_closed = True
        if self._transport.is_closing():
            return False
        if not self._transport.can_write_eof():
            self._transport.close()
            return False
        self._transport.write_eof()
        return True

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._write_closed or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        # get_extra_info, pause_reading, resume_reading...: the transport's own.
        return getattr(self._transport, name)


class _Refused(Exception):
    """Raised from a parser callback after the protocol answered: the parser stops there."""


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _render_problem(problem: Problem, headers: Headers | None) -> tuple[int, Headers, bytes]:
    """Plain problem+json, for an application without a renderer of its own (admin)."""
    body = problem.body()
    out = problem.headers(http_date())
    out.append((b"content-length", str(len(body)).encode("ascii")))
    return problem.status, out, body
