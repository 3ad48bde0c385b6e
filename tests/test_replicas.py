"""Several proxy processes sharing one Redis in front of one backend.

The guarantee under test is the product's reason to exist: however many replicas a
client's duplicates land on, the backend executes the request once. The backend's
ledger is the witness; Redis is read directly to check the record's state.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from harness import (
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyServer,
    RedisServer,
    charges_route,
    fingerprint_of,
    pay_route,
    print_logs,
    storage_key,
)

from proxy.config import StoreSettings
from proxy.records import ClaimKind, Record
from proxy.store.redis import RedisStore

pytestmark = pytest.mark.replicas

REPLICAS = 3
BURST = 60
# The lease is short so that tests can outlive it, but not so short that a busy
# two-core machine delays a renewal past it (renewals run every third of a lease).
LEASE = "1s"
CONFIG: dict[str, Any] = {
    "routes": [
        pay_route(in_flight="reject", lease=LEASE),
        charges_route(in_flight="wait", wait_timeout="30s"),
    ]
}


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, backend: BackendServer
) -> Iterator[list[ProxyServer]]:
    redis_server.revive()
    servers = [
        ProxyServer(
            tmp_path_factory.mktemp("replica"),
            upstream=backend.url,
            redis_url=redis_server.url,
            config=CONFIG,
        )
        for _ in range(REPLICAS)
    ]
    try:
        with ThreadPoolExecutor(REPLICAS) as pool:  # start-up is mostly imports: overlap them
            for future in [pool.submit(server.start) for server in servers]:
                future.result()
        yield servers
    finally:
        with ThreadPoolExecutor(REPLICAS) as pool:
            list(pool.map(lambda server: server.stop(), servers))


@pytest.fixture(autouse=True)
def _backend_alive(request: pytest.FixtureRequest, backend: BackendServer) -> Iterator[None]:
    """Revive the backend if an earlier suite broke it; print replica logs when a test fails.

    No ledger reset: each test counts the charges of its own fresh order ids.
    """
    backend.revive()
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "replicas" in request.fixturenames:
        print_logs(request.getfixturevalue("replicas"), 6000)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=BURST + 10, max_keepalive_connections=BURST + 10)
    # Plain HTTP to 127.0.0.1 only: verify=False skips loading a CA bundle per client.
    async with httpx.AsyncClient(
        timeout=60.0, trust_env=False, verify=False, limits=limits
    ) as http:
        yield http


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[RedisStore]:
    """The proxy's own Redis store, used by the test to read and plant records."""
    store = RedisStore(StoreSettings(url=url))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def new_key() -> str:
    return f"ord-{uuid.uuid4().hex[:16]}"


def pay_body(order_id: str) -> bytes:
    return json.dumps({"order_id": order_id, "amount": 1500, "currency": "EUR"}).encode()


async def pay(
    client: httpx.AsyncClient,
    proxy: ProxyServer,
    order_id: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.post(
        proxy.url + PAY_PATH,
        content=pay_body(order_id),
        headers={**JSON_HEADERS, **(headers or {})},
    )


async def times_charged(client: httpx.AsyncClient, backend: BackendServer, order_id: str) -> int:
    response = await client.get(f"{backend.url}/v1/orders/{order_id}")
    response.raise_for_status()
    return int(response.json()["times_charged"])


async def wait_for_charge(client: httpx.AsyncClient, backend: BackendServer, order_id: str) -> None:
    """Poll until the backend committed the charge (it commits before its delay)."""
    deadline = time.monotonic() + 15.0
    for _ in range(600):
        if await times_charged(client, backend, order_id) >= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.025)
    assert await times_charged(client, backend, order_id) == 1


async def wait_for_record(store: RedisStore, key: str, *, lease_expired: bool = False) -> Record:
    """Poll Redis until the record exists (and, if asked, its lease deadline has passed)."""
    deadline = time.monotonic() + 15.0
    record = None
    for _ in range(600):
        record = await store.get(key)
        if record is not None and (
            not lease_expired
            or (record.lease_remaining_ms is not None and record.lease_remaining_ms <= 0)
        ):
            return record
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.025)
    raise AssertionError(f"record not in the expected shape in time: {record}")


def assert_outcome_unknown(response: httpx.Response) -> None:
    assert response.status_code == 502, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith("/outcome-unknown")
    assert response.headers["idempotent-replayed"] == "true"


# --------------------------------------------------------------------------- bursts


async def test_burst_over_replicas_executes_once_and_others_get_409(
    replicas: list[ProxyServer], backend: BackendServer, client: httpx.AsyncClient
) -> None:
    order = new_key()
    responses = await asyncio.gather(
        *(
            pay(client, replicas[i % REPLICAS], order, {"X-Sample-Delay": "0.5"})
            for i in range(BURST)
        )
    )
    statuses = sorted({r.status_code for r in responses})
    assert set(statuses) <= {201, 409}, [
        r.text for r in responses if r.status_code not in (201, 409)
    ]
    firsts = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    assert len(firsts) == 1
    # Latecomers may arrive after completion and get the replay: the same bytes.
    assert {r.content for r in responses if r.status_code == 201} == {firsts[0].content}
    for conflict in (r for r in responses if r.status_code == 409):
        assert conflict.json()["type"].endswith("/request-in-progress")
        assert int(conflict.headers["retry-after"]) >= 1
    assert await times_charged(client, backend, order) == 1


async def test_burst_over_replicas_with_wait_gives_everyone_the_same_201(
    replicas: list[ProxyServer], backend: BackendServer, client: httpx.AsyncClient
) -> None:
    key = new_key()
    headers = {**JSON_HEADERS, "Idempotency-Key": key, "X-Sample-Delay": "0.5"}
    responses = await asyncio.gather(
        *(
            client.post(
                replicas[i % REPLICAS].url + "/v1/charges", content=pay_body(key), headers=headers
            )
            for i in range(BURST)
        )
    )
    assert [r.status_code for r in responses] == [201] * BURST, {r.text for r in responses}
    assert len({r.content for r in responses}) == 1
    replayed = [r.headers.get("idempotent-replayed") for r in responses]
    assert replayed.count(None) == 1
    assert replayed.count("true") == BURST - 1
    assert await times_charged(client, backend, key) == 1


# --------------------------------------------------------------------------- leases


async def test_lease_renewal_keeps_a_slow_owner_alive_across_replicas(
    replicas: list[ProxyServer], backend: BackendServer, client: httpx.AsyncClient
) -> None:
    order = new_key()
    started = time.monotonic()
    first_task = asyncio.create_task(pay(client, replicas[0], order, {"X-Sample-Delay": "2"}))
    await wait_for_charge(client, backend, order)

    last_conflict = started
    for i in range(200):  # until the first answers; bounded in count and by its 2 s delay
        if first_task.done():
            break
        duplicate = await pay(client, replicas[i % REPLICAS], order)
        if duplicate.status_code == 201:  # it completed between the check and the duplicate
            assert duplicate.headers["idempotent-replayed"] == "true"
            break
        assert duplicate.status_code == 409, duplicate.text
        last_conflict = time.monotonic()
        await asyncio.sleep(0.15)
    first = await first_task
    assert first.status_code == 201
    # The duplicates did span more than one lease: renewal, not luck, kept the owner alive.
    assert last_conflict - started > 1.0
    for replica in replicas:
        replay = await pay(client, replica, order)
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content
    assert await times_charged(client, backend, order) == 1


async def test_claimed_but_never_sent_record_is_taken_over_after_its_lease(
    replicas: list[ProxyServer],
    redis_server: RedisServer,
    backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    order = new_key()
    key = storage_key(order)
    async with open_store(redis_server.url) as store:
        # An owner that claimed, then vanished before sending anything.
        claim = await store.claim(
            key, "vanished-owner", fingerprint_of(pay_body(order)), 60_000, 600_000
        )
        assert claim.kind is ClaimKind.CLAIMED
        alive = await pay(client, replicas[1], order)
        assert alive.status_code == 409  # its lease still holds: it may yet send
        assert await times_charged(client, backend, order) == 0

        # Let the vanished owner's lease run out (the owner's token is the only way to move it).
        assert await store.renew(key, "vanished-owner", 1)
        await wait_for_record(store, key, lease_expired=True)
        taken = await pay(client, replicas[2], order)
        assert taken.status_code == 201, taken.text
        assert "idempotent-replayed" not in taken.headers
        record = await store.get(key)
        assert record is not None
        assert record.state == "COMPLETED"
        assert record.fence == 2
        assert record.token != "vanished-owner"

        # The vanished owner, were it to come back, is fenced at every step.
        assert not await store.mark_sent(key, "vanished-owner", 1000)
        assert not await store.renew(key, "vanished-owner", 1000)
        assert not await store.release(key, "vanished-owner")
    replay = await pay(client, replicas[0], order)
    assert replay.status_code == 201
    assert replay.content == taken.content
    assert await times_charged(client, backend, order) == 1


async def test_stale_owner_is_fenced_after_its_sent_lease_expired(
    replicas: list[ProxyServer],
    redis_server: RedisServer,
    backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    owner, other, third = replicas
    order = new_key()
    key = storage_key(order)
    first_task = asyncio.create_task(pay(client, owner, order, {"X-Sample-Delay": "1"}))
    async with open_store(redis_server.url) as store:
        await wait_for_charge(client, backend, order)  # the record is SENT by now
        owner.pause()  # a long GC pause / frozen VM: no renewals, no completion
        try:
            await wait_for_record(store, key, lease_expired=True)
            # SENT and the owner looks dead: the backend may have executed it.
            assert_outcome_unknown(await pay(client, other, order))
            turned = await store.get(key)
            assert turned is not None
            assert turned.state == "UNKNOWN"
        finally:
            owner.resume()

        # The stale owner wakes up with the backend's answer; its client gets it...
        first = await first_task
        assert first.status_code == 201
        assert first.json()["order_id"] == order
        # ...but its completion is fenced: the UNKNOWN record stays for an operator.
        for replica in (third, owner, other):
            assert_outcome_unknown(await pay(client, replica, order))
        record = await store.get(key)
        assert record is not None
        assert record.state == "UNKNOWN"
        assert record.reason == "owner-lost"
    assert await times_charged(client, backend, order) == 1
