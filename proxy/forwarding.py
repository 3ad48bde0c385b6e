"""Sending a request on and the reply every path answers with.

`Reply` is what the ASGI layer writes back; `forward_unrecorded` sends once with no record
(pass-through traffic, an absent optional key, a fail-open route whose store is down);
the target and header helpers build what the backend receives, for the recorded story
(proxy/lifecycle.py) and pass-through (proxy/app.py) alike.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from proxy import keys, problems
from proxy.problems import Problem
from proxy.replay import REPLAYED, http_date
from proxy.request import ProxyRequest
from proxy.upstream import (
    NotSent,
    OutcomeUnknown,
    UpstreamClient,
    UpstreamResponse,
    request_headers,
    response_headers,
)


@dataclass(slots=True)
class Reply:
    """What the client gets: a status, headers, a body, and maybe the rest of a stream."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    rest: AsyncIterator[bytes] | None = None
    close: Callable[[], None] | None = None
    # For the request's log line and metrics; never sent.
    outcome: str = ""
    # The record's scoped key, whose keyed hash the log line shows.
    scoped: keys.ScopedKey | None = None
    upstream_ms: float | None = None
    store_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    # Set on the proxy's own answers, which the route's error format may re-shape.
    problem: Problem | None = None


def problem_reply(problem: Problem, outcome: str, date: bytes, *, replayed: bool = False) -> Reply:
    body = problem.body()
    headers = problem.headers(date)
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    if replayed:
        headers.append(REPLAYED)
    return Reply(problem.status, headers, body, outcome=outcome, problem=problem)


async def forward_unrecorded(
    upstream: UpstreamClient,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | AsyncIterator[bytes],
    *,
    timeout: float,
    outcome: str,
) -> Reply:
    """Send once and stream the answer back, with no record: pass-through traffic, an
    absent optional key, or a fail-open route whose store is down."""
    started = time.perf_counter()
    try:
        response = await upstream.send(method, target, headers, body, timeout=timeout, read_limit=0)
    except NotSent:
        return problem_reply(problems.upstream_unreachable(), "upstream_unreachable", http_date())
    except OutcomeUnknown as exc:
        problem = problems.upstream_failed(exc.status, exc.reason)
        return problem_reply(problem, "upstream_failed", http_date())
    reply = reply_from(response, response_headers(response.headers), outcome)
    reply.upstream_ms = (time.perf_counter() - started) * 1000
    return reply


def forward_headers(request: ProxyRequest) -> list[tuple[bytes, bytes]]:
    """What the backend gets of a parsed request's headers (see `outgoing_headers`)."""
    return outgoing_headers(
        request.headers, request.client, request.scheme, request.header(b"host"), request.request_id
    )


def outgoing_headers(
    headers: list[tuple[bytes, bytes]],
    client: str | None,
    scheme: str,
    host: bytes | None,
    request_id: bytes,
) -> list[tuple[bytes, bytes]]:
    """Hop-by-hop headers dropped, X-Forwarded-* added, exactly one X-Request-Id."""
    return with_request_id(request_headers(headers, client, scheme, host), request_id)


def with_request_id(
    headers: list[tuple[bytes, bytes]], request_id: bytes
) -> list[tuple[bytes, bytes]]:
    """The forwarded headers with exactly one X-Request-Id: the one the answer and the log
    line carry (the client's when it was valid, else a generated one)."""
    if not request_id:
        return headers
    out = [(k, v) for k, v in headers if k != b"x-request-id"]
    out.append((b"x-request-id", request_id))
    return out


def target_of(request: ProxyRequest) -> str:
    """The request target as the client sent it: raw path (escapes, dot segments) and query."""
    return raw_target(request.raw_path, request.path, request.query_string)


def raw_target(raw_path: bytes, path: str, query: bytes) -> str:
    """`raw_path` as received (the decoded `path` only when the server gave no raw one),
    with its query."""
    target = (raw_path or path.encode()).decode("latin-1")
    if query:
        return f"{target}?{query.decode('latin-1')}"
    return target


def reply_from(
    response: UpstreamResponse, headers: list[tuple[bytes, bytes]], outcome: str
) -> Reply:
    return Reply(
        response.status,
        headers,
        response.body,
        rest=response.rest,
        close=response.close,
        outcome=outcome,
    )
