"""What a client sees (the README's table of outcomes), row by row, over real HTTP, per store.

Every test drives real processes: the sample payment backend (which charges on every
call it receives, so its ledger is the witness of backend executions) and proxy
processes started once per store with a config holding the routes the rows need.
Keys are unique per test, so records and per-order charge counts never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from harness import (
    BackendServer,
    ProxyFactory,
    ProxyServer,
    RedisFactory,
    charges_route,
    free_port,
    pay_route,
    print_logs,
    stop_all,
)
from inprocess import InProcessProxy, mounts

PROBLEM_BASE = "https://idempotency-proxy.dev/problems/"
JSON_HEADERS = {"Content-Type": "application/json"}
# Backend delay for "still in flight" rows: long enough that a duplicate sent right
# after the charge shows up in the ledger still finds the first request running.
IN_FLIGHT_DELAY = "1.5"

PAY = pay_route(
    # Shared with `charges`: the same key sent to the other endpoint is a reuse (422).
    namespace="payments",
    max_request_body="1KiB",
)
CHARGES = charges_route(
    namespace="payments",
    release_statuses=[402, 408, 425, 429],
    # A charge answer is ~130 bytes: every completed charge here is too large to replay.
    max_stored_response=64,
)
ECHO = {
    "name": "echo",
    "methods": ["POST"],
    "path": "/v1/echo",
    "key": {"from": "header", "name": "Idempotency-Key"},
    "max_stored_response": "1KiB",
}
MAIN_CONFIG: dict[str, Any] = {"tenant": {"header": "X-Tenant-Id"}, "routes": [PAY, CHARGES, ECHO]}
ALT_CONFIG: dict[str, Any] = {
    "routes": [
        pay_route(name="pay-wait", in_flight="wait", wait_timeout="20s"),
        charges_route(name="charges-timeout", upstream_timeout="300ms", outcome_wait="0"),
    ]
}


Proxy = ProxyServer | InProcessProxy


@dataclass
class Stack:
    """One store's proxies in front of the session backend: processes on Redis and Redis
    Cluster, ProxyApps in this process on the memory store (tests/inprocess.py)."""

    store: str
    backend: BackendServer
    main: Proxy  # MAIN_CONFIG
    alt: Proxy  # ALT_CONFIG: in_flight wait, a short upstream timeout
    refused: Proxy  # MAIN_CONFIG, upstream = a closed port

    @property
    def proxies(self) -> list[Proxy]:
        return [self.main, self.alt, self.refused]


@pytest.fixture(scope="module", params=["memory", "redis", "cluster"])
async def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    backend: BackendServer,
) -> AsyncIterator[Stack]:
    refused_upstream = f"http://127.0.0.1:{free_port()}"
    if request.param == "memory":
        apps = Stack(
            store="memory",
            backend=backend,
            main=InProcessProxy(MAIN_CONFIG, backend.url, "main"),
            alt=InProcessProxy(ALT_CONFIG, backend.url, "alt"),
            refused=InProcessProxy(MAIN_CONFIG, refused_upstream, "refused"),
        )
        started: list[InProcessProxy] = []
        try:
            for app in apps.proxies:
                assert isinstance(app, InProcessProxy)
                started.append(await app.start())
            yield apps
        finally:
            for app in started:
                await app.stop()
        return

    redis_url = (
        request.getfixturevalue("redis_server").revive().url
        if request.param == "redis"
        else request.getfixturevalue("redis_cluster").url
    )

    def proxy(config: dict[str, Any], upstream: str) -> ProxyServer:
        return ProxyServer(
            tmp_path_factory.mktemp(f"outcomes-{request.param}"),
            upstream=upstream,
            redis_url=redis_url,
            config=config,
        )

    servers = [
        proxy(MAIN_CONFIG, backend.url),
        proxy(ALT_CONFIG, backend.url),
        proxy(MAIN_CONFIG, refused_upstream),
    ]
    try:
        # Side by side: starting is mostly waiting on the children.
        for server in servers:
            server.launch()
        for server in servers:
            server.ready()
        yield Stack(request.param, backend, *servers)
    finally:
        stop_all(servers)


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """The suite's client, which also reaches the in-process proxies of the memory stack."""
    in_process: list[InProcessProxy] = []
    if "stack" in request.fixturenames:
        proxies = request.getfixturevalue("stack").proxies
        in_process = [p for p in proxies if isinstance(p, InProcessProxy)]
    async with httpx.AsyncClient(
        timeout=30.0, trust_env=False, verify=False, mounts=mounts(in_process)
    ) as http:
        yield http


@pytest.fixture(autouse=True)
def _backend_alive(request: pytest.FixtureRequest, backend: BackendServer) -> Iterator[None]:
    """Revive the backend if an earlier suite broke it; print proxy logs when a test fails.

    No ledger reset: every test counts the charges of its own fresh order ids, which also
    keeps a late charge from an earlier test out of the count.
    """
    backend.revive()
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "stack" in request.fixturenames:
        print_logs(request.getfixturevalue("stack").proxies, 6000)


# --------------------------------------------------------------------------- helpers


def new_key() -> str:
    return f"ord-{uuid.uuid4().hex[:16]}"


def pay_body(order_id: str, amount: int = 1000, **extra: Any) -> bytes:
    return json.dumps({"order_id": order_id, "amount": amount, "currency": "EUR", **extra}).encode()


async def pay(
    client: httpx.AsyncClient,
    proxy: ProxyServer,
    order_id: str,
    headers: dict[str, str] | None = None,
    *,
    amount: int = 1000,
) -> httpx.Response:
    return await client.post(
        f"{proxy.url}/v1/orders/pay",
        content=pay_body(order_id, amount),
        headers={**JSON_HEADERS, **(headers or {})},
    )


async def charge(
    client: httpx.AsyncClient,
    proxy: ProxyServer,
    key: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST /v1/charges with the key in the header and, for counting, as the order id."""
    return await client.post(
        f"{proxy.url}/v1/charges",
        content=pay_body(key),
        headers={**JSON_HEADERS, "Idempotency-Key": key, **(headers or {})},
    )


async def times_charged(client: httpx.AsyncClient, backend: BackendServer, order_id: str) -> int:
    """Backend executions for one order, straight from the backend's ledger."""
    response = await client.get(f"{backend.url}/v1/orders/{order_id}")
    response.raise_for_status()
    return int(response.json()["times_charged"])


async def requests_seen(client: httpx.AsyncClient, backend: BackendServer) -> int:
    """Charge-endpoint requests the backend received (charged or not)."""
    response = await client.get(f"{backend.url}/v1/ledger")
    response.raise_for_status()
    return int(response.json()["requests_seen"])


async def wait_for_charges(
    client: httpx.AsyncClient, backend: BackendServer, order_id: str, expected: int = 1
) -> None:
    """Poll until the backend committed `expected` charges (it commits before its delay)."""
    deadline = time.monotonic() + 15.0
    count = -1
    for _ in range(600):
        count = await times_charged(client, backend, order_id)
        if count >= expected or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.025)
    assert count == expected, f"order {order_id}: {count} charges, expected {expected}"


def assert_problem(response: httpx.Response, status: int, name: str) -> dict[str, Any]:
    """An RFC 9457 answer made by the proxy, as the contract describes it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    assert len(response.headers.get_list("date")) == 1
    assert int(response.headers["content-length"]) == len(response.content)
    document: dict[str, Any] = response.json()
    assert document["type"] == PROBLEM_BASE + name
    assert document["type"].endswith("/" + name)
    assert isinstance(document["title"], str) and document["title"]
    assert document["status"] == status
    return document


def assert_first(response: httpx.Response, status: int = 201) -> None:
    """The backend's own answer, untouched: its cookies and request id, one Date."""
    assert response.status_code == status, response.text
    assert "idempotent-replayed" not in response.headers
    assert response.headers["set-cookie"].startswith("session=")
    assert response.headers["x-request-id"]
    assert response.headers["location"].startswith("/v1/charges/ch_")
    assert response.headers["etag"]
    assert len(response.headers.get_list("date")) == 1


def assert_replay_of(replay: httpx.Response, first: httpx.Response) -> None:
    """A stored response: same status, bytes and allow-listed headers; nothing per-response."""
    assert replay.status_code == first.status_code
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert int(replay.headers["content-length"]) == len(first.content)
    for name in ("content-type", "location", "etag"):
        assert replay.headers.get(name) == first.headers.get(name), name
    assert "set-cookie" not in replay.headers
    # The replay's own request id (this request's log line), never the original's.
    assert replay.headers.get_list("x-request-id") != first.headers.get_list("x-request-id")
    assert len(replay.headers.get_list("x-request-id")) == 1
    assert len(replay.headers.get_list("date")) == 1


async def read_raw(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, bytes]:
    """The response and its body bytes exactly as sent (no gzip decoding)."""
    async with client.stream(method, url, **kwargs) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    return response, raw


# --------------------------------------------------------------------------- first / duplicate


async def test_first_request_gets_the_backend_response_untouched(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    first = await pay(client, stack.main, order)
    assert_first(first)
    assert first.json()["order_id"] == order
    assert await times_charged(client, stack.backend, order) == 1


async def test_duplicate_after_completion_is_replayed(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    first = await pay(client, stack.main, order)
    assert_first(first)
    # Whitespace and key order do not make a retry a different request.
    reordered = json.dumps({"currency": "EUR", "amount": 1000, "order_id": order}, indent=2)
    for body in (pay_body(order), reordered.encode()):
        replay = await client.post(
            f"{stack.main.url}/v1/orders/pay", content=body, headers=JSON_HEADERS
        )
        assert_replay_of(replay, first)
    assert await times_charged(client, stack.backend, order) == 1


async def test_duplicate_in_flight_gets_409_and_key_reuse_422(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    first_task = asyncio.create_task(
        pay(client, stack.main, order, {"X-Sample-Delay": IN_FLIGHT_DELAY})
    )
    await wait_for_charges(client, stack.backend, order)
    assert not first_task.done()

    duplicate = await pay(client, stack.main, order)
    assert_problem(duplicate, 409, "request-in-progress")
    assert int(duplicate.headers["retry-after"]) >= 1
    # The fingerprint is checked before the state: a different payload is 422 even now.
    reused = await pay(client, stack.main, order, amount=999)
    assert_problem(reused, 422, "key-reused")

    first = await first_task
    assert_first(first)
    assert_replay_of(await pay(client, stack.main, order), first)
    assert await times_charged(client, stack.backend, order) == 1


async def test_duplicate_in_flight_waits_for_the_replay_where_the_route_says_wait(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    first_task = asyncio.create_task(
        pay(client, stack.alt, order, {"X-Sample-Delay": IN_FLIGHT_DELAY})
    )
    await wait_for_charges(client, stack.backend, order)
    assert not first_task.done()
    duplicate = await pay(client, stack.alt, order)
    first = await first_task
    assert_first(first)
    assert_replay_of(duplicate, first)
    assert await times_charged(client, stack.backend, order) == 1


async def test_same_key_different_payload_or_endpoint_is_422(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    assert_first(await pay(client, stack.main, order))
    assert_problem(await pay(client, stack.main, order, amount=2000), 422, "key-reused")
    # Same key on another route of the namespace: another request, not a replay.
    assert_problem(await charge(client, stack.main, order), 422, "key-reused")
    assert await times_charged(client, stack.backend, order) == 1


# --------------------------------------------------------------------------- bad keys and bodies


async def test_missing_key_on_required_routes_is_400(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    seen = await requests_seen(client, stack.backend)
    no_order = await client.post(
        f"{stack.main.url}/v1/orders/pay",
        content=b'{"amount": 1000, "currency": "EUR"}',
        headers=JSON_HEADERS,
    )
    assert "order_id" in assert_problem(no_order, 400, "key-missing")["detail"]
    no_header = await client.post(
        f"{stack.main.url}/v1/charges", content=pay_body(new_key()), headers=JSON_HEADERS
    )
    assert "Idempotency-Key" in assert_problem(no_header, 400, "key-missing")["detail"]
    assert await requests_seen(client, stack.backend) == seen


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b'"unterminated',
        b"first, second",
        b'"a", "b"',
        b"k" * 256,
        b"caf\xc3\xa9",
        b"tab\there",
    ],
    ids=["empty", "unterminated", "list", "sf-list", "too-long", "non-ascii", "control"],
)
async def test_malformed_header_key_is_400(
    stack: Stack, client: httpx.AsyncClient, header: bytes
) -> None:
    seen = await requests_seen(client, stack.backend)
    response = await client.post(
        f"{stack.main.url}/v1/charges",
        content=pay_body(new_key()),
        headers=[(b"content-type", b"application/json"), (b"idempotency-key", header)],
    )
    document = assert_problem(response, 400, "key-invalid")
    # Nothing the client sent is echoed back.
    if len(header) > 3:
        assert header.decode("latin-1") not in response.text
    assert "detail" in document
    assert await requests_seen(client, stack.backend) == seen


async def test_other_malformed_keys_are_400(stack: Stack, client: httpx.AsyncClient) -> None:
    seen = await requests_seen(client, stack.backend)
    two_lines = await client.post(
        f"{stack.main.url}/v1/charges",
        content=pay_body(new_key()),
        headers=[
            (b"content-type", b"application/json"),
            (b"idempotency-key", b"one"),
            (b"idempotency-key", b"two"),
        ],
    )
    assert_problem(two_lines, 400, "key-invalid")
    for bad in ("", True, 1.5, {"nested": 1}):
        response = await client.post(
            f"{stack.main.url}/v1/orders/pay",
            content=json.dumps({"order_id": bad, "amount": 1000, "currency": "EUR"}).encode(),
            headers=JSON_HEADERS,
        )
        assert_problem(response, 400, "key-invalid")
    assert await requests_seen(client, stack.backend) == seen


async def test_body_over_the_cap_is_413_and_leaves_no_record(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    url = f"{stack.main.url}/v1/orders/pay"
    small_over = pay_body(order, description="x" * 2048)
    big_over = pay_body(order, description="x" * 512 * 1024)
    for body in (small_over, big_over):
        response = await client.post(url, content=body, headers=JSON_HEADERS)
        assert_problem(response, 413, "body-too-large")

    # Streamed without Content-Length: refused while reading, still before any claim, and
    # the client, still sending, reads the 413 rather than a connection reset.
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big_over), 4096):
            yield big_over[start : start + 4096]

    streamed = await client.post(url, content=chunks(), headers=JSON_HEADERS)
    assert_problem(streamed, 413, "body-too-large")
    assert await times_charged(client, stack.backend, order) == 0
    # No record was claimed for the big bodies: the small one is a first request, not a 422.
    assert_first(await pay(client, stack.main, order))
    assert await times_charged(client, stack.backend, order) == 1


# --------------------------------------------------------------------------- backend answers


async def test_backend_500_after_a_committed_write_is_stored_and_replayed(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    first = await pay(client, stack.main, order, {"X-Sample-Status": "500"})
    assert_first(first, 500)
    assert first.json()["order_id"] == order
    replay = await pay(client, stack.main, order)
    assert_replay_of(replay, first)
    assert await times_charged(client, stack.backend, order) == 1


async def test_default_release_status_429_frees_the_key(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    rejected = await pay(client, stack.main, order, {"X-Sample-Reject": "429"})
    assert rejected.status_code == 429
    assert rejected.headers["retry-after"] == "1"
    assert "idempotent-replayed" not in rejected.headers
    assert await times_charged(client, stack.backend, order) == 0
    retry = await pay(client, stack.main, order)
    assert_first(retry)
    assert await times_charged(client, stack.backend, order) == 1


async def test_route_release_status_402_frees_the_key_but_not_elsewhere(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    key = new_key()
    declined = await charge(client, stack.main, key, {"X-Sample-Reject": "402"})
    assert declined.status_code == 402
    assert "idempotent-replayed" not in declined.headers
    retry = await charge(client, stack.main, key)
    assert_first(retry)
    assert await times_charged(client, stack.backend, key) == 1

    # On a route with the default release statuses, a 402 is a final answer: stored.
    order = new_key()
    first = await pay(client, stack.main, order, {"X-Sample-Reject": "402"})
    assert first.status_code == 402
    replay = await pay(client, stack.main, order)
    assert replay.status_code == 402
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert await times_charged(client, stack.backend, order) == 0


# --------------------------------------------------------------------------- ambiguous failures


async def test_timeout_after_sending_is_504_outcome_unknown_for_everyone(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    key = new_key()
    first = await charge(client, stack.alt, key, {"X-Sample-Delay": "1"})
    assert_problem(first, 504, "outcome-unknown")
    assert "idempotent-replayed" not in first.headers
    # The backend did get it (it commits, then sleeps past the proxy's timeout).
    await wait_for_charges(client, stack.backend, key)
    duplicate = await charge(client, stack.alt, key)
    assert_problem(duplicate, 504, "outcome-unknown")
    assert duplicate.headers["idempotent-replayed"] == "true"
    assert await times_charged(client, stack.backend, key) == 1


async def test_reset_after_sending_is_502_outcome_unknown(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    first = await pay(client, stack.main, order, {"X-Sample-Drop": "after"})
    assert_problem(first, 502, "outcome-unknown")
    duplicate = await pay(client, stack.main, order)
    assert_problem(duplicate, 502, "outcome-unknown")
    assert duplicate.headers["idempotent-replayed"] == "true"
    assert await times_charged(client, stack.backend, order) == 1


async def test_connection_refused_is_502_upstream_unreachable_and_frees_the_key(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    for _ in range(2):  # a held or UNKNOWN record would answer 409/502-unknown the second time
        response = await pay(client, stack.refused, order)
        assert_problem(response, 502, "upstream-unreachable")
        assert "idempotent-replayed" not in response.headers
    shared = stack.store != "memory"
    if shared:
        # Same store, same route namespace: the released key executes through a proxy
        # whose backend is up.
        assert_first(await pay(client, stack.main, order))
    assert await times_charged(client, stack.backend, order) == (1 if shared else 0)


async def test_store_down_before_sending_is_503_or_fails_open_where_configured(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory()
    open_charges = {**CHARGES, "failure_mode": "open", "max_stored_response": "1MiB"}
    proxy = proxy_factory(backend.url, redis.url, config={"routes": [PAY, open_charges]})
    assert_first(await pay(client, proxy, new_key()))  # the store works before it goes down
    redis.stop()

    order = new_key()
    refused = await pay(client, proxy, order)
    assert_problem(refused, 503, "store-unavailable")
    assert int(refused.headers["retry-after"]) >= 1
    assert await times_charged(client, backend, order) == 0

    # failure_mode: open forwards without a record (so a retry executes again: the price).
    key = new_key()
    for expected in (1, 2):
        forwarded = await charge(client, proxy, key)
        assert_first(forwarded)
        assert await times_charged(client, backend, key) == expected


# --------------------------------------------------------------------------- big responses


async def test_response_over_the_stored_cap_goes_to_the_first_client_only(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    key = new_key()
    first = await charge(client, stack.main, key)
    assert_first(first)
    assert first.json()["order_id"] == key
    assert int(first.headers["content-length"]) == len(first.content) > 64
    assert_problem(await charge(client, stack.main, key), 409, "replay-unavailable")
    assert await times_charged(client, stack.backend, key) == 1

    # A body far over the cap is streamed through to the first client in full.
    body = bytes(range(256)) * 1024
    headers = {"Idempotency-Key": new_key(), "Content-Type": "application/octet-stream"}
    echoed = await client.post(f"{stack.main.url}/v1/echo", content=body, headers=headers)
    assert echoed.status_code == 200
    assert echoed.content == body
    duplicate = await client.post(f"{stack.main.url}/v1/echo", content=body, headers=headers)
    assert_problem(duplicate, 409, "replay-unavailable")


# --------------------------------------------------------------------------- disconnects


async def test_client_disconnect_mid_request_does_not_stop_the_forward(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    task = asyncio.create_task(pay(client, stack.main, order, {"X-Sample-Delay": "1"}))
    await wait_for_charges(client, stack.backend, order)
    task.cancel()  # the client hangs up while the backend is still working
    with contextlib.suppress(asyncio.CancelledError):
        await task

    retry: httpx.Response | None = None
    deadline = time.monotonic() + 20.0
    for _ in range(200):
        retry = await pay(client, stack.main, order)
        if retry.status_code != 409 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert retry is not None
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["order_id"] == order
    assert await times_charged(client, stack.backend, order) == 1


# --------------------------------------------------------------------------- pass-through


async def test_unprotected_methods_and_paths_stream_straight_through(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    assert_first(await pay(client, stack.main, order))
    for _ in range(2):
        looked_up = await client.get(f"{stack.main.url}/v1/orders/{order}")
        assert looked_up.status_code == 200
        assert looked_up.json()["times_charged"] == 1
        assert "idempotent-replayed" not in looked_up.headers
    # PUT is on no route: every call reaches the backend, even with a key.
    headers = {"Idempotency-Key": new_key(), "Content-Type": "text/plain"}
    for body in (b"one", b"two"):
        put = await client.put(f"{stack.main.url}/v1/echo", content=body, headers=headers)
        assert put.status_code == 200
        assert put.content == body
        assert "idempotent-replayed" not in put.headers
    streamed = await client.get(f"{stack.main.url}/v1/stream?chunks=5")
    assert streamed.status_code == 200
    assert streamed.text == "".join(f"chunk {i}\n" for i in range(5))
    assert "idempotent-replayed" not in streamed.headers


# --------------------------------------------------------------------------- tenants, encodings


async def test_tenants_never_share_records(stack: Stack, client: httpx.AsyncClient) -> None:
    order = new_key()
    alice = await pay(client, stack.main, order, {"X-Tenant-Id": "alice"})
    bob = await pay(client, stack.main, order, {"X-Tenant-Id": "bob"})
    assert_first(alice)
    assert_first(bob)
    assert alice.json()["charge_id"] != bob.json()["charge_id"]
    assert await times_charged(client, stack.backend, order) == 2
    for tenant, first in (("alice", alice), ("bob", bob)):
        replay = await pay(client, stack.main, order, {"X-Tenant-Id": tenant})
        assert_replay_of(replay, first)
    # No tenant header is the "default" tenant: a third, separate record.
    assert_first(await pay(client, stack.main, order))
    assert await times_charged(client, stack.backend, order) == 3


async def test_gzip_responses_are_replayed_byte_for_byte(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    order = new_key()
    url = f"{stack.main.url}/v1/orders/pay"
    headers = {**JSON_HEADERS, "X-Sample-Gzip": "1", "Accept-Encoding": "gzip"}
    first, first_raw = await read_raw(client, "POST", url, content=pay_body(order), headers=headers)
    assert first.status_code == 201
    assert first.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(first_raw))["order_id"] == order
    replay, replay_raw = await read_raw(
        client, "POST", url, content=pay_body(order), headers=headers
    )
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["content-encoding"] == "gzip"
    assert replay.headers["etag"] == first.headers["etag"]
    assert replay_raw == first_raw
    assert int(replay.headers["content-length"]) == len(first_raw)
    assert await times_charged(client, stack.backend, order) == 1
