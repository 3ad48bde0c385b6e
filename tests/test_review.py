"""Release review: each test pins a defect found while reading the proxy against the contract.

A tiny raw HTTP server on 127.0.0.1 stands in for backends whose exact bytes matter
(the request target it received, a 204, a chunked answer), and a raw socket client
sends request targets that an HTTP client library would normalise first.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from harness import HOST, BackendServer, ProxyFactory, charges_route, pay_config

# --------------------------------------------------------------------------- raw upstream


def _read_request(conn: socket.socket) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The request line and headers of one request (its body read and dropped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
    else:
        length = int(headers.get(b"content-length", b"0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
    return lines[0], headers


def _serve(conn: socket.socket) -> None:
    """Answer one request per connection; the body is the raw request target received.

    `/no-content...` answers 204; `/chunked...` answers without Content-Length (chunked).
    """
    with conn:
        conn.settimeout(10)
        request = _read_request(conn)
        if request is None:
            return
        line, _ = request
        target = line.split(b" ")[1]
        if b"/no-content" in target:
            conn.sendall(b'HTTP/1.1 204 No Content\r\nConnection: close\r\nETag: "n"\r\n\r\n')
            return
        if b"/big-" in target:
            # /big-<status>: that status with a 64 KiB body.
            status = int(target.split(b"/big-")[1][:3])
            body = b"a" * 65536
            conn.sendall(
                b"HTTP/1.1 %d Big\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
            )
            return
        if b"/stall" in target:
            # Headers and a tenth of the body, then silence (bounded), then close.
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\n" + b"s" * 10
            )
            stopped.wait(60)
            return
        if b"/chunked" in target:
            body = b"0123456789" * 10
            conn.sendall(
                b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"".join(
                    b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
                    for i in range(0, len(body), 7)
                )
                + b"0\r\n\r\n"
            )
            return
        conn.sendall(
            b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (len(target), b"" if line.startswith(b"HEAD ") else target)
        )


stopped = threading.Event()


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[str]:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=_serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        stopped.set()
        thread.join(10)
        listener.close()


async def raw_request(
    url: str, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send exactly these request-line bytes; (status, headers, body) read until close."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode()]
        head += [k + b": " + v for k, v in headers]
        head += [b"Content-Length: %d" % len(body), b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()
    finally:
        writer.close()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    parsed = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        parsed.append((name.strip().lower(), value.strip()))
    if (b"transfer-encoding", b"chunked") in parsed:
        decoded = b""
        while payload:
            size_line, _, payload = payload.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            decoded += payload[:size]
            payload = payload[size + 2 :]
        payload = decoded
    return status, parsed, payload


def new_key() -> str:
    return f"rev-{uuid.uuid4().hex[:16]}"


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


# --------------------------------------------------------------------------- forwarding


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/a%7Eb/%41",  # unreserved characters percent-encoded: not the client's to decode
        b"/v1/caf%c3%a9",  # lower-case escapes
        b"/v1/x/../pay?b=2&a=%7e",  # dot segments: the backend resolves them, not the proxy
    ],
    ids=["unreserved-escapes", "lowercase-escapes", "dot-segments"],
)
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
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


# --------------------------------------------------------------------------- replays


async def test_replay_never_carries_set_cookie_request_id_or_a_second_date(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    # An operator lists headers the contract forbids in replays; the replay must still
    # carry none of them, exactly one Date and a Content-Length equal to the body.
    route = charges_route(
        replay_headers=["Set-Cookie", "X-Request-Id", "Date", "Content-Length", "Connection"]
    )
    proxy = proxy_factory(ledger_backend.url, config={"admin": {"host": HOST}, "routes": [route]})
    headers = {"Idempotency-Key": new_key(), "Content-Type": "application/json"}
    body = b'{"amount": 100, "currency": "EUR"}'
    first = await client.post(proxy.url + "/v1/charges", content=body, headers=headers)
    assert first.status_code == 201, first.text
    assert "set-cookie" in first.headers  # the first client gets the backend's answer
    replay = await client.post(
        proxy.url + "/v1/charges", content=body, headers={**headers, "X-Request-Id": "retry-2"}
    )
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert "set-cookie" not in replay.headers
    # Only the current request's id, never the stored (original) one.
    assert replay.headers.get_list("x-request-id") == ["retry-2"]
    assert len(replay.headers.get_list("date")) == 1
    assert replay.headers.get_list("content-length") == [str(len(replay.content))]
    assert replay.headers["location"] == first.headers["location"]
    assert ledger_backend.ledger()["charges"] == 1


async def test_replay_of_204_carries_no_content_length(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    # RFC 9110 §8.6: a server must not send Content-Length in a 204.
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}})
    headers = [(b"idempotency-key", new_key().encode()), (b"content-type", b"text/plain")]
    first = await raw_request(proxy.url, "POST", b"/no-content", headers, b"x")
    replay = await raw_request(proxy.url, "POST", b"/no-content", headers, b"x")
    assert first[0] == replay[0] == 204
    assert values(replay[1], b"idempotent-replayed") == [b"true"]
    assert values(replay[1], b"etag") == [b'"n"']
    assert not values(first[1], b"content-length")
    assert not values(replay[1], b"content-length")
    assert len(values(replay[1], b"date")) == 1


async def test_chunked_backend_answer_is_replayed_with_its_length(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}})
    headers = [(b"idempotency-key", new_key().encode()), (b"content-type", b"text/plain")]
    first = await raw_request(proxy.url, "POST", b"/chunked", headers, b"x")
    replay = await raw_request(proxy.url, "POST", b"/chunked", headers, b"x")
    assert first[0] == replay[0] == 201
    assert first[2] == replay[2] == b"0123456789" * 10
    assert values(replay[1], b"content-length") == [b"100"]
    assert not values(replay[1], b"transfer-encoding")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("depth", "keyed_status"),
    [(1000, 201), (50_000, 400)],
    ids=["parses-but-too-deep-to-re-encode", "too-deep-to-parse"],
)
async def test_deeply_nested_json_is_forwarded_or_a_problem_never_a_500(
    proxy_factory: ProxyFactory, raw_upstream: str, depth: int, keyed_status: int
) -> None:
    config = pay_config()
    config["routes"] = [*config["routes"], charges_route()]
    proxy = proxy_factory(raw_upstream, config=config)
    nested = b'{"order_id":"%s","n":' % new_key().encode() + b"[" * depth + b"]" * depth + b"}"
    json_headers = [(b"content-type", b"application/json")]
    status, headers, body = await raw_request(
        proxy.url, "POST", b"/v1/orders/pay", json_headers, nested
    )
    assert status == keyed_status, body
    if status == 400:
        assert values(headers, b"content-type") == [b"application/problem+json"]
        assert b"/problems/body-invalid" in body
        assert values(headers, b"cache-control") == [b"no-store"]
    # Keyed by header: the body is only fingerprinted (as raw bytes when it cannot be
    # canonicalised); the backend decides about it.
    keyed = [*json_headers, (b"idempotency-key", new_key().encode())]
    status, _, body = await raw_request(proxy.url, "POST", b"/v1/charges", keyed, nested)
    assert (status, body) == (201, b"/v1/charges")
    status, replayed, _ = await raw_request(proxy.url, "POST", b"/v1/charges", keyed, nested)
    assert status == 201
    assert values(replayed, b"idempotent-replayed") == [b"true"]


# --------------------------------------------------------------------------- fingerprint


async def test_query_keyed_route_fingerprints_the_query_not_its_order_or_lost_bytes(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    route = {"name": "q", "path": "/v1/q", "key": {"from": "query", "name": "order_id"}}
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}, "routes": [route]})
    order = new_key().encode()
    first = await raw_request(proxy.url, "POST", b"/v1/q?order_id=%s&a=1&b=%%FF" % order, [])
    assert first[0] == 201
    # The same query in another order is the same request: replayed.
    again = await raw_request(proxy.url, "POST", b"/v1/q?b=%%FF&a=1&order_id=%s" % order, [])
    assert again[0] == 201
    assert values(again[1], b"idempotent-replayed") == [b"true"]
    assert again[2] == first[2]
    # Another byte in a parameter is another request, even when it is not UTF-8: 422.
    other = await raw_request(proxy.url, "POST", b"/v1/q?order_id=%s&a=1&b=%%FE" % order, [])
    assert other[0] == 422, other
    assert b"/problems/key-reused" in other[2]


# --------------------------------------------------------------------------- release


async def test_release_status_with_a_response_over_the_stored_cap(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    route = {
        "name": "big",
        "path": "/big-{status}",
        "max_stored_response": "1KiB",
        "release_statuses": [429],
    }
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}, "routes": [route]})
    headers = [(b"idempotency-key", new_key().encode())]
    for _ in range(2):  # released: each try executes and gets the whole answer
        status, got, body = await raw_request(proxy.url, "POST", b"/big-429", headers)
        assert (status, len(body)) == (429, 65536)
        assert not values(got, b"idempotent-replayed")
    # Not released and over the cap: the first gets it all, a duplicate 409.
    headers = [(b"idempotency-key", new_key().encode())]
    status, _, body = await raw_request(proxy.url, "POST", b"/big-201", headers)
    assert (status, len(body)) == (201, 65536)
    status, got, body = await raw_request(proxy.url, "POST", b"/big-201", headers)
    assert status == 409
    assert b"/problems/replay-unavailable" in body


# --------------------------------------------------------------------------- in_flight: wait


async def _requests_seen(backend: BackendServer, at_least: int) -> int | None:
    seen = int(backend.ledger()["requests_seen"])
    return seen if seen >= at_least else None


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_waiting_duplicate_gets_unknown_or_executes_after_a_release(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    from harness import JSON_HEADERS, body_of, eventually, pay, pay_route

    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None
    route = pay_route(in_flight="wait", wait_timeout="20s", upstream_timeout="1s", outcome_wait="0")
    proxy = proxy_factory(
        ledger_backend.url, redis_url, config={"admin": {"host": HOST}, "routes": [route]}
    )

    # The first ends UNKNOWN (charged, then too slow): the waiter gets the same, replayed.
    order = new_key()
    first = asyncio.create_task(pay(client, proxy, order, {"X-Sample-Delay": "3"}))
    await eventually(lambda: _requests_seen(ledger_backend, 1), "the first request")
    waiter = await pay(client, proxy, order)
    assert (waiter.status, waiter.problem, waiter.replayed) == (504, "outcome-unknown", True)
    assert ((await first).status, (await first).problem) == (504, "outcome-unknown")

    # The first is released (429, nothing done): the waiter takes the key and executes.
    order = new_key()
    faults = {"X-Sample-Delay-Before": "0.5", "X-Sample-Reject": "429"}
    first = asyncio.create_task(pay(client, proxy, order, faults))
    await eventually(lambda: _requests_seen(ledger_backend, 2), "the second first request")
    waiter = await pay(client, proxy, order)
    assert ((await first).status, (await first).replayed) == (429, False)
    assert (waiter.status, waiter.problem, waiter.replayed) == (201, None, False)
    again = await client.post(
        proxy.url + "/v1/orders/pay", content=body_of(order), headers=JSON_HEADERS
    )
    assert again.headers["idempotent-replayed"] == "true"
    ledger = ledger_backend.ledger()
    assert ledger["charges"] == 2  # one per order
    assert ledger["double_charged_count"] == 0


# --------------------------------------------------------------------------- pass-through


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
