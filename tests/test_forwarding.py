"""What the backend receives and what the client gets back, header by header, byte by byte.

The sample backend's `POST /v1/echo?headers=1` answers with the headers it received,
and plain `POST /v1/echo` with the body it received. For response-side hop-by-hop
headers, which the sample backend never sends, a tiny raw HTTP server on 127.0.0.1
answers with them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import aiohttp
import httpx
import pytest
from harness import HOST, BackendServer, ProxyFactory, ProxyServer
from rawhttp import raw_request, values

from proxy.config import UpstreamPool
from proxy.upstream import AiohttpUpstream, UnsafeClient, make_upstream

# Hop-by-hop headers a client may send; none of them may reach the backend.
REQUEST_HOP_BY_HOP = {
    "Connection": "x-custom, x-other",
    "X-Custom": "1",
    "X-Other": "2",
    "Keep-Alive": "timeout=5, max=100",
    "TE": "trailers",
    "Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA==",
    "Proxy-Connection": "keep-alive",
}
STRIPPED_REQUEST = {"x-custom", "x-other", "keep-alive", "te", "proxy-authorization"}
STRIPPED_RESPONSE = {"x-resp-private", "keep-alive", "proxy-authenticate", "trailer"}


class _HopByHopUpstream(BaseHTTPRequestHandler):
    """Answers every request with hop-by-hop headers mixed into ordinary ones."""

    protocol_version = "HTTP/1.1"

    def _answer(self, status: int) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        payload = b'{"answered": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "keep-alive, X-Resp-Private")
        self.send_header("Keep-Alive", "timeout=5")
        self.send_header("X-Resp-Private", "must not leave the proxy")
        self.send_header("Proxy-Authenticate", 'Basic realm="upstream"')
        self.send_header("Trailer", "X-Checksum")
        self.send_header("X-Kept", "1")
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        self._answer(201)

    def do_GET(self) -> None:
        self._answer(200)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output is for failures."""


@pytest.fixture(scope="module")
def hop_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer((HOST, 0), _HopByHopUpstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def proxies(
    tmp_path_factory: pytest.TempPathFactory, backend: BackendServer, hop_upstream: str
) -> Iterator[tuple[ProxyServer, ProxyServer]]:
    """(proxy to the sample backend, proxy to the hop-by-hop upstream), both with the default
    rule: POST and PATCH with an Idempotency-Key are protected, the rest passes through."""
    to_backend = ProxyServer(tmp_path_factory.mktemp("forwarding"), upstream=backend.url)
    to_hop = ProxyServer(tmp_path_factory.mktemp("forwarding-hop"), upstream=hop_upstream)
    try:
        to_backend.start()
        to_hop.start()
        yield to_backend, to_hop
    finally:
        to_backend.stop()
        to_hop.stop()


@pytest.fixture
def proxy(proxies: tuple[ProxyServer, ProxyServer], backend: BackendServer) -> ProxyServer:
    backend.revive()  # an earlier suite may have broken it
    return proxies[0]


def new_key() -> str:
    return f"fwd-{uuid.uuid4().hex[:16]}"


async def received_headers(
    client: httpx.AsyncClient, method: str, url: str, headers: Any, content: bytes = b"{}"
) -> dict[str, str]:
    response = await client.request(
        method, url + "/v1/echo?headers=1", headers=headers, content=content
    )
    assert response.status_code == 200, response.text
    received: dict[str, str] = response.json()
    return received


@pytest.mark.parametrize("method", ["POST", "GET"], ids=["protected", "pass-through"])
async def test_hop_by_hop_request_headers_are_stripped(
    proxy: ProxyServer, client: httpx.AsyncClient, method: str
) -> None:
    headers = {
        **REQUEST_HOP_BY_HOP,
        "Idempotency-Key": new_key(),
        "Content-Type": "application/json",
        "X-Kept": "yes",
    }
    received = await received_headers(client, method, proxy.url, headers)
    assert not STRIPPED_REQUEST & received.keys(), received
    assert "x-custom" not in received.get("connection", "").lower()
    assert "proxy-connection" not in received
    assert received["x-kept"] == "yes"
    assert received["content-type"] == "application/json"


async def test_idempotency_key_forwarded_unchanged_and_forwarded_headers_added(
    proxy: ProxyServer, client: httpx.AsyncClient
) -> None:
    # An sf-string with an escape and a parameter: the proxy parses it, but forwards the
    # client's bytes untouched.
    raw_key = b'"pay-\\"' + new_key().encode() + b'\\"";source=web'
    headers = [
        (b"idempotency-key", raw_key),
        (b"content-type", b"application/json"),
        (b"x-forwarded-for", b"203.0.113.7"),
    ]
    received = await received_headers(client, "POST", proxy.url, headers)
    assert received["idempotency-key"] == raw_key.decode()
    assert received["x-forwarded-for"] == f"203.0.113.7, {HOST}"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-forwarded-host"] == f"{HOST}:{proxy.port}"

    plain = await received_headers(client, "GET", proxy.url, {})
    assert plain["x-forwarded-for"] == HOST
    assert plain["x-forwarded-proto"] == "http"
    assert plain["x-forwarded-host"] == f"{HOST}:{proxy.port}"


@pytest.mark.parametrize(
    ("content_type", "extra", "body"),
    [
        ("application/octet-stream", {}, bytes(range(256)) * 64),
        # Not canonicalised on the way: the fingerprint ignores layout, the backend sees it.
        ("application/json", {}, b'{ "b" : 1,\n\t"a":2 ,"s":"\\u00e9"}  '),
        # No silent decompression: the backend gets the encoded bytes.
        ("application/json", {"Content-Encoding": "gzip"}, gzip.compress(b'{"a": 1}', mtime=0)),
    ],
    ids=["binary", "json-layout", "gzip-encoded"],
)
async def test_raw_body_bytes_are_preserved_both_ways(
    proxy: ProxyServer,
    client: httpx.AsyncClient,
    content_type: str,
    extra: dict[str, str],
    body: bytes,
) -> None:
    headers = {"Idempotency-Key": new_key(), "Content-Type": content_type, **extra}
    first = await client.post(proxy.url + "/v1/echo", content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    assert first.content == body
    replay = await client.post(proxy.url + "/v1/echo", content=body, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == body
    # Unprotected (no key): streamed through, same bytes.
    passed = await client.put(proxy.url + "/v1/echo", content=body, headers=headers)
    assert passed.content == body


async def test_streaming_get_passes_through(proxy: ProxyServer, client: httpx.AsyncClient) -> None:
    async with client.stream("GET", proxy.url + "/v1/stream?chunks=5") as response:
        assert response.status_code == 200
        assert "idempotent-replayed" not in response.headers
        assert "content-length" not in response.headers  # streamed, not buffered and re-framed
        text = b"".join([chunk async for chunk in response.aiter_raw()]).decode()
    assert text == "".join(f"chunk {i}\n" for i in range(5))

    big = await client.get(proxy.url + "/v1/stream?chunks=64&size=16384")
    assert big.status_code == 200
    assert big.content == b"a" * (64 * 16384)


async def test_hop_by_hop_response_headers_are_stripped(
    proxies: tuple[ProxyServer, ProxyServer], client: httpx.AsyncClient
) -> None:
    to_hop = proxies[1]
    headers = {"Idempotency-Key": new_key(), "Content-Type": "application/json"}
    first = await client.post(to_hop.url + "/orders", content=b"{}", headers=headers)
    replay = await client.post(to_hop.url + "/orders", content=b"{}", headers=headers)
    passed = await client.get(to_hop.url + "/orders")
    assert (first.status_code, replay.status_code, passed.status_code) == (201, 201, 200)
    assert replay.headers["idempotent-replayed"] == "true"
    for response in (first, replay, passed):
        assert not STRIPPED_RESPONSE & response.headers.keys(), response.headers
        assert json.loads(response.content) == {"answered": True}
        assert int(response.headers["content-length"]) == len(response.content)
    assert first.headers["x-kept"] == "1"
    assert passed.headers["x-kept"] == "1"


# --------------------------------------------------------------------------- the request target


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/a%7Eb/%41",  # unreserved characters percent-encoded: not the client's to decode
        b"/v1/caf%c3%a9",  # lower-case escapes
        b"/v1/x/../pay?b=2&a=%7e",  # dot segments: the backend resolves them, not the proxy
    ],
    ids=["unreserved-escapes", "lowercase-escapes", "dot-segments"],
)
@pytest.mark.parametrize("transport", ["builtin", "aiohttp", "httpx"])
async def test_request_target_is_forwarded_byte_exact_under_the_upstream_prefix(
    proxy_factory: ProxyFactory, raw_upstream: str, target: bytes, transport: str
) -> None:
    config = {"admin": {"host": HOST}, "upstream_pool": {"client": transport}}
    proxy = proxy_factory(raw_upstream + "/api", config=config)
    key = new_key().encode()
    headers = [(b"idempotency-key", key), (b"content-type", b"text/plain")]
    status, _, body = await raw_request(proxy.url, "POST", target, headers, b"x")
    assert (status, body) == (201, b"/api" + target)
    status, replayed, body = await raw_request(proxy.url, "POST", target, headers, b"x")
    assert (status, body) == (201, b"/api" + target)
    assert values(replayed, b"idempotent-replayed") == [b"true"]
    # Pass-through (no route protects GET) forwards the same bytes.
    status, _, body = await raw_request(proxy.url, "GET", target, [])
    assert (status, body) == (201, b"/api" + target)


# ------------------------------------------------------------ pass-through and streaming


@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET", "HEAD"])
async def test_default_rule_passes_other_methods_with_a_key_straight_through(
    proxy_factory: ProxyFactory, raw_upstream: str, method: str
) -> None:
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}})
    headers = [(b"idempotency-key", new_key().encode()), (b"content-type", b"text/plain")]
    body = b"" if method in ("GET", "HEAD") else b"x"
    for _ in range(2):  # no record: the second is forwarded as well, never replayed
        status, got, payload = await raw_request(proxy.url, method, b"/v1/thing", headers, body)
        assert status == 201
        assert not values(got, b"idempotent-replayed")
        assert payload == (b"" if method == "HEAD" else b"/v1/thing")


async def test_a_client_that_waits_for_100_continue_gets_it_then_its_answer(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer
) -> None:
    # The proxy holds a connection's writes to send each answer in one piece; the interim
    # 100 Continue, which the client waits for before it sends its body, must leave alone.
    proxy = proxy_factory(ledger_backend.url, config={"admin": {"host": HOST}})
    body = b'{"amount": 100, "currency": "EUR"}'
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        writer.write(
            b"POST /v1/charges HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: %s\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % (new_key().encode(), len(body))
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 201 ")
    finally:
        writer.close()
    assert ledger_backend.ledger()["charges"] == 1


async def test_chunked_request_body_on_a_protected_route(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(ledger_backend.url, config={"admin": {"host": HOST}})
    payload = [b'{"amount": ', b"100, ", b'"currency": "EUR"}']

    async def chunks() -> Any:
        for part in payload:
            yield part

    headers = {"Idempotency-Key": new_key(), "Content-Type": "application/json"}
    first = await client.post(proxy.url + "/v1/charges", content=chunks(), headers=headers)
    assert first.status_code == 201, first.text
    # The same body, framed by Content-Length this time: the same request, replayed.
    replay = await client.post(
        proxy.url + "/v1/charges", content=b"".join(payload), headers=headers
    )
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert ledger_backend.ledger()["charges"] == 1


async def test_backend_that_stalls_mid_body_does_not_hold_the_client_forever(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    # upstream_timeout bounds every wait on the backend, also between body chunks of a
    # streamed answer: the client gets a cut connection (an incomplete body), not a hang.
    config = {"admin": {"host": HOST}, "defaults": {"upstream_timeout": "1s"}}
    proxy = proxy_factory(raw_upstream, config=config)
    async with httpx.AsyncClient(timeout=20.0, trust_env=False) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(proxy.url + "/stall")


async def test_a_protected_stream_that_stalls_is_cut_at_the_upstream_timeout(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    # The exchange's own deadline includes the outcome wait (for a late answer), but once
    # the answer is streaming to its client a silent backend is cut at the upstream timeout.
    defaults = {"upstream_timeout": "1s", "outcome_wait": "60s", "max_stored_response": 5}
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}, "defaults": defaults})
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=20.0, trust_env=False) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(proxy.url + "/stall", headers={"Idempotency-Key": "stall-1"})
    assert time.monotonic() - started < 8.0


# --------------------------------------------------------------------------- the client's re-send


async def test_aiohttp_re_send_is_switched_off() -> None:
    # aiohttp re-sends idempotent methods on a fresh connection when a pooled one was
    # closed; the proxy switches that off, so one request is one send.
    upstream = make_upstream("http://127.0.0.1:9", UpstreamPool(client="aiohttp"))
    await upstream.start()
    try:
        assert isinstance(upstream, AiohttpUpstream)
        assert upstream.session._retry_connection is False
    finally:
        await upstream.close()


async def test_aiohttp_without_its_re_send_switch_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The switch is private: an aiohttp without it must stop start-up, not run with it on.
    class WithoutSwitch(aiohttp.ClientSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            del self._retry_connection

    monkeypatch.setattr(aiohttp, "ClientSession", WithoutSwitch)
    upstream = make_upstream("http://127.0.0.1:9", UpstreamPool(client="aiohttp"))
    with pytest.raises(UnsafeClient, match="_retry_connection"):
        await upstream.start()
    await upstream.close()
