"""Bad input never gives a 500: each test pins one input that once escaped as an exception.

A lone surrogate escape in a JSON body, a corrupt or partial record in Redis, a huge
integer in a typed path parameter, and a backend that closes in the middle of its body.
Every answer is the contract's (problem+json, or the backend's own), and the proxy's log
has its one line per request and never a traceback.

A tiny raw HTTP server on 127.0.0.1 stands in for the backend, because a body cut short
is not something a well-behaved server framework will send.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from harness import (
    HOST,
    JSON_HEADERS,
    ProxyFactory,
    ProxyServer,
    problem_name,
    proxy_request,
    records_cli,
)
from rawhttp import accept_loop

from proxy import keys
from proxy.fingerprint import fingerprint

# --------------------------------------------------------------------------- raw upstream


@dataclass
class RawUpstream:
    """Counts requests; answers 201 with the target, or cuts a body short on request."""

    url: str = ""
    seen: list[bytes] = field(default_factory=list)


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head.split(b"\r\n", 1)[0]


def _serve(conn: socket.socket, upstream: RawUpstream) -> None:
    with conn:
        conn.settimeout(10)
        line = _read_request(conn)
        if line is None:
            return
        target = line.split(b" ")[1]
        upstream.seen.append(target)
        if b"/short-chunked" in target:
            # One chunk, then the connection closes without the last chunk.
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                b"\r\na\r\n0123456789\r\n"
            )
            return
        if b"/short" in target:
            # Content-Length 1000, ten bytes, close.
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n"
                b"0123456789"
            )
            return
        conn.sendall(
            b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(target), target)
        )


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    with accept_loop(lambda conn, _stop: _serve(conn, upstream)) as url:
        upstream.url = url
        yield upstream


CONFIG: dict[str, Any] = {
    "admin": {"host": HOST},
    "routes": [
        {"name": "pay", "methods": ["POST"], "path": "/v1/orders/pay",
         "key": {"from": "json", "field": "order_id"}},
        {"name": "items", "methods": ["POST"], "path": "/v1/items/{item_id:int}/pay",
         "key": {"from": "path", "name": "item_id"}},
        {"name": "shops", "methods": ["POST"], "path": "/v1/shops/{shop:int}/charges",
         "key": {"from": "header", "name": "Idempotency-Key"}},
        {"name": "open", "methods": ["POST"], "path": "/v1/open/pay", "failure_mode": "open",
         "key": {"from": "json", "field": "order_id"}},
        {"name": "observed", "methods": ["POST"], "path": "/v1/observed/pay", "mode": "observe",
         "key": {"from": "json", "field": "order_id"}},
        {"name": "cut", "methods": ["POST"], "path": "/p/{rest:path}",
         "key": {"from": "header", "name": "Idempotency-Key"}},
        {"name": "cut-streamed", "methods": ["POST"], "path": "/s/{rest:path}",
         "max_stored_response": 4, "key": {"from": "header", "name": "Idempotency-Key"}},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def memory_proxy(
    tmp_path_factory: pytest.TempPathFactory, raw_upstream: RawUpstream
) -> Iterator[ProxyServer]:
    server = ProxyServer(
        tmp_path_factory.mktemp("no-500"), upstream=raw_upstream.url, config=CONFIG
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:16]}"


# Written when an exception escaped: uvicorn's wrapper (or its line for an app that
# returned with the response unfinished), asyncio's "never retrieved", a traceback.
_FAILURE_MARKS = (
    "Traceback",
    "Exception in ASGI application",
    "never retrieved",
    "without completing",
)


def assert_clean_log(proxy: ProxyServer, since: int = 0) -> None:
    """Nothing escaped in the log written after offset `since`."""
    log = proxy.logs()[since:]
    for mark in _FAILURE_MARKS:
        assert mark not in log, (mark, log[-4000:])


def access_lines(proxy: ProxyServer, **match: Any) -> list[dict[str, Any]]:
    """The proxy's request log lines whose fields equal `match`."""
    found = []
    for line in proxy.logs().splitlines():
        if not line.startswith("{"):
            continue
        document = json.loads(line)
        if all(document.get(k) == v for k, v in match.items()):
            found.append(document)
    return found


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- surrogates


async def test_a_lone_surrogate_in_a_json_body_is_forwarded_and_fingerprinted(
    memory_proxy: ProxyServer, raw_upstream: RawUpstream, client: httpx.AsyncClient
) -> None:
    since = len(memory_proxy.logs())
    order = new_key()
    # Python's parser accepts a lone surrogate escape; orjson does not, and its
    # canonical re-encoding once raised UnicodeEncodeError (a 500).
    body = b'{"order_id": "%s", "note": "\\udc00"}' % order.encode()
    url = memory_proxy.url + "/v1/orders/pay"
    seen = len(raw_upstream.seen)
    first = await client.post(url, content=body, headers=JSON_HEADERS)
    assert first.status_code == 201, first.text
    again = await client.post(url, content=body, headers=JSON_HEADERS)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    # Another lone surrogate, or the pair it belongs to, is another request.
    for note in (b"\\udc01", b"\\ud800", b"\\ud83d\\udca9"):
        other = body.replace(b"\\udc00", note)
        reused = await client.post(url, content=other, headers=JSON_HEADERS)
        assert reused.status_code == 422 and problem_name(reused) == "key-reused", note
    assert len(raw_upstream.seen) == seen + 1
    # As a key it is not printable ASCII: 400, never a 500.
    bad_key = await client.post(url, content=b'{"order_id": "\\udc00"}', headers=JSON_HEADERS)
    assert bad_key.status_code == 400 and problem_name(bad_key) == "key-invalid"
    assert_clean_log(memory_proxy, since)


# --------------------------------------------------------------------------- typed paths


async def test_a_huge_integer_in_a_typed_path_parameter_is_never_a_500(
    memory_proxy: ProxyServer, raw_upstream: RawUpstream, client: httpx.AsyncClient
) -> None:
    since = len(memory_proxy.logs())
    digits = "7" * 5000
    seen = len(raw_upstream.seen)
    # As the key: longer than a key may be.
    as_key = await client.post(memory_proxy.url + f"/v1/items/{digits}/pay", content=b"x")
    assert as_key.status_code == 400 and problem_name(as_key) == "key-invalid", as_key.text
    assert len(raw_upstream.seen) == seen
    # Not the key: the route still protects it, and a retry replays.
    key = new_key()
    url = memory_proxy.url + f"/v1/shops/{digits}/charges"
    first = await client.post(url, content=b"x", headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    again = await client.post(url, content=b"x", headers={"Idempotency-Key": key})
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert len(raw_upstream.seen) == seen + 1
    # Leading zeros still name the same integer, as the parameter's type says.
    order = str(10**30 + 7)
    first = await client.post(memory_proxy.url + f"/v1/items/{order}/pay", content=b"x")
    zeros = await client.post(memory_proxy.url + f"/v1/items/000{order}/pay", content=b"x")
    assert first.status_code == 201
    assert zeros.status_code == 422 and problem_name(zeros) == "key-reused"
    assert_clean_log(memory_proxy, since)


# --------------------------------------------------------------------------- cut bodies


async def raw_exchange(port: int, request: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes and read everything until the proxy closes (bounded)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            chunks = []
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    finally:
        writer.close()
    return b"".join(chunks)


@pytest.mark.parametrize("cut", ["short", "short-chunked"])
async def test_a_backend_that_closes_mid_body_on_a_protected_route_is_outcome_unknown(
    memory_proxy: ProxyServer,
    raw_upstream: RawUpstream,
    client: httpx.AsyncClient,
    cut: str,
) -> None:
    since = len(memory_proxy.logs())
    key = new_key()
    url = memory_proxy.url + f"/p/{cut}"
    first = await client.post(url, content=b"pay", headers={"Idempotency-Key": key})
    assert first.status_code == 502 and problem_name(first) == "outcome-unknown", first.text
    again = await client.post(url, content=b"pay", headers={"Idempotency-Key": key})
    assert again.status_code == 502 and problem_name(again) == "outcome-unknown"
    assert again.headers["idempotent-replayed"] == "true"
    assert_clean_log(memory_proxy, since)


@pytest.mark.parametrize("cut", ["short", "short-chunked"])
@pytest.mark.parametrize("where", ["passthrough", "streamed"])
async def test_a_backend_that_closes_mid_body_while_streaming_closes_the_client_cleanly(
    memory_proxy: ProxyServer,
    raw_upstream: RawUpstream,
    client: httpx.AsyncClient,
    cut: str,
    where: str,
) -> None:
    """Pass-through traffic, and a protected answer over the stored-response cap, stream
    the backend's body; a cut in it closes the client's connection, with one log line."""
    since = len(memory_proxy.logs())
    key = new_key()
    if where == "passthrough":
        request = b"GET /elsewhere/%s HTTP/1.1\r\nHost: x\r\n\r\n" % cut.encode()
        match = {"msg": "request", "route": "-", "method": "GET"}
    else:
        request = (
            b"POST /s/%s HTTP/1.1\r\nHost: x\r\nIdempotency-Key: %s\r\nContent-Length: 3\r\n\r\n"
            b"pay" % (cut.encode(), key.encode())
        )
        match = {"msg": "request", "route": "cut-streamed"}
    before = len(access_lines(memory_proxy, **match))
    answer = await raw_exchange(memory_proxy.port, request)
    # The status and the first bytes came through; then the connection closed early
    # (a Content-Length not met, or no last chunk): the client knows it was cut.
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    if cut == "short":
        assert b"content-length: 1000" in head.lower() and body == b"0123456789"
    else:
        assert b"transfer-encoding: chunked" in head.lower()
        assert b"0123456789" in body and not body.endswith(b"0\r\n\r\n")
    for _ in range(50):  # the log line is written just after the close
        lines = access_lines(memory_proxy, **match)
        if len(lines) > before:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == before + 1, memory_proxy.logs()[-3000:]
    assert (lines[-1]["status"], lines[-1]["outcome"]) == (200, "upstream_cut")
    # Nothing else was logged about it (uvicorn's "returned without completing response",
    # which would come just after the app returned).
    await asyncio.sleep(0.2)
    assert "without completing" not in memory_proxy.logs()[since:]
    assert_clean_log(memory_proxy, since)
    # The proxy goes on serving.
    assert (await client.post(memory_proxy.url + "/elsewhere", content=b"x")).status_code == 201


# --------------------------------------------------------------------------- corrupt records


CORRUPT: dict[str, dict[bytes, bytes]] = {
    "headers-not-json": {b"state": b"COMPLETED", b"status": b"201", b"headers": b"{not json",
                         b"body": b"ok", b"replayable": b"1"},
    "status-missing": {b"state": b"COMPLETED", b"headers": b"[]", b"body": b"ok",
                       b"replayable": b"1"},
    "status-not-a-number": {b"state": b"COMPLETED", b"status": b"two hundred",
                            b"headers": b"[]", b"body": b"ok"},
    "status-out-of-range": {b"state": b"COMPLETED", b"status": b"1000", b"headers": b"[]"},
    "headers-not-pairs": {b"state": b"COMPLETED", b"status": b"201", b"headers": b'{"a": 1}'},
    "header-with-newline": {b"state": b"COMPLETED", b"status": b"201",
                            b"headers": b'[["location", "/a\\r\\nx: y"]]'},
    "no-content-with-body": {b"state": b"COMPLETED", b"status": b"204", b"headers": b"[]",
                             b"body": b"surprise"},
    "unknown-status-garbage": {b"state": b"UNKNOWN", b"status": b"oops", b"reason": b"reset"},
}  # fmt: skip


@pytest.mark.parametrize("route", ["pay", "open", "observed"])
async def test_a_corrupt_record_is_alive_counted_logged_and_never_overwritten(
    proxy_factory: ProxyFactory,
    raw_upstream: RawUpstream,
    redis_url: str,
    client: httpx.AsyncClient,
    route: str,
) -> None:
    """The contract: an unreadable record means "alive". A duplicate gets 409 (on the
    fail-open route too: this is no outage, and forwarding could charge twice), the metric
    counts it, one log line names its key hash, and the record stays byte for byte. An
    observing route blocks nothing: it forwards where enforcement would have said 409."""
    proxy = proxy_factory(raw_upstream.url, redis_url, CONFIG)
    path = {"pay": "/v1/orders/pay", "open": "/v1/open/pay", "observed": "/v1/observed/pay"}[route]
    observed = route == "observed"
    planted: dict[str, tuple[bytes, str, str]] = {}  # name: (body, storage key, key hash)
    with redis.Redis.from_url(redis_url) as store:
        for name, fields in [*CORRUPT.items(), ("wrong-type", {})]:
            order = f"corrupt-{name}-{uuid.uuid4().hex[:8]}"
            body = b'{"order_id": "%s"}' % order.encode()
            scoped = keys.scope(keys.DEFAULT_TENANT, route, order)
            request = proxy_request(body=body, content_type="application/json", path=path)
            if fields:
                fp = fingerprint(request).encode()
                store.hset(scoped.storage_key, mapping={**fields, b"fp": fp, b"token": b"t"})
            else:
                store.set(scoped.storage_key, b"not a hash")
            planted[name] = (body, scoped.storage_key, scoped.log_hash)
        dumps = {name: store.dump(key) for name, (_, key, _) in planted.items()}

        seen = len(raw_upstream.seen)
        for name, (body, _, log_hash) in planted.items():
            answer = await client.post(proxy.url + path, content=body, headers=JSON_HEADERS)
            if observed:
                assert answer.status_code == 201, (name, answer.status_code, answer.text)
            else:
                assert answer.status_code == 409, (name, answer.status_code, answer.text)
                assert problem_name(answer) == "request-in-progress", name
                assert int(answer.headers["retry-after"]) >= 1
            told = [
                line
                for line in access_lines(proxy, key_hash=log_hash)
                if line["logger"] == "idempotency_proxy"
            ]
            assert len(told) == 1 and told[0]["level"] == "error", (name, told)
            for _ in range(50):  # the request's line is written just after the answer
                answered = access_lines(proxy, key_hash=log_hash, msg="request")
                if answered:
                    break
                await asyncio.sleep(0.05)
            expected = (201, "observed") if observed else (409, "record_unreadable")
            assert [(line["status"], line["outcome"]) for line in answered] == [expected]
        assert len(raw_upstream.seen) == seen + (len(planted) if observed else 0)
        for name, (_, storage_key, _) in planted.items():
            assert store.dump(storage_key) == dumps[name], name

    metrics = (await client.get(proxy.admin_url + "/metrics")).text
    assert metric(metrics, "idempotency_proxy_store_corrupt_records_total") == len(planted)
    # Only the corrupt records are refused: the next payment goes through.
    fresh = b'{"order_id": "%s"}' % new_key().encode()
    answer = await client.post(proxy.url + path, content=fresh, headers=JSON_HEADERS)
    assert answer.status_code == 201
    assert_clean_log(proxy)


@pytest.mark.parametrize("corrupt", ["headers-not-json", "wrong-type"])
async def test_an_operator_sees_and_deletes_a_corrupt_record(
    proxy_factory: ProxyFactory,
    raw_upstream: RawUpstream,
    redis_url: str,
    client: httpx.AsyncClient,
    corrupt: str,
) -> None:
    proxy = proxy_factory(raw_upstream.url, redis_url, CONFIG)
    assert proxy.config_path is not None
    order = f"corrupt-cli-{uuid.uuid4().hex[:8]}"
    body = b'{"order_id": "%s"}' % order.encode()
    storage_key = keys.scope(keys.DEFAULT_TENANT, "pay", order).storage_key
    with redis.Redis.from_url(redis_url) as store:
        if corrupt == "wrong-type":
            store.set(storage_key, b"not a hash")
        else:
            store.hset(storage_key, mapping=CORRUPT[corrupt])
    url = proxy.url + "/v1/orders/pay"
    assert (await client.post(url, content=body, headers=JSON_HEADERS)).status_code == 409
    common = ("--redis-url", redis_url, "--config", str(proxy.config_path), "--route", "pay")
    code, out, err = await records_cli("show", *common, "--key", order)
    assert code == 1 and "cannot be read" in err and "Traceback" not in err, (out, err)
    code, _, err = await records_cli("release", *common, "--key", order)
    assert code == 1 and "refused" in err  # without --force it stays
    code, out, err = await records_cli("release", *common, "--key", order, "--force")
    assert (code, out.strip()) == (0, "released"), err
    answer = await client.post(url, content=body, headers=JSON_HEADERS)
    assert answer.status_code == 201
