"""The traffic port's HTTP/1.1 protocol: uvicorn's httptools protocol with a bounded request head.

httptools buffers a request head of any size before the application sees it, so a
50 MiB header block sat in memory before the application's 431. This protocol
counts the bytes of each head as they arrive and answers 431 once they pass the
cap, and ends a connection whose head does not arrive within the header timeout:
otherwise connections that never finish a head would hold the concurrency cap
(`max_concurrency`, uvicorn's `limit_concurrency`) forever. Requests over that cap
get a 503 problem instead of uvicorn's plain-text one, and CONNECT's authority-form
target, which the parser refuses before the application sees it, gets the proxy's
`target-invalid` problem instead of a plain-text 400.
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

from proxy.problems import Problem, target_invalid
from proxy.replay import http_date

Headers = list[tuple[bytes, bytes]]
# The application's renderer (`ProxyApp.render_problem`): the answer in its error format.
Render = Callable[[Problem, Headers | None], tuple[int, Headers, bytes]]


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """What an application asks of the protocol (`ProxyApp.head_limits`)."""

    # Bytes of one request head on the wire: request line, header lines, framing.
    max_bytes: int = 2 * 32 * 1024 + 8192
    # Seconds from a connection's start (or a request's first byte) to the end of its head.
    timeout: float = 10.0


def overloaded() -> Problem:
    return Problem(
        "overloaded",
        503,
        "the proxy is at its concurrency limit; nothing was sent, it is safe to retry",
        retry_after=1,
        close=True,
    )


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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        # Counted before parsing, judged after: the chunk that ends a head may carry
        # body bytes, which must not count against the head.
        self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self._head_cap and not self.transport.is_closing():
            self._refuse(
                Problem("headers-too-large", 431, "the request head exceeds the limit"),
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
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # What follows on this connection is the next request's head.
        self._in_head = True
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if app is service_unavailable:
            app = self._overloaded
        super()._start_asgi_task(cycle, app)

    async def _overloaded(self, scope: Any, receive: Any, send: Any) -> None:
        status, headers, body = self._render(overloaded(), scope["headers"])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._count("overloaded")

    def send_400_response(self, msg: str) -> None:
        try:
            connect = self.parser.get_method() == b"CONNECT"
        except Exception:  # nothing parsed yet
            connect = False
        if not connect:
            super().send_400_response(msg)
            return
        self._refuse(target_invalid(), "target_invalid")

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
            Problem("header-timeout", 408, "the request headers were not received in time"),
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
            self.transport.write(b"".join(lines) + body)
        self.transport.close()
        # Closing stops the reads: nothing more of this connection is parsed.
        self._in_head = False
        self._count(outcome)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.count("-", outcome)


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
