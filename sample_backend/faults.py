"""Failure injection: the ways a real payment backend misbehaves, on demand per request.

Each fault is chosen by a query parameter or by an ``X-Sample-*`` request header; the header wins,
so a test can steer a request through a proxy that rewrites or forwards query strings.

=================  ========================  ==================================================
query parameter    header                    effect
=================  ========================  ==================================================
``delay``          ``X-Sample-Delay``        seconds to sleep after the work is done, before
                                             answering (replaces the server's default delay)
``delay_before``   ``X-Sample-Delay-Before`` seconds to sleep before doing anything
``status``         ``X-Sample-Status``       do the work, then answer with this status
``reject``         ``X-Sample-Reject``       answer with this status without doing the work
``drop``           ``X-Sample-Drop``         ``before``: close the connection without doing the
                                             work; ``after``: do the work, then close it; either
                                             way not one response byte is sent
``gzip``           ``X-Sample-Gzip``         ``1``: gzip the body, ``Content-Encoding: gzip``
=================  ========================  ==================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

RAW_SEND_KEY = "sample_backend.raw_send"
"""Scope key holding the server's own ``send`` callable, which leads to the TCP transport."""

MAX_DELAY = 3600.0
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_NO_BODY_STATUSES = frozenset({204, 304})

DropWhen = Literal["before", "after"]


class FaultError(ValueError):
    """A fault parameter could not be understood; answered with 400 before any work."""


def error_response(status: int, code: str, message: str) -> Response:
    """Return the JSON error shape every endpoint of the sample backend uses."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json")


def _lookup(request: Request, name: str, header: str) -> str | None:
    """Return the header's value, else the query parameter's; empty means absent."""
    value = request.headers.get(header, "").strip() or request.query_params.get(name, "").strip()
    return value or None


def _seconds(name: str, raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise FaultError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_DELAY:
        raise FaultError(f"{name} must be between 0 and {MAX_DELAY:g} seconds, got {raw!r}")
    return value


def _status(name: str, raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise FaultError(f"{name} must be an HTTP status code, got {raw!r}") from None
    if not 200 <= value <= 599:
        raise FaultError(f"{name} must be between 200 and 599, got {raw!r}")
    return value


def _drop(raw: str | None) -> DropWhen | None:
    if raw is None or raw == "":
        return None
    value = raw.lower()
    if value == "before":
        return "before"
    if value == "after":
        return "after"
    raise FaultError(f"drop must be 'before' or 'after', got {raw!r}")


def _flag(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    value = raw.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise FaultError(f"{name} must be 1 or 0, got {raw!r}")


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults requested for one request; the default is a well-behaved backend."""

    delay: float = 0.0
    delay_before: float = 0.0
    status: int | None = None
    reject: int | None = None
    drop: DropWhen | None = None
    gzip: bool = False

    @classmethod
    def from_request(cls, request: Request, *, default_delay: float = 0.0) -> Faults:
        """Read the faults from headers and query; raise FaultError on nonsense values."""
        return cls(
            delay=_seconds("delay", _lookup(request, "delay", "x-sample-delay"), default_delay),
            delay_before=_seconds(
                "delay_before", _lookup(request, "delay_before", "x-sample-delay-before"), 0.0
            ),
            status=_status("status", _lookup(request, "status", "x-sample-status")),
            reject=_status("reject", _lookup(request, "reject", "x-sample-reject")),
            drop=_drop(_lookup(request, "drop", "x-sample-drop")),
            gzip=_flag("gzip", _lookup(request, "gzip", "x-sample-gzip")),
        )

    async def before_work(self) -> Response | None:
        """Apply the faults that act before the work; a response means: skip the work."""
        if self.delay_before:
            await asyncio.sleep(self.delay_before)
        if self.reject is not None:
            return self.rejection()
        if self.drop == "before":
            return DropConnection()
        return None

    async def after_work(self) -> Response | None:
        """Apply the faults that act once the work is committed; a response replaces the answer."""
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.drop == "after":
            return DropConnection()
        return None

    def rejection(self) -> Response:
        """Return the JSON error for ``reject``, with ``Retry-After`` where clients expect one."""
        status = self.reject if self.reject is not None else 503
        response = error_response(status, "rejected", f"rejected on request (status {status})")
        if status in _RETRY_AFTER_STATUSES:
            response.headers["Retry-After"] = "1"
        return response

    def respond(
        self, content: bytes, status: int, headers: Mapping[str, str], content_type: str
    ) -> Response:
        """Build the final answer, applying the ``status`` and ``gzip`` faults."""
        status = self.status if self.status is not None else status
        out = dict(headers)
        if status in _NO_BODY_STATUSES:
            content = b""
        else:
            out["content-type"] = content_type
            if self.gzip:
                content = gzip.compress(content, compresslevel=6, mtime=0)
                out["content-encoding"] = "gzip"
                out["vary"] = "Accept-Encoding"
                if "etag" in out:  # a different representation needs a different tag
                    out["etag"] = out["etag"].removesuffix('"') + '-gzip"'
        return Response(content, status_code=status, headers=out)


class DropConnection(Response):
    """A 'response' that closes the TCP connection without sending a single byte.

    Simulates a backend that crashes or a network that fails: the client cannot tell whether
    the work happened. Under uvicorn, the server's ``send`` is a bound method of its
    request/response cycle, whose ``transport`` is aborted directly. Elsewhere (another server,
    an in-process ASGI transport) it falls back to starting a response and raising mid-body,
    which at least makes the client see a broken response.
    """

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = _transport_of(scope.get(RAW_SEND_KEY))
        if transport is None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-length", b"1024")],
                }
            )
            await send({"type": "http.response.body", "body": b"dropped", "more_body": True})
            raise ConnectionAbortedError("sample backend dropped the connection on request")
        transport.abort()
        # Wait until the server has noticed, so that it does not send a 500 for us.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while (await receive())["type"] != "http.disconnect":
                    pass


def _transport_of(raw_send: object) -> Any | None:
    cycle = getattr(raw_send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    return transport if callable(getattr(transport, "abort", None)) else None
