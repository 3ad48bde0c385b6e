"""`store.wait_replicas`: WAIT for replica acknowledgement after claim and completion.

With a healthy replica, a record is on the replica by the time the client has its answer.
With the replica paused or stopped, WAIT times out after `store.wait_timeout` and the proxy
proceeds (availability over durability), counting the shortfall in
`RedisStore.replica_shortfalls`. A failover to a replica that missed those writes loses
them: the last test shows the second charge that follows, the residual risk that
docs/guarantees.md states and that a unique constraint in the payment system closes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from harness import (
    HOST,
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    HarnessError,
    ProxyFactory,
    RedisFactory,
    RedisServer,
    body_of,
    pay_config,
    storage_key,
)

from proxy.config import StoreSettings
from proxy.records import ClaimKind, StoredResponse
from proxy.store import StoreUnavailable
from proxy.store.redis import RedisStore

# Under the store's command timeout (0.5 s): WAIT must answer before the socket gives up.
WAIT_TIMEOUT = 0.3


def config(wait_replicas: int = 1) -> dict[str, Any]:
    return pay_config(
        store={"wait_replicas": wait_replicas, "wait_timeout": f"{int(WAIT_TIMEOUT * 1000)}ms"}
    )


def replicated_pair(redis_factory: RedisFactory) -> tuple[RedisServer, RedisServer]:
    """A master with AOF and a replica of it, in sync."""
    # Diskless full sync waits 5 s by default for more replicas to join; there is one.
    master = redis_factory(appendonly=True, args=["--repl-diskless-sync-delay", "0"])
    replica = redis_factory(appendonly=True, args=["--replicaof", HOST, str(master.port)])
    deadline = time.monotonic() + 15
    for _ in range(150):  # bounded
        with replica.client() as client:
            if client.info("replication").get("master_link_status") == "up":
                return master, replica
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise HarnessError("replica did not sync with its master")


def state_on(server: RedisServer, order: str) -> str | None:
    with server.client() as client:
        value = client.hget(storage_key(order), "state")
    return value.decode() if value is not None else None


async def test_records_are_on_the_replica_when_the_client_has_the_answer(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    master, replica = replicated_pair(redis_factory)
    proxy = proxy_factory(ledger_backend.url, master.url, config())
    orders = [f"wait-ok-{i}" for i in range(10)]
    states = []
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        for order in orders:
            response = await http.post(
                proxy.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
            )
            assert response.status_code == 201
            # Read the replica directly, right after the answer: WAIT already saw it there.
            states.append(state_on(replica, order))
    assert states == ["COMPLETED"] * len(orders)
    assert all(ledger_backend.ledger()["orders"][o] == 1 for o in orders)

    # In process: no shortfall while the replica keeps up.
    store = RedisStore(StoreSettings(url=master.url, wait_replicas=1, wait_timeout=WAIT_TIMEOUT))
    await store.start()
    try:
        key = storage_key("wait-ok-store")
        assert (await store.claim(key, "t", "fp", 10_000, 60_000)).kind is ClaimKind.CLAIMED
        assert await store.mark_sent(key, "t", 10_000)
        assert await store.complete(key, "t", StoredResponse(201))
        assert store.replica_shortfalls == 0
    finally:
        await store.close()


@pytest.mark.chaos
async def test_paused_replica_the_proxy_proceeds_and_counts_a_shortfall(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    master, replica = replicated_pair(redis_factory)
    proxy = proxy_factory(ledger_backend.url, master.url, config())
    store = RedisStore(StoreSettings(url=master.url, wait_replicas=1, wait_timeout=WAIT_TIMEOUT))
    await store.start()
    order = "wait-paused"
    replica.pause()
    try:
        # In process: claim and completion each wait out the WAIT timeout, then proceed.
        key = storage_key("wait-paused-store")
        assert (await store.claim(key, "t", "fp", 10_000, 60_000)).kind is ClaimKind.CLAIMED
        assert store.replica_shortfalls == 1
        # SENT is WAITed too: it is the write a failover must not lose before the send.
        assert await store.mark_sent(key, "t", 10_000)
        assert store.replica_shortfalls == 2
        assert await store.complete(key, "t", StoredResponse(201))
        assert store.replica_shortfalls == 3

        # Through the proxy: the payment goes through and duplicates replay from the master.
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
            first = await http.post(
                proxy.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
            )
            again = await http.post(
                proxy.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
            )
        assert first.status_code == 201
        assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
        assert state_on(master, order) == "COMPLETED"
    finally:
        replica.resume()
        await store.close()
    # The stream waited in the replica's socket: once it runs again it catches up.
    for _ in range(100):  # bounded
        if state_on(replica, order) == "COMPLETED":
            break
        await asyncio.sleep(0.1)
    assert state_on(replica, order) == "COMPLETED"
    assert ledger_backend.ledger()["orders"][order] == 1


@pytest.mark.chaos
async def test_wait_longer_than_the_command_timeout_fails_closed(
    redis_factory: RedisFactory,
) -> None:
    """A WAIT that outlasts the socket timeout is a store error: 503, never a send."""
    master, replica = replicated_pair(redis_factory)
    store = RedisStore(
        StoreSettings(url=master.url, timeout=0.2, retries=0, wait_replicas=1, wait_timeout=1.0)
    )
    await store.start()
    replica.pause()
    try:
        with pytest.raises(StoreUnavailable):
            await store.claim(storage_key("wait-too-long"), "t", "fp", 10_000, 60_000)
    finally:
        replica.resume()
        await store.close()


@pytest.mark.chaos
async def test_failover_to_a_replica_that_missed_the_write_executes_again(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """The residual risk, shown: WAIT narrows the window, it does not close it.

    The replica is down, so WAIT falls short and the proxy proceeds; the master then dies
    and the stale replica is promoted. The acknowledged record is gone, and the client's
    retry is charged a second time. Only the payment system's own unique constraint on
    the order id can stop this one.
    """
    master, replica = replicated_pair(redis_factory)
    proxy = proxy_factory(ledger_backend.url, master.url, config())
    safe, lost = "wait-failover-safe", "wait-failover-lost"
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        first_safe = await http.post(
            proxy.url + PAY_PATH, content=body_of(safe), headers=JSON_HEADERS
        )
        replica.stop()
        first_lost = await http.post(
            proxy.url + PAY_PATH, content=body_of(lost), headers=JSON_HEADERS
        )
        master.kill()
        proxy.kill()
        # Failover: the replica comes back (with the data it had) and is promoted.
        replica.start()
        with replica.client() as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
        promoted = proxy_factory(ledger_backend.url, replica.url, config(wait_replicas=0))
        retry_safe = await http.post(
            promoted.url + PAY_PATH, content=body_of(safe), headers=JSON_HEADERS
        )
        retry_lost = await http.post(
            promoted.url + PAY_PATH, content=body_of(lost), headers=JSON_HEADERS
        )
    book = ledger_backend.ledger()
    print(f"\n[failover to a stale replica] charged: {book['orders']}")

    assert first_safe.status_code == 201 and first_lost.status_code == 201
    # Written while the replica kept up: it survived the failover and replays.
    assert retry_safe.status_code == 201 and retry_safe.headers["idempotent-replayed"] == "true"
    assert book["orders"][safe] == 1
    # Acknowledged with a WAIT shortfall, lost with the master: executed again.
    assert "idempotent-replayed" not in retry_lost.headers
    assert book["orders"][lost] == 2
