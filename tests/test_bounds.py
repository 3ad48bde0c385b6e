"""Resource bounds: what a client can make the proxy hold is bounded, on real processes.

- a request head is counted while it arrives: a header flood is cut off with 431 and the
  proxy's memory does not grow with it; a head that trickles in gets 408;
- requests past `max_concurrency` get 503 `overloaded`, nothing sent;
- pass-through uploads have a read deadline and a pool of their own, so slow uploads
  cannot starve protected payments of upstream connections;
- the memory store is capped in records and bytes (503 `store-unavailable` when full,
  expired records reclaimed), and the replay cache counts stored headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import httpx
import orjson
import pytest
from harness import (
    HOST,
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyFactory,
    ProxyServer,
    RedisFactory,
    body_of,
    pay,
    pay_config,
    pay_route,
    problem_name,
)

# --------------------------------------------------------------------------- raw HTTP


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One well-formed HTTP/1.1 response (h11 refuses malformed ones)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "proxy")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    status, headers, body = 0, {}, bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, headers, bytes(body)
        else:
            raise AssertionError(f"incomplete response ({event!r}): {raw[:300]!r}")


def _problem(raw: bytes, status: int, name: str) -> dict[str, str]:
    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/problem+json"
    assert headers["cache-control"] == "no-store"
    assert headers["x-request-id"]
    document: dict[str, Any] = orjson.loads(body)
    assert document["type"].endswith("/" + name) and document["status"] == status
    return headers


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# --------------------------------------------------------------------------- the head


@pytest.fixture
def plain_proxy(proxy_factory: ProxyFactory, ledger_backend: BackendServer) -> ProxyServer:
    return proxy_factory(ledger_backend.url, config=pay_config())


def test_a_header_flood_is_cut_off_while_parsing_and_memory_stays_bounded(
    plain_proxy: ProxyServer,
) -> None:
    """50 MiB of header lines: refused with 431 once the head passes its cap, long before
    the flood ends, and the proxy's RSS does not grow with it (it grew by the flood's size
    when the headers were only counted after the whole head was in memory)."""
    bounded_proxy = plain_proxy
    pid = bounded_proxy.pid
    rss_before = _rss_kib(pid)
    total = 50 * 1024 * 1024
    line = b"X-Flood: " + b"a" * 4087 + b"\r\n"  # 4 KiB a line
    batch = line * 16
    sent = 0
    with socket.create_connection((HOST, bounded_proxy.port), timeout=10) as sock:
        sock.sendall(b"POST " + PAY_PATH.encode() + b" HTTP/1.1\r\nHost: proxy\r\n")
        while sent < total:
            try:
                sock.sendall(batch)
            except OSError:
                break
            sent += len(batch)
        raw = _read_until_closed(sock, 15)
    rss_after = _rss_kib(pid)
    print(
        f"header flood: sent {sent / 2**20:.1f} MiB of {total / 2**20:.0f} MiB before the cut; "
        f"proxy RSS {rss_before} -> {rss_after} KiB"
    )
    assert sent < total, "the proxy read the whole 50 MiB head"
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    headers = _problem(raw, 431, "headers-too-large")
    assert headers["connection"] == "close"
    # The proxy still serves, and the 431 above never reached the backend.
    with bounded_proxy.http() as http:
        response = http.post(PAY_PATH, content=body_of("after-flood"), headers=JSON_HEADERS)
    assert response.status_code == 201


def test_a_trailer_flood_is_cut_off_like_a_header_flood(plain_proxy: ProxyServer) -> None:
    """Trailer fields after a chunked body are buffered by the parser like a head: 50 MiB
    of them is cut off once past the head's cap, and memory does not follow."""
    pid = plain_proxy.pid
    rss_before = _rss_kib(pid)
    total = 50 * 1024 * 1024
    batch = (b"X-Flood: " + b"a" * 4087 + b"\r\n") * 16
    sent = 0
    with socket.create_connection((HOST, plain_proxy.port), timeout=10) as sock:
        sock.sendall(
            b"PUT /v1/echo HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\nx\r\n0\r\n"
        )
        while sent < total:
            try:
                sock.sendall(batch)
            except OSError:
                break
            sent += len(batch)
        raw = _read_until_closed(sock, 15)
    rss_after = _rss_kib(pid)
    assert sent < total, "the proxy read the whole 50 MiB of trailers"
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)
    # The upload was already on its way to the backend: no answer, the connection closed.
    assert raw == b"" or raw.startswith(b"HTTP/1.1 431"), raw[:300]


def test_answers_made_before_a_route_is_known_follow_the_default_error_format(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer
) -> None:
    """The protocol's own 431 is rendered like every other proxy-made answer: here in the
    Stripe preset (a 400 with Stripe's error document and Request-Id)."""
    proxy = proxy_factory(
        ledger_backend.url, config=pay_config(defaults={"error_format": "stripe"})
    )
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: proxy\r\n")
        with contextlib.suppress(OSError):
            sock.sendall((b"X-Flood: " + b"a" * 4087 + b"\r\n") * 64)
        raw = _read_until_closed(sock, 10)
    status, headers, body = _parse(raw)
    assert status == 400, raw[:300]
    error = orjson.loads(body)["error"]
    assert error["code"] == "headers-too-large"
    assert error["type"] == "invalid_request_error"
    assert headers["request-id"] == headers["x-request-id"] == error["request_id"]


def test_headers_just_under_the_limit_still_pass(plain_proxy: ProxyServer) -> None:
    """The wire cap leaves room for framing: headers the application accepts get through."""
    pad = {f"x-pad-{i}": "b" * 1000 for i in range(30)}  # ~30 KiB, under max_header_bytes
    with plain_proxy.http() as http:
        response = http.post(PAY_PATH, content=body_of("padded"), headers={**JSON_HEADERS, **pad})
    assert response.status_code == 201


@pytest.mark.parametrize(
    ("max_header_bytes", "size"),
    [(4096, 20_000), (4096, 40_000), (4096, 60_000), (32768, 80_000), (32768, 200_000)],
)
def test_a_head_over_the_cap_is_431_when_it_arrives_in_one_read(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, max_header_bytes: int, size: int
) -> None:
    """A head sent in one write is parsed from one read: counting reads alone let a target
    of up to a read's size past the cap (2 x max_header_bytes + 8 KiB) and on to the
    backend, or, past 64 KiB, into the server's plain-text 400."""
    proxy = proxy_factory(ledger_backend.url, config=pay_config(max_header_bytes=max_header_bytes))
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/echo?" + b"a" * size + b" HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        raw = _read_until_closed(sock, 10)
    # The proxy's own answer: forwarded, the backend would have answered.
    _problem(raw, 431, "headers-too-large")


@pytest.mark.parametrize(
    ("request_line", "name"),
    [
        (b"GET http://127.0.0.1:1 HTTP/1.1", "target-invalid"),
        (b"POST http://127.0.0.1:1?x=1 HTTP/1.1", "target-invalid"),
        (b"GET /a b HTTP/1.1", "request-invalid"),
        (b"GET /\x7f HTTP/1.1", "request-invalid"),
        (b"G\x00T / HTTP/1.1", "request-invalid"),
    ],
    ids=["absolute-form-without-path", "absolute-form-query-only", "space", "del", "nul-method"],
)
def test_a_request_the_parser_refuses_is_a_problem(
    plain_proxy: ProxyServer, request_line: bytes, name: str
) -> None:
    """Bad bytes are a 4xx problem+json like every other answer the proxy makes, not the
    server's plain-text 400 (docs/security.md)."""
    with socket.create_connection((HOST, plain_proxy.port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: proxy\r\nContent-Length: 0\r\n\r\n")
        raw = _read_until_closed(sock, 10)
    headers = _problem(raw, 400, name)
    assert headers["connection"] == "close"


def test_a_head_that_trickles_in_gets_408_and_a_silent_connection_is_closed(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer
) -> None:
    """uvicorn has no deadline for a request head: a slow-loris head (or a connection that
    never sends a byte) would hold its slot for ever, and with it the concurrency cap."""
    bounded_proxy = proxy_factory(ledger_backend.url, config=pay_config(header_read_timeout="1s"))
    started = time.monotonic()
    with socket.create_connection((HOST, bounded_proxy.port), timeout=10) as sock:
        sock.sendall(b"POST " + PAY_PATH.encode() + b" HTTP/1.1\r\nHost: proxy\r\n")
        raw = b""
        for _ in range(40):  # one header byte every 0.1 s, for at most 4 s
            try:
                sock.sendall(b"x")
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                raw = sock.recv(65536)
            except TimeoutError:
                continue
            break
        raw += _read_until_closed(sock, 5)
    elapsed = time.monotonic() - started
    assert elapsed < 4, f"the trickled head was read for {elapsed:.1f} s"
    _problem(raw, 408, "header-timeout")

    with socket.create_connection((HOST, bounded_proxy.port), timeout=10) as idle:
        assert _closed_within(idle, 4), "a connection that sent nothing stayed open"


def test_requests_over_max_concurrency_get_503_overloaded(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer
) -> None:
    """With `max_concurrency: 3`, three slow requests in flight leave no room: the next one
    gets a 503 problem (not uvicorn's plain text) and never reaches the backend."""
    proxy = proxy_factory(ledger_backend.url, config=pay_config(max_concurrency=3))
    slow: list[socket.socket] = []
    try:
        for i in range(3):
            sock = socket.create_connection((HOST, proxy.port), timeout=10)
            sock.sendall(b"GET /v1/echo?delay=3 HTTP/1.1\r\nHost: proxy\r\nX-Slow: %d\r\n\r\n" % i)
            slow.append(sock)
        time.sleep(0.5)
        with proxy.http() as http:
            response = http.post(PAY_PATH, content=body_of("over-cap"), headers=JSON_HEADERS)
        assert response.status_code == 503, response.text
        assert problem_name(response) == "overloaded"
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-request-id"]
        assert ledger_backend.ledger()["charges"] == 0
    finally:
        for sock in slow:
            sock.close()
    with proxy.http() as http:
        for _ in range(50):
            response = http.post(PAY_PATH, content=body_of("under-cap"), headers=JSON_HEADERS)
            if response.status_code != 503:
                break
            time.sleep(0.1)
    assert response.status_code == 201


def test_an_overloaded_answer_reaches_a_client_still_sending_its_body(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer
) -> None:
    """The 503 `overloaded` closes the connection before the request's body was read.
    Closing with those bytes unread would reset the connection, and a client still sending
    a 1 MiB body would never read the 503 that tells it to come back."""
    proxy = proxy_factory(ledger_backend.url, config=pay_config(max_concurrency=1))
    body = b'{"order_id": "big", "pad": "' + b"p" * 2**20 + b'"}'
    head = b"POST %s HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n" % (
        PAY_PATH.encode()
    )
    slow = socket.create_connection((HOST, proxy.port), timeout=10)
    try:
        slow.sendall(b"GET /v1/echo?delay=3 HTTP/1.1\r\nHost: proxy\r\n\r\n")
        time.sleep(0.5)
        for _ in range(5):
            with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
                with contextlib.suppress(ConnectionError):
                    sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
            assert b"/problems/overloaded" in answer
        assert ledger_backend.ledger()["charges"] == 0
    finally:
        slow.close()


@pytest.mark.parametrize(
    "head",
    [
        b"OPTIONS * HTTP/1.1\r\nHost: proxy\r\nContent-Length: 1000\r\n\r\n",
        # Under the wire cap, over max_header_bytes: the application's own 431.
        b"POST /v1/orders/pay HTTP/1.1\r\nHost: proxy\r\nX-Pad: "
        + b"a" * 40_000
        + b"\r\nContent-Length: 1000\r\n\r\n",
    ],
    ids=["options-star", "application-431"],
)
def test_a_connection_answered_before_its_body_arrived_ends(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, head: bytes
) -> None:
    """An answer made before the request's body arrived leaves the rest of the body to come.
    uvicorn times a connection again only when a new request begins, and every read cancels
    its keep-alive timer: a client that sent a byte now and then kept the connection, and a
    place under `max_concurrency`, for ever. Now it is drained for at most 2 s, then closed."""
    proxy = proxy_factory(ledger_backend.url, config=pay_config())
    with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
        sock.sendall(head + b"x" * 10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 ")
        sock.settimeout(0.3)
        ended = False
        for _ in range(30):  # a byte every 0.3 s, for 9 s at most
            try:
                sock.sendall(b"x")
                ended = sock.recv(65536) == b""
            except TimeoutError:
                continue
            except OSError:
                ended = True
            if ended:
                break
        assert ended, "the connection was still open after 9 s of a trickled body"


# --------------------------------------------------------------------------- pass-through


class _Trickle:
    """Slow pass-through uploads: a head with Content-Length 1000, then a byte a second."""

    def __init__(self, port: int, count: int) -> None:
        self.socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        for sock in self.socks:
            sock.sendall(
                b"POST /v1/echo HTTP/1.1\r\nHost: proxy\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 1000\r\n\r\n"
            )
        self._thread.start()

    def _run(self) -> None:
        for _ in range(60):  # at most a minute
            for sock in self.socks:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")
            if self._stop.wait(1.0):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()


@pytest.fixture
def trickle() -> Iterator[list[_Trickle]]:
    made: list[_Trickle] = []
    yield made
    for item in made:
        item.close()


async def test_slow_pass_through_uploads_do_not_starve_protected_payments(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
    trickle: list[_Trickle],
) -> None:
    """Six uploads at 1 byte/s to an unprotected path, with four upstream connections for
    the protected routes: a payment still executes once (before, the uploads held every
    pooled connection and the payment got 502 connect-timeout)."""
    proxy = proxy_factory(
        ledger_backend.url,
        config=pay_config(
            upstream_pool={
                "max_connections": 4,
                "passthrough_max_connections": 4,
                "connect_timeout": "1s",
            },
        ),
    )
    trickle.append(_Trickle(proxy.port, 6))
    await asyncio.sleep(1.5)  # every upload has its upstream connection by now
    first = await pay(client, proxy, "while-trickling")
    again = await pay(client, proxy, "while-trickling")
    assert (first.status, first.problem) == (201, None), first
    assert again.status == 201 and again.replayed
    ledger = ledger_backend.ledger()
    assert ledger["charges"] == 1, ledger


async def test_a_slow_pass_through_upload_is_cut_off_at_the_body_read_time(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    trickle: list[_Trickle],
) -> None:
    """`max_body_read_time` bounds pass-through bodies too: 408, the upstream request is
    aborted (the backend never gets a complete body), the connection is freed."""
    proxy = proxy_factory(
        ledger_backend.url,
        config=pay_config(
            defaults={"max_body_read_time": "2s", "upstream_timeout": "20s"},
            upstream_pool={"passthrough_max_connections": 1, "connect_timeout": "1s"},
        ),
    )
    slow = _Trickle(proxy.port, 1)
    trickle.append(slow)
    started = time.monotonic()
    raw = await asyncio.to_thread(_read_until_closed, slow.socks[0], 10)
    elapsed = time.monotonic() - started
    assert elapsed < 6, f"the trickled upload was read for {elapsed:.1f} s"
    _problem(raw, 408, "body-timeout")
    # The one pass-through connection was given back: the next upload goes through.
    async with httpx.AsyncClient(timeout=10, trust_env=False) as http:
        response = await http.post(proxy.url + "/v1/echo", content=b"whole")
    assert response.status_code == 200 and response.content == b"whole"


# --------------------------------------------------------------------------- memory store


async def test_a_full_memory_store_answers_503_and_frees_up_as_records_expire(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    """`store.memory_max_entries: 3`: the fourth new key gets 503 store-unavailable and is
    not sent; duplicates of stored keys still replay; once records expire the cap frees."""
    proxy = proxy_factory(
        ledger_backend.url,
        config={
            "admin": {"host": HOST},
            "store": {"url": "memory://", "memory_max_entries": 3},
            # The shortest retention allowed: 2 x (lease + upstream_timeout + outcome_wait).
            "routes": [
                pay_route(
                    retention="3s", lease="250ms", upstream_timeout="1250ms", outcome_wait="0"
                )
            ],
        },
    )
    firsts = [await pay(client, proxy, f"cap-{i}") for i in range(3)]
    assert [o.status for o in firsts] == [201, 201, 201]
    refused = await pay(client, proxy, "cap-3")
    assert (refused.status, refused.problem) == (503, "store-unavailable"), refused
    replay = await pay(client, proxy, "cap-0")
    assert replay.status == 201 and replay.replayed
    assert ledger_backend.ledger()["charges"] == 3
    await asyncio.sleep(3.5)
    retried = await pay(client, proxy, "cap-3")
    assert (retried.status, retried.problem) == (201, None), retried
    assert ledger_backend.ledger()["charges"] == 4
    assert "memory store full" in proxy.logs()


async def test_the_memory_store_byte_cap_counts_stored_responses(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    """`store.memory_max_bytes: 64KiB` with 16 KiB stored per request: a handful fit, then
    new keys get 503 (nothing sent) while the stored ones still replay."""
    proxy = proxy_factory(
        ledger_backend.url,
        config={
            "admin": {"host": HOST},
            "store": {"url": "memory://", "memory_max_bytes": "64KiB"},
            "routes": [
                {"name": "echo", "path": "/v1/echo", "key": {"from": "header"}, "required": True}
            ],
        },
    )
    payload = b"p" * 16 * 1024
    statuses = []
    for i in range(10):
        response = await client.post(
            proxy.url + "/v1/echo", content=payload, headers={"Idempotency-Key": f"bytes-{i}"}
        )
        statuses.append((response.status_code, problem_name(response)))
    stored = statuses.count((200, None))
    assert 2 <= stored <= 4, statuses
    assert statuses[stored:] == [(503, "store-unavailable")] * (10 - stored), statuses
    replay = await client.post(
        proxy.url + "/v1/echo", content=payload, headers={"Idempotency-Key": "bytes-0"}
    )
    assert replay.status_code == 200 and replay.headers.get("idempotent-replayed") == "true"


# --------------------------------------------------------------------------- replay cache


async def test_the_replay_cache_counts_stored_headers_against_its_byte_cap(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    redis_factory: RedisFactory,
    client: httpx.AsyncClient,
) -> None:
    """Responses whose replayed headers are ~4 KiB and bodies a few bytes, with a 64 KiB
    replay cache: at most ~16 fit. With Redis paused only cached duplicates are answered
    (the rest get 503), which shows how many the cache really holds (before, headers were
    not counted and all 40 stayed)."""
    redis = redis_factory()
    proxy = proxy_factory(
        ledger_backend.url,
        redis_url=redis.url,
        config={
            "admin": {"host": HOST},
            "store": {"replay_cache_bytes": "64KiB", "timeout": "200ms", "retries": 0},
            "routes": [
                {
                    "name": "echo",
                    "path": "/v1/echo",
                    "key": {"from": "header"},
                    "replay_headers": ["x-echo-headers"],
                }
            ],
        },
    )
    pad = {"x-pad": "c" * 3500}
    keys = [f"hdr-{i}" for i in range(40)]
    for key in keys:
        response = await client.post(
            proxy.url + "/v1/echo", content=b"ok", headers={"Idempotency-Key": key, **pad}
        )
        assert response.status_code == 200
        assert len(response.headers.get("x-echo-headers", "")) > 3500
    redis.pause()
    try:
        replayed = 0
        for key in keys:
            response = await client.post(
                proxy.url + "/v1/echo", content=b"ok", headers={"Idempotency-Key": key, **pad}
            )
            if response.headers.get("idempotent-replayed") == "true":
                replayed += 1
                assert len(response.headers["x-echo-headers"]) > 3500
            else:
                assert problem_name(response) == "store-unavailable", response.text
    finally:
        redis.resume()
    print(f"replay cache answered {replayed} of {len(keys)} duplicates with Redis paused")
    assert 1 <= replayed <= 20, replayed


def test_new_settings_have_defaults() -> None:
    from proxy.config import Settings

    settings = Settings.model_validate({"upstream": "http://127.0.0.1:1"})
    assert settings.max_concurrency == 1000
    assert settings.header_read_timeout == 10.0
    assert settings.upstream_pool.passthrough_max_connections == 100
    assert settings.store.memory_max_entries == 1_000_000
    assert settings.store.memory_max_bytes == 256 * 1024 * 1024


async def test_the_memory_store_byte_count_follows_every_transition() -> None:
    """Whatever happens to records (completed, unknown, released, taken over, expired,
    resolved, discarded), the running byte count equals a recount and returns to zero."""
    from proxy.records import StoredResponse
    from proxy.store import memory

    store = memory.MemoryStore(max_entries=1000, max_bytes=10**9)

    def recount() -> int:
        return sum(memory._size(key, entry) for key, entry in store._records.items())

    big = StoredResponse(201, ((b"location", b"/x" * 100),), b"b" * 5000)
    for i in range(6):
        await store.claim(f"k{i}", f"t{i}", "fp", lease_ms=1, retention_ms=60_000)
        await store.mark_sent(f"k{i}", f"t{i}", lease_ms=1)
    await store.claim("short", "ts", "fp", lease_ms=10_000, retention_ms=1)
    await store.complete("k0", "t0", big)
    await store.mark_unknown("k1", "t1", 502, "reset")
    await store.release("k2", "t2")
    await asyncio.sleep(0.01)
    await store.claim("k3", "other-owner-token", "fp", lease_ms=1, retention_ms=60_000)
    await store.resolve("k1", big, force=False)
    assert store.bytes == recount() > 10_000
    assert await store.get("short") is None  # expired and reclaimed
    for key in ("k0", "k1", "k3", "k4", "k5"):
        await store.discard(key, force=True)
    assert store.records == 0 and store.bytes == 0
