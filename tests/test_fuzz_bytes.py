"""Byte-level fuzzing of live proxies: whatever bytes arrive, never a 500, never a hang,
never a traceback in the log.

Hypothesis writes request lines, headers and bodies (framed right, wrong or not at all)
straight to the sockets of two real proxy processes, one on the memory store and one on
Redis, in front of an upstream that never answers 500 itself. So a 500 can only be the
proxy's (or uvicorn's bare one for an exception that escaped it). Bounded: a fixed
number of examples, derandomised, each answer within a few seconds.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, ProxyServer, RedisServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from inprocess import ThreadedUpstream

# An answer must come within this; the proxy's own bounds (body read 0.3 s, upstream 1 s)
# are well inside it.
ANSWER_TIMEOUT = 6.0
# Written when an exception escaped: uvicorn's wrapper (or its line for an app that
# returned with the response unfinished), asyncio's "never retrieved", a traceback.
FAILURE_MARKS = (
    "Traceback",
    "Exception in ASGI application",
    "never retrieved",
    "without completing",
)

ROUTES: list[dict[str, Any]] = [
    {"name": "hdr", "path": "/f/hdr", "key": {"from": "header", "name": "Idempotency-Key"}},
    {
        "name": "json",
        "methods": ["POST", "PATCH"],
        "path": "/f/json",
        "key": {"from": "json", "field": "order.id"},
    },
    {"name": "form", "path": "/f/form", "key": {"from": "form", "field": "order_id"}},
    {"name": "query", "path": "/f/query", "key": {"from": "query", "field": "k"}},
    {"name": "item", "path": "/f/items/{id:int}/pay", "key": {"from": "path", "name": "id"}},
    {
        "name": "open",
        "path": "/f/open",
        "failure_mode": "open",
        "required": False,
        "key": {"from": "header", "name": "Idempotency-Key"},
    },
]
CONFIG: dict[str, Any] = {
    "admin": {"host": HOST},
    "tenant": {"header": "X-Tenant-Id"},
    "defaults": {
        "max_request_body": 64 * 1024,
        "max_body_read_time": "300ms",
        "upstream_timeout": "1s",
    },
    "routes": ROUTES,
}


# --------------------------------------------------------------------------- upstream


class PlainUpstream(ThreadedUpstream):
    """A real HTTP server (uvicorn, own thread) that reads any request and answers 200."""

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        body = json.dumps({"method": scope["method"], "size": size}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass
class Target:
    name: str
    proxy: ProxyServer
    log_offset: int = 0

    def new_log(self) -> str:
        """The log written since the last call."""
        path: Path = self.proxy.log_path
        with path.open("rb") as log:
            log.seek(self.log_offset)
            data = log.read()
        self.log_offset += len(data)
        return data.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def targets(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[list[Target]]:
    redis_server.revive().flushall()
    upstream = PlainUpstream()
    upstream.start()
    proxies: list[ProxyServer] = []
    try:
        for redis_url in (None, redis_server.url):
            proxy = ProxyServer(
                tmp_path_factory.mktemp("fuzz-proxy"),
                upstream=upstream.url,
                redis_url=redis_url,
                config=CONFIG,
            )
            proxies.append(proxy)
            proxy.start()
        found = [Target("memory", proxies[0]), Target("redis", proxies[1])]
        for target in found:
            target.new_log()  # start-up lines are not the fuzz's
        yield found
    finally:
        for proxy in proxies:
            proxy.stop()
        upstream.stop()


# --------------------------------------------------------------------------- strategies

_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TARGET_BYTES = _TOKEN + b'/?=&;:@,%[]() "<>{}\\\x00\x7f\x80\xa0\xc3\xa9\xed\xb0\x80\xff'
_VALUE_BYTES = _TARGET_BYTES + b"\t\x01\x1b"


def _bytes_from(alphabet: bytes, min_size: int = 0, max_size: int = 24) -> Any:
    return st.lists(st.sampled_from(list(alphabet)), min_size=min_size, max_size=max_size).map(
        bytes
    )


METHODS = st.one_of(
    st.sampled_from([b"POST"] * 6 + [b"GET", b"PATCH", b"PUT", b"HEAD", b"DELETE", b"OPTIONS"]),
    st.sampled_from([b"CONNECT", b"TRACE", b"post", b"PO ST", b""]),
    _bytes_from(_TOKEN, 1, 10),
)
PATHS = [b"/f/hdr", b"/f/json", b"/f/form", b"/f/query", b"/f/open", b"/elsewhere"]
KEYS = st.one_of(
    st.sampled_from([b"k-1", b"k-2", b'"k-1"', b"k;p=1", b"", b"a,b", b'"open', b"\xff"]),
    _bytes_from(_VALUE_BYTES, 0, 12),
    st.sampled_from([b"a" * 256, b"9" * 5000]),
)


@st.composite
def targets_(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["route", "route", "route", "item", "absolute", "raw", "star"]))
    if kind == "item":
        digits = draw(st.sampled_from([b"7", b"007", b"9" * 300, b"9" * 5000, b"-1", b"1.5"]))
        return b"/f/items/" + digits + b"/pay"
    if kind == "absolute":
        return b"http://elsewhere.example" + draw(st.sampled_from(PATHS))
    if kind == "star":
        return draw(st.sampled_from([b"*", b"127.0.0.1:1", b"//x", b"/%", b"/..%2f..", b""]))
    path = draw(st.sampled_from(PATHS))
    if kind == "raw":
        path += draw(_bytes_from(_TARGET_BYTES, 0, 16))
    if draw(st.booleans()):
        path += b"?k=" + draw(KEYS) + draw(st.sampled_from([b"", b"&k=2", b"&x=%zz", b"&x=%ff"]))
    return path


def _json(key: bytes, value: bytes) -> bytes:
    return b'{"order": {"id": "' + key + b'"}, "amount": ' + value + b', "x": "\\udc00"}'


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    key = draw(KEYS)
    kind = draw(st.sampled_from(["json", "json", "form", "deep", "binary", "empty", "multipart"]))
    if kind == "json":
        value = draw(st.sampled_from([b"1", b"9" * 5000, b"1e999", b"-0", b'"\\ud800"', b"[]"]))
        body = _json(key, value)
        if draw(st.booleans()):
            body = body[: draw(st.integers(0, len(body)))]
        return body
    if kind == "form":
        return b"order_id=" + key + draw(st.sampled_from([b"", b"&order_id=2", b"&x=%ff"]))
    if kind == "deep":
        depth = draw(st.sampled_from([10, 300, 5000]))
        return b'{"order": {"id": "d"}, "n": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "multipart":
        return (
            b'--B\r\nContent-Disposition: form-data; name="order_id"\r\n\r\n' + key + b"\r\n--B--"
        )
    if kind == "binary":
        return draw(st.binary(max_size=200))
    return b""


HEADER_NAMES = st.one_of(
    st.sampled_from(
        [
            b"Idempotency-Key",
            b"Content-Type",
            b"X-Tenant-Id",
            b"Content-Encoding",
            b"Expect",
            b"Transfer-Encoding",
            b"Content-Length",
            b"Host",
            b"X-Request-Id",
            b"Connection",
        ]
    ),
    _bytes_from(_TOKEN, 1, 12),
    _bytes_from(_VALUE_BYTES, 0, 6),  # not a token: the parser's to refuse
)
CONTENT_TYPES = st.sampled_from(
    [
        b"application/json",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=B",
        b"multipart/form-data",
        b"text/plain",
        b"application/json\xff",
        b";;;",
    ]
)


@st.composite
def header_values(draw: st.DrawFn, name: bytes) -> bytes:
    lower = name.lower()
    if lower == b"idempotency-key":
        return draw(KEYS)
    if lower == b"content-type":
        return draw(CONTENT_TYPES)
    if lower == b"transfer-encoding":
        return draw(st.sampled_from([b"chunked", b"gzip, chunked", b"identity", b"x"]))
    if lower == b"content-length":
        return draw(st.sampled_from([b"0", b"-1", b"1e3", b"99999999999999999999", b"", b"5"]))
    if lower == b"expect":
        return draw(st.sampled_from([b"100-continue", b"x"]))
    if lower == b"connection":
        return draw(st.sampled_from([b"keep-alive", b"upgrade", b"close, x-tenant-id"]))
    return draw(_bytes_from(_VALUE_BYTES, 0, 40))


@dataclass
class Raw:
    request: bytes
    method: bytes

    def __repr__(self) -> str:
        return f"Raw({self.request[:600]!r})"


_PRINTABLE_VALUE = _bytes_from(_TOKEN + b' /=;,"', 0, 24)
_WELL_FORMED_HEADERS = st.sampled_from(
    [b"X-Tenant-Id", b"X-Request-Id", b"Content-Encoding", b"Expect", b"Idempotency-Key"]
)


@st.composite
def raw_requests(draw: st.DrawFn) -> Raw:
    # Three in four are well formed up to the body, so that routes, keys, claims and
    # replays are reached; the rest is noise for the HTTP parser and the proxy alike.
    well_formed = draw(st.integers(0, 3)) > 0
    if well_formed:
        method = draw(st.sampled_from([b"POST"] * 6 + [b"PATCH", b"GET", b"PUT", b"HEAD"]))
        version = b"HTTP/1.1"
    else:
        method = draw(METHODS)
        version = draw(
            st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x"])
        )
    lines = [method + b" " + draw(targets_()) + b" " + version]
    if well_formed or draw(st.integers(0, 9)):
        lines.append(b"Host: proxy")
    # The key and the content type a route wants, often, so claims and replays happen.
    if draw(st.integers(0, 2)):
        lines.append(b"Idempotency-Key: " + draw(KEYS if not well_formed else _PRINTABLE_VALUE))
    if draw(st.integers(0, 2)):
        lines.append(b"Content-Type: " + draw(CONTENT_TYPES))
    for _ in range(draw(st.integers(0, 3))):
        if well_formed:
            name = draw(_WELL_FORMED_HEADERS)
            lines.append(name + b": " + draw(_PRINTABLE_VALUE))
        else:
            name = draw(HEADER_NAMES)
            lines.append(name + b": " + draw(header_values(name)))
    body = draw(bodies())
    framings = ["length"] * 10 + ["chunked"] * 4 + ["short"] * 2 + ["long"]
    framing = draw(st.sampled_from(framings if well_formed else [*framings, "none"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "short":  # the rest is the next request, pipelined
        lines.append(b"Content-Length: %d" % (len(body) // 2))
    elif framing == "long":  # never completed: the proxy's read bound answers
        lines.append(b"Content-Length: %d" % (len(body) + 10))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        step = max(1, len(body) // 2)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    lines.append(b"Connection: close")
    return Raw(b"\r\n".join(lines) + b"\r\n\r\n" + body, method)


# --------------------------------------------------------------------------- the test

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def exchange(port: int, request: bytes) -> bytes:
    """Send the bytes; read until the proxy closes. A hang is an AssertionError."""
    with socket.create_connection((HOST, port), timeout=ANSWER_TIMEOUT) as sock:
        # Answered and closed before it read everything (413, 400): read the answer.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        chunks = []
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            if time.monotonic() >= deadline:
                raise AssertionError(f"no complete answer in {ANSWER_TIMEOUT}s: hang")
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"no answer in {ANSWER_TIMEOUT}s: hang") from None
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def check(target: Target, raw: Raw) -> None:
    answer = exchange(target.proxy.port, raw.request)
    found = _STATUS.match(answer)
    # Every request gets an answer (uvicorn's parser answers 400 to what it refuses).
    assert found is not None, (target.name, answer[:300])
    status = int(found.group(1))
    event(f"{target.name} {status}")
    assert status != 500, (target.name, answer[:500])
    log = target.new_log()
    for mark in FAILURE_MARKS:
        assert mark not in log, (target.name, mark, log[-3000:])
    assert target.proxy.running


@settings(
    max_examples=150,
    deadline=None,  # each exchange has its own bound (ANSWER_TIMEOUT)
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=raw_requests())
def test_any_bytes_get_an_answer_that_is_never_a_500(targets: list[Target], raw: Raw) -> None:
    for target in targets:
        check(target, raw)
