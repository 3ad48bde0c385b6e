"""Abuse: whatever a client sends, the proxy answers with well-formed HTTP, never a 500,
never echoes what it refused, never forwards what it refused, and never lets one tenant
read another's stored response. Slow and oversized uploads are cut off.

One proxy with several keyed routes and one with the default rule (no routes) run once
for the module, both in front of a counting upstream: a real HTTP server on 127.0.0.1
that counts every request it is handed and answers with the count (`x-exec`), so "the
backend never saw it" is a number, for every path and method, not only the sample
backend's charge endpoints. Requests go out over raw sockets, because the interesting
inputs (duplicate headers, latin-1 bytes, broken framing choices) are what well-behaved
clients refuse to send; responses are parsed with h11, which rejects malformed HTTP.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import h11
import orjson
import pytest
from harness import HOST, ProxyServer, RedisServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from inprocess import ThreadedUpstream

from proxy.config import Settings, load_settings
from proxy.problems import TITLES, TYPE_BASE
from proxy.routes import RouteTable

SENTINEL = "Zq7SentinelBodyMark"
TENANT_HEADER = "X-Tenant-Id"
SMALL_CAP = 64 * 1024
BIG_CAP = 1024 * 1024
# Short enough to keep the module fast, long enough that no honest request here hits it.
BODY_READ_TIME = "2s"

ROUTES: list[dict[str, Any]] = [
    {"name": "hdr", "path": "/r/hdr", "key": {"from": "header", "name": "Idempotency-Key"}},
    {
        "name": "json",
        "methods": ["POST", "PATCH"],
        "path": "/r/json",
        "key": {"from": "json", "field": "payment.order_id"},
    },
    {"name": "query", "path": "/r/query", "key": {"from": "query", "field": "k"}},
    {"name": "path", "path": "/r/items/{item_id}/pay", "key": {"from": "path", "name": "item_id"}},
    {"name": "form", "path": "/r/form", "key": {"from": "form", "field": "order_id"}},
    {
        "name": "optional",
        "path": "/r/optional",
        "key": {"from": "header", "name": "Idempotency-Key"},
        "required": False,
    },
    {
        "name": "big",
        "path": "/r/big",
        "key": {"from": "header", "name": "Idempotency-Key"},
        "max_request_body": BIG_CAP,
    },
]
ROUTED_CONFIG: dict[str, Any] = {
    "tenant": {"header": TENANT_HEADER},
    "defaults": {"max_request_body": SMALL_CAP, "max_body_read_time": BODY_READ_TIME},
    "routes": ROUTES,
}
DEFAULT_RULE_CONFIG: dict[str, Any] = {
    "defaults": {"max_request_body": SMALL_CAP, "max_body_read_time": BODY_READ_TIME},
}
# uvicorn's own answer to bytes its HTTP parser refuses: made before the proxy sees anything.
PARSER_REJECTION = b"Invalid HTTP request received."


# --------------------------------------------------------------------------- upstream


class CountingUpstream(ThreadedUpstream):
    """A real HTTP server (uvicorn, own thread) that counts every request handed to it.

    A bare ASGI app rather than the sample backend: it answers any method and path, and
    it keeps the body's bytes as sent (no Content-Encoding decoding to trip over).
    """

    def __init__(self) -> None:
        super().__init__(HOST)
        self.count = 0
        self._lock = threading.Lock()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        with self._lock:
            self.count += 1
            execution = self.count
        tenant = next((v for k, v in scope["headers"] if k == TENANT_HEADER.lower().encode()), None)
        document = {
            "exec": execution,
            "method": scope["method"],
            "path": scope["raw_path"].decode("latin-1"),
            "tenant": tenant.decode("latin-1") if tenant is not None else None,
            "body": bytes(body[:4096]).decode("latin-1"),
        }
        payload = orjson.dumps(document)
        await send(
            {
                "type": "http.response.start",
                "status": 201 if scope["method"] == "POST" else 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-exec", str(execution).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@dataclass
class Stack:
    upstream: CountingUpstream
    routed: ProxyServer
    default: ProxyServer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    redis_server.revive().flushall()
    upstream = CountingUpstream()
    upstream.start()
    proxies: list[ProxyServer] = []
    try:
        for config in (ROUTED_CONFIG, DEFAULT_RULE_CONFIG):
            proxy = ProxyServer(
                tmp_path_factory.mktemp("abuse-proxy"),
                upstream=upstream.url,
                redis_url=redis_server.url,
                config=config,
            )
            proxies.append(proxy)
            proxy.start()
        yield Stack(upstream, proxies[0], proxies[1])
        for proxy in proxies:
            # An exception inside the app is a 500 the client may never have seen.
            assert "Exception in ASGI application" not in proxy.logs(), proxy.logs()[-4000:]
    finally:
        for proxy in proxies:
            proxy.stop()
        upstream.stop()


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Answer:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None

    @property
    def origin(self) -> str:
        """Who made this answer: the backend, a replay of it, uvicorn's parser, or the proxy."""
        if self.header(b"server") is not None:  # the proxy adds none; the backend's passes
            return "backend"
        if self.header(b"idempotent-replayed") == b"true" and not self.is_problem:
            return "replay"
        if self.status == 400 and self.body == PARSER_REJECTION:
            return "parser"
        return "proxy"

    @property
    def is_problem(self) -> bool:
        return self.header(b"content-type") == b"application/problem+json"


def parse_answer(raw: bytes, method: str) -> Answer:
    """One complete, well-formed HTTP/1.1 response, or an AssertionError saying why not."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "proxy")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    response: h11.Response | None = None
    body = bytearray()
    try:
        while True:
            item = conn.next_event()
            if isinstance(item, h11.InformationalResponse):
                continue
            if isinstance(item, h11.Response):
                response = item
            elif isinstance(item, h11.Data):
                body += item.data
            elif isinstance(item, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"incomplete response ({item!r}): {raw[:300]!r}")
    except h11.RemoteProtocolError as exc:
        raise AssertionError(f"malformed response ({exc}): {raw[:300]!r}") from None
    assert response is not None
    trailing, _closed = conn.trailing_data
    if method == "HEAD" and response.status_code == 400 and trailing == PARSER_REJECTION:
        # uvicorn's parser refused the request before it knew the method was HEAD.
        body, trailing = bytearray(trailing), b""
    assert not trailing, f"bytes after the response: {trailing[:200]!r}"
    headers: dict[bytes, list[bytes]] = {}
    for name, value in response.headers:
        headers.setdefault(bytes(name), []).append(bytes(value))
    return Answer(response.status_code, headers, bytes(body), raw)


def exchange(port: int, request: bytes, method: str, timeout: float = 15.0) -> Answer:
    """Send raw bytes (with `Connection: close` inside) and read the answer to EOF."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        # The proxy may answer (413) and close before it has read everything: not an error.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        return _read_answer(sock, method, timeout)


def _read_answer(sock: socket.socket, method: str, timeout: float, first: bytes = b"") -> Answer:
    """Read until the peer closes (or `timeout` passes) and parse what came after `first`."""
    sock.settimeout(timeout)
    chunks = [first]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return parse_answer(b"".join(chunks), method)


def build_request(
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    framing: str = "length",
) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Connection: close")
    if framing in ("length", "both"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    if framing in ("chunked", "both"):
        lines.append(b"Transfer-Encoding: chunked")
        step = max(1, len(body) // 3 or 1)
        pieces = [body[i : i + step] for i in range(0, len(body), step)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_problem(answer: Answer, *secrets: bytes) -> dict[str, Any]:
    """The contract's problem+json: known type, title, status, no-store, nothing echoed."""
    assert answer.is_problem, (answer.status, answer.headers, answer.body[:300])
    assert answer.header(b"cache-control") == b"no-store", answer.headers
    document = json.loads(answer.body)
    assert isinstance(document, dict)
    assert isinstance(document.get("type"), str), document
    assert document["type"].startswith(TYPE_BASE), document
    assert document["type"].removeprefix(TYPE_BASE) in TITLES, document
    assert isinstance(document.get("title"), str) and document["title"], document
    assert document.get("status") == answer.status, document
    for secret in secrets:
        assert secret not in answer.raw, (secret, answer.raw[:400])
    return document


# --------------------------------------------------------------------------- strategies

_PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_SPECIALS = st.sampled_from(list('",;\\ \t=%&/?#é\x00\x01\x7f\u202e💳'))
KEYS = st.one_of(
    st.text(_PRINTABLE, min_size=1, max_size=40),
    st.text(st.one_of(_SPECIALS, _PRINTABLE), max_size=16),
    st.text(max_size=24),  # any unicode: control characters, combining marks, emoji
    st.builds(
        lambda n, ch: ch * n, st.sampled_from([254, 255, 256, 1000, 6000]), st.sampled_from("a\"'")
    ),
    st.sampled_from(
        [
            "",
            " ",
            '""',
            '"abc"',
            '"a\\"b"',
            '"a\\b"',
            "a,b",
            '"a", "b"',
            '"unterminated',
            "k;p=1",
            '"k";p=1',
            "é",
            "\x00",
            "a\x7fb",
            "key-with-\r-cr",
        ]
    ),
)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        b"application/json",
        b"application/json; charset=utf-8",
        b"APPLICATION/JSON",
        b"application/merchant+json",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=XyZ",
        b"multipart/form-data",
        b"text/plain",
        b"application/octet-stream",
        b"",
        b"garbage/;;;=",
        b"application/json\xff",
    ]
)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)


_CONTROLS = bytes(b for b in range(0x20) if b != 0x09) + b"\x7f"


def _header_bytes(text: str, keep_controls: bool) -> bytes:
    # CR/LF would end the header early: that is request smuggling, not a key, and it is
    # the HTTP parser's job. Other control bytes are refused by the parser before the proxy
    # sees them, so they are kept only sometimes; latin-1 and UTF-8 bytes always stay.
    raw = text.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")
    return raw if keep_controls else raw.translate(None, _CONTROLS)


@st.composite
def json_bodies(draw: st.DrawFn, key: str) -> bytes:
    key_value: Any = draw(st.one_of(st.just(key), JSON_SCALARS, st.lists(st.just(key), max_size=2)))
    shape = draw(st.integers(0, 4))
    document: Any
    if shape == 0:
        document = {"payment": {"order_id": key_value}, "note": SENTINEL, "amount": 100}
    elif shape == 1:
        document = {"note": SENTINEL, "payment": key_value}
    elif shape == 2:
        document = {"order_id": key_value, "note": SENTINEL}
    elif shape == 3:
        document = [SENTINEL, key_value]
    else:
        document = draw(JSON_SCALARS)
    text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")
    mangle = draw(st.sampled_from(["none", "none", "truncate", "invalid-utf8", "trailing"]))
    if mangle == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif mangle == "invalid-utf8":
        raw = raw.replace(b"payment", b"pay\xffment", 1) + b"\xc3"
    elif mangle == "trailing":
        raw += b" , }"
    return raw


@st.composite
def form_bodies(draw: st.DrawFn, key: str) -> bytes:
    kind = draw(st.sampled_from(["urlencoded", "twice", "multipart", "broken", "invalid-utf8"]))
    encoded = quote(key.encode("utf-8", "surrogatepass"), safe="")
    if kind == "urlencoded":
        return f"order_id={encoded}&note={SENTINEL}".encode()
    if kind == "twice":
        return f"order_id={encoded}&order_id=x&note={SENTINEL}".encode()
    if kind == "multipart":
        return (
            b'--XyZ\r\nContent-Disposition: form-data; name="order_id"\r\n\r\n'
            + key.encode("utf-8", "surrogatepass")
            + b'\r\n--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
            + SENTINEL.encode()
            + b"\r\n--XyZ--\r\n"
        )
    if kind == "broken":
        return b'--XyZ\r\nContent-Disposition: form-data; name="order_id"\r\n\r\n' + (
            SENTINEL.encode()
        )
    return b"order_id=\xff\xfe&note=" + SENTINEL.encode()


def _body(draw: st.DrawFn, key: str) -> bytes:
    kind = draw(st.sampled_from(["json", "form", "binary", "empty", "text"]))
    if kind == "json":
        return draw(json_bodies(key))
    if kind == "form":
        return draw(form_bodies(key))
    if kind == "binary":
        return draw(st.binary(max_size=200)) + SENTINEL.encode() + b"\xff\xfe\x00"
    if kind == "text":
        return draw(st.text(max_size=60)).encode("utf-8", "surrogatepass") + SENTINEL.encode()
    return b""


@dataclass
class Fuzzed:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str
    key: str
    where: str
    repeat: bool

    def raw(self) -> bytes:
        return build_request(self.method, self.target, self.headers, self.body, self.framing)

    def protected_by(self, proxy: str) -> bool:
        """True when a backend answer means the request was claimed under a valid key, so
        the same bytes again must be a replay."""
        if proxy == "default-rule":
            key_lines = [n for n, _ in self.headers if n.lower() == b"idempotency-key"]
            return self.method in ("POST", "PATCH") and len(key_lines) == 1
        required = ("hdr", "json", "query", "path", "form", "big")
        return self.where in required and (
            self.method == "POST" or (self.where == "json" and self.method == "PATCH")
        )


_PATHS = {
    "hdr": "/r/hdr",
    "json": "/r/json",
    "query": "/r/query",
    "form": "/r/form",
    "optional": "/r/optional",
    "big": "/r/big",
}


def _coherent_body(draw: st.DrawFn, where: str, key: str) -> tuple[bytes, bytes]:
    """A content type and body the route can read its key from (the key may still be bad)."""
    if where == "form":
        if draw(st.booleans()):
            encoded = quote(key.encode("utf-8", "surrogatepass"), safe="")
            return b"application/x-www-form-urlencoded", f"order_id={encoded}&n={SENTINEL}".encode()
        return b"multipart/form-data; boundary=XyZ", (
            b'--XyZ\r\nContent-Disposition: form-data; name="order_id"\r\n\r\n'
            + key.encode("utf-8", "surrogatepass")
            + b"\r\n--XyZ--\r\n"
        )
    document = {"payment": {"order_id": key}, "note": SENTINEL, "amount": draw(st.integers(1, 3))}
    return b"application/json", json.dumps(document).encode("utf-8", "surrogatepass")


@st.composite
def fuzzed_requests(draw: st.DrawFn) -> Fuzzed:
    where = draw(
        st.sampled_from(["hdr", "json", "query", "path", "form", "optional", "unrouted", "big"])
    )
    # Half the requests are what a client of that route would send (with a hostile key),
    # so claims, replays and mismatches are reached; the rest is noise of every kind.
    coherent = draw(st.booleans())
    key = draw(st.one_of(st.text(_PRINTABLE, min_size=1, max_size=12), KEYS) if coherent else KEYS)
    if coherent:
        method = "PATCH" if where == "json" and draw(st.booleans()) else "POST"
    else:
        method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
    if where == "unrouted":
        path = "/v1/elsewhere/" + quote(draw(st.text(max_size=10)), safe="")
    elif where == "path":
        path = "/r/items/" + quote(key.encode("utf-8", "surrogatepass"), safe="") + "/pay"
    else:
        path = _PATHS[where]
    query = ""
    encoded = quote(key.encode("utf-8", "surrogatepass"), safe="")
    if where == "query" and coherent:
        query = f"k={encoded}"
    elif where == "query" or draw(st.booleans()):
        query = draw(
            st.sampled_from(
                [f"k={encoded}", f"k={encoded}&k=2", f"a=1&k={encoded}", "k=", "k", "x=%zz&k=%ff"]
            )
        )
    target = (path + ("?" + query if query else "")).encode("latin-1")

    headers: list[tuple[bytes, bytes]] = []
    keep_controls = draw(st.integers(0, 7)) == 0
    if coherent:
        key_lines = 1 if where in ("hdr", "big", "optional") else 0
    else:
        key_lines = draw(st.integers(0, 3))
    for _ in range(key_lines):
        value = key if coherent else draw(st.one_of(st.just(key), KEYS))
        headers.append((b"Idempotency-Key", _header_bytes(value, keep_controls)))
    if not coherent and draw(st.integers(0, 3)) == 0:
        # Raw bytes: obs-text (0x80-0xff) reaches the proxy; most control bytes are refused
        # by the HTTP parser first, which is also a fine answer.
        low = 0x00 if keep_controls else 0x20
        raw_key = bytes(draw(st.lists(st.integers(low, 0xFF), min_size=1, max_size=12)))
        headers.append((b"Idempotency-Key", raw_key))
    if coherent:
        content_type, body = _coherent_body(draw, where, key)
    else:
        content_type, body = draw(CONTENT_TYPES), _body(draw, key)
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    tenant = draw(
        st.one_of(
            st.none(),
            st.sampled_from(["t-a", "t-b", "default", "t-a, t-b", "T-A", "\u00e9"]),
            st.text(max_size=8),
        )
    )
    if tenant is not None:
        headers.append((TENANT_HEADER.encode(), _header_bytes(tenant, keep_controls)))
    if draw(st.integers(0, 9)) == 0:
        headers.append((b"Content-Encoding", b"gzip"))
    # Leading/trailing blanks are not part of a field value (RFC 9110 5.5).
    headers = [(name, value.strip(b" \t")) for name, value in headers]
    # Content-Length and chunked together is refused by the HTTP parser: keep it rare.
    framing = draw(st.sampled_from(["length"] * 4 + ["chunked"] * 3 + ["both"]))
    repeat = draw(st.integers(0, 2)) == 0
    return Fuzzed(method, target, headers, body, framing, key, where, repeat)


def _check(stack: Stack, port: int, request: Fuzzed) -> Answer:
    before = stack.upstream.count
    answer = exchange(port, request.raw(), request.method)
    after = stack.upstream.count
    origin = answer.origin
    if origin in ("proxy", "parser"):
        # A stored backend 500 may be replayed; the proxy itself never fails with one.
        assert answer.status != 500, answer.raw[:500]
    if origin == "backend":
        assert after - before <= 1, (before, after)
    else:
        # Refused, replayed or rejected by the parser: the backend never saw this request.
        assert after == before, (origin, answer.status, answer.raw[:300])
    if origin == "proxy":
        secrets = [SENTINEL.encode()]
        if len(request.key) >= 12:
            secrets.append(request.key.encode("utf-8", "surrogatepass"))
        if request.method == "HEAD":
            # The answer to HEAD has a problem's headers and no body.
            assert answer.is_problem and answer.body == b"", answer.raw[:300]
        else:
            assert_problem(answer, *secrets)
        # The upstream and the store are healthy: every answer the proxy makes itself is
        # about the request, never a failure of its own.
        assert 400 <= answer.status < 500, answer.raw[:500]
    return answer


def _check_twice(stack: Stack, name: str, proxy: ProxyServer, request: Fuzzed) -> None:
    first = _check(stack, proxy.port, request)
    event(f"{name} {first.origin}:{first.status}")
    if not request.repeat:
        return
    second = _check(stack, proxy.port, request)
    event(f"{name} again {second.origin}:{second.status}")
    if first.origin == "backend" and request.protected_by(name):
        assert second.origin == "replay", (first.raw[:300], second.raw[:300])
    if second.origin == "replay" and first.origin == "backend":
        # The stored answer, byte for byte: same status and body as the execution.
        assert (second.status, second.body) == (first.status, first.body)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=fuzzed_requests())
def test_any_input_gets_well_formed_http_and_refusals_never_reach_the_backend(
    stack: Stack, request: Fuzzed
) -> None:
    _check_twice(stack, "routed", stack.routed, request)
    _check_twice(stack, "default-rule", stack.default, request)


# --------------------------------------------------------------------------- tenants


def _post(port: int, path: str, key: str, body: bytes, tenant: list[bytes] | None = None) -> Answer:
    headers = [(b"Idempotency-Key", key.encode()), (b"Content-Type", b"application/json")]
    headers += [(TENANT_HEADER.encode(), value) for value in tenant or []]
    return exchange(port, build_request("POST", path.encode(), headers, body), "POST")


def test_a_tenant_never_gets_another_tenants_stored_response(stack: Stack) -> None:
    port = stack.routed.port
    key = "shared-key-tenants-1"
    secret_body = b'{"card":"alice-secret-4111"}'
    first = _post(port, "/r/hdr", key, secret_body, [b"alice"])
    assert first.origin == "backend" and first.status == 201
    assert b"alice-secret-4111" in first.body
    replay = _post(port, "/r/hdr", key, secret_body, [b"alice"])
    assert replay.origin == "replay" and replay.body == first.body

    # Same key, same body, other tenants (and no tenant at all): each executes on its own.
    for tenant in ([b"mallory"], [b"Alice"], None):
        before = stack.upstream.count
        answer = _post(port, "/r/hdr", key, secret_body, tenant)
        assert answer.origin == "backend", (tenant, answer.status, answer.body)
        assert stack.upstream.count == before + 1
        assert json.loads(answer.body)["exec"] != json.loads(first.body)["exec"]
        assert json.loads(answer.body)["tenant"] != "alice"

    # Same key, different body, other tenant: its own first request, not a 422 that
    # would tell it someone else used the key.
    other = _post(port, "/r/hdr", key, b'{"card":"mallory"}', [b"mallory-2"])
    assert other.origin == "backend" and other.status == 201
    assert b"alice-secret" not in other.body


def test_several_tenant_header_lines_never_select_another_tenants_record(stack: Stack) -> None:
    """If an auth layer appends its tenant instead of replacing the client's, the client's
    line comes first: it must not choose whose records the request sees."""
    port = stack.routed.port
    key = "shared-key-tenants-2"
    body = b'{"card":"victim-secret-5500"}'
    first = _post(port, "/r/hdr", key, body, [b"victim"])
    assert first.origin == "backend" and first.status == 201
    before = stack.upstream.count
    attack = _post(port, "/r/hdr", key, body, [b"victim", b"attacker"])
    assert b"victim-secret-5500" not in attack.body, attack.raw[:400]
    assert attack.origin == "proxy" and attack.status == 400, attack.raw[:400]
    assert_problem(attack, b"victim", b"attacker")
    assert stack.upstream.count == before


# --------------------------------------------------------------------------- admin


@pytest.mark.parametrize("path", ["/metrics", "/livez", "/readyz"])
def test_admin_endpoints_are_not_served_on_the_traffic_port(stack: Stack, path: str) -> None:
    for proxy in (stack.routed, stack.default):
        answer = exchange(proxy.port, build_request("GET", path.encode(), [], b""), "GET")
        # Passed through to the backend like any unprotected GET, not answered by the proxy.
        assert answer.origin == "backend", answer.raw[:300]
        assert b"idempotency_proxy" not in answer.body
        assert json.loads(answer.body)["path"] == path
        admin = exchange(proxy.admin_port, build_request("GET", path.encode(), [], b""), "GET")
        assert admin.origin == "proxy" and admin.status == 200


# --------------------------------------------------------------------------- slow and big


def _closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_trickled_body_is_cut_off_with_408(stack: Stack) -> None:
    """Slow loris: headers, then one body byte every 200 ms. uvicorn has no body read
    timeout; the route's max_body_read_time (2 s here) ends it."""
    before = stack.upstream.count
    head = build_request(
        "POST", b"/r/hdr", [(b"Idempotency-Key", b"loris-1")], b"", framing="none"
    ).replace(b"Connection: close\r\n", b"Content-Length: 1000\r\n")
    started = time.monotonic()
    answer: Answer | None = None
    closed = False
    with socket.create_connection((HOST, stack.routed.port), timeout=5) as sock:
        sock.sendall(head)
        sock.settimeout(0.2)
        for _ in range(150):  # at most ~30 s
            try:
                sock.sendall(b"a")
            except OSError:  # already closed on us: the answer is in the receive buffer
                answer, closed = _read_answer(sock, "POST", 5.0), True
                break
            try:
                first = sock.recv(65536)
            except TimeoutError:
                continue
            answer = _read_answer(sock, "POST", 5.0, first)
            closed = _closed_by_peer(sock)
            break
    elapsed = time.monotonic() - started
    print(f"trickled upload cut off after {elapsed:.2f}s")
    assert answer is not None, "the proxy kept reading a trickled body for 30 s"
    assert answer.status == 408
    assert assert_problem(answer, b"loris-1")["type"].endswith("/body-timeout")
    assert answer.header(b"connection") == b"close"
    assert closed, "the connection stayed open for more trickling"
    assert stack.upstream.count == before


def test_headers_then_silence_is_cut_off_with_408(stack: Stack) -> None:
    head = build_request(
        "POST", b"/r/json", [(b"Content-Type", b"application/json")], b"", framing="none"
    ).replace(b"Connection: close\r\n", b"Content-Length: 20\r\n")
    before = stack.upstream.count
    with socket.create_connection((HOST, stack.routed.port), timeout=5) as sock:
        sock.sendall(head)
        answer = _read_answer(sock, "POST", timeout=30)
    assert answer.status == 408
    assert_problem(answer)
    assert stack.upstream.count == before


def test_a_declared_oversized_body_is_refused_before_it_is_sent(stack: Stack) -> None:
    """Content-Length over the cap: 413 at once, without waiting for (or reading) the body."""
    before = stack.upstream.count
    size = 50 * 1024 * 1024
    head = build_request(
        "POST", b"/r/big", [(b"Idempotency-Key", b"big-declared")], b"", framing="none"
    ).replace(b"Connection: close\r\n", b"Content-Length: %d\r\n" % size)
    with socket.create_connection((HOST, stack.routed.port), timeout=5) as sock:
        sock.sendall(head)
        sock.sendall(b"x" * 1000)  # a start of the body; the rest never comes
        answer = _read_answer(sock, "POST", timeout=15)
    assert answer.status == 413
    assert assert_problem(answer, b"big-declared")["type"].endswith("/body-too-large")
    assert answer.header(b"connection") == b"close"
    assert stack.upstream.count == before


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_chunked_flood_is_cut_off_at_the_cap_and_memory_stays_bounded(stack: Stack) -> None:
    """50 MB of chunked body to a 1 MiB route: the proxy stops at the cap, answers 413 and
    closes, so the sender is cut off long before 50 MB; RSS does not grow with the flood."""
    pid = stack.routed.pid
    rss_before = _rss_kib(pid)
    before = stack.upstream.count
    total = 50 * 1024 * 1024
    head = build_request(
        "POST", b"/r/big", [(b"Idempotency-Key", b"big-chunked")], b"", framing="none"
    ).replace(b"Connection: close\r\n", b"Transfer-Encoding: chunked\r\n")
    piece = b"a" * 65536
    frame = b"%x\r\n%s\r\n" % (len(piece), piece)
    sent = 0
    with socket.create_connection((HOST, stack.routed.port), timeout=10) as sock:
        sock.sendall(head)
        while sent < total:
            try:
                sock.sendall(frame)
            except OSError:
                break
            sent += len(piece)
        answer = _read_answer(sock, "POST", timeout=15)
    rss_after = _rss_kib(pid)
    print(
        f"chunked flood: sent {sent / 2**20:.1f} MiB of {total / 2**20:.0f} MiB before the cut; "
        f"proxy RSS {rss_before} -> {rss_after} KiB"
    )
    assert answer.status == 413
    assert_problem(answer, b"big-chunked")
    assert sent < total, "the proxy read the whole 50 MB flood"
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    assert stack.upstream.count == before
    # A body just under the cap still goes through on the same route.
    ok = exchange(
        stack.routed.port,
        build_request("POST", b"/r/big", [(b"Idempotency-Key", b"big-ok")], b"b" * (BIG_CAP - 10)),
        "POST",
    )
    assert ok.origin == "backend" and ok.status == 201


def test_max_body_read_time_is_a_route_policy_with_a_default() -> None:
    settings = load_settings(
        flags={"upstream": "http://127.0.0.1:1"},
        environ={},
    )
    assert settings.defaults.max_body_read_time == 30.0
    table = RouteTable(
        Settings.model_validate(
            {
                "upstream": "http://127.0.0.1:1",
                "defaults": {"max_body_read_time": "5s"},
                "routes": [
                    {"name": "slow", "path": "/a", "max_body_read_time": "250ms"},
                    {"name": "plain", "path": "/b"},
                ],
            }
        )
    )
    policies = {route.name: route.policy.max_body_read_time for route in table.routes}
    assert policies == {"slow": 0.25, "plain": 5.0}
