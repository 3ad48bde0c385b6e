"""Redis Cluster: the store's semantics and the proxy's behaviours on three masters.

Every record is one hash under a hash-tagged key (`idem:{<hash>}`), so each Lua script
touches one slot; records of different keys spread over the slots of all masters.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from harness import (
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyFactory,
    RedisCluster,
    body_of,
    pay_config,
    problem_name,
    storage_key,
)
from redis.crc import key_slot

from proxy.config import StoreSettings
from proxy.records import ClaimKind, StoredResponse
from proxy.store.guard import canary_keys
from proxy.store.redis import RedisStore

KEYS = 60  # enough distinct keys to land on every master


def response(tag: str) -> StoredResponse:
    return StoredResponse(
        201, ((b"content-type", b"application/json"), (b"location", tag.encode())), b'{"ok":1}'
    )


@pytest.fixture
async def cluster_store(redis_cluster: RedisCluster) -> AsyncIterator[RedisStore]:
    store = RedisStore(StoreSettings(url=redis_cluster.url))
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def masters_of(cluster: RedisCluster, names: list[str]) -> Counter[str]:
    """Which master holds each key (host:port), from the cluster's own slot map."""
    with cluster.client() as client:
        return Counter(client.get_node_from_key(name).name for name in names)


async def test_store_semantics_on_every_master(
    redis_cluster: RedisCluster, cluster_store: RedisStore
) -> None:
    run = secrets.token_hex(4)
    names = [storage_key(f"cluster-{run}-{i}") for i in range(KEYS)]
    spread = masters_of(redis_cluster, names)
    assert len(spread) == 3, spread  # the hash tags really spread over all masters
    store = cluster_store

    async def story(key: str) -> dict[str, Any]:
        """claim, duplicate, mismatch, SENT, complete, replay, for one key."""
        first = await store.claim(key, "owner", "fp", 10_000, 60_000)
        retried = await store.claim(key, "owner", "fp", 10_000, 60_000)
        duplicate = await store.claim(key, "other", "fp", 10_000, 60_000)
        mismatch = await store.claim(key, "other", "fp-other", 10_000, 60_000)
        sent = await store.mark_sent(key, "owner", 10_000)
        renewed = await store.renew(key, "owner", 10_000)
        stale = await store.complete(key, "other", response("stale"))
        completed = await store.complete(key, "owner", response(key))
        again = await store.complete(key, "owner", response(key))  # a retried call
        replay = await store.claim(key, "late", "fp", 10_000, 60_000)
        record = await store.get(key)
        return {
            "first": first.kind,
            "fence": first.fence,
            "retried": retried.kind,
            "duplicate": duplicate.kind,
            "mismatch": mismatch.kind,
            "writes": (sent, renewed, stale, completed, again),
            "replay": replay,
            "record": record,
        }

    results = await asyncio.gather(*(story(key) for key in names))
    for key, result in zip(names, results, strict=True):
        assert result["first"] is ClaimKind.CLAIMED and result["fence"] == 1
        assert result["retried"] is ClaimKind.CLAIMED  # its own retried claim is not in flight
        assert result["duplicate"] is ClaimKind.IN_FLIGHT
        assert result["mismatch"] is ClaimKind.MISMATCH
        assert result["writes"] == (True, True, False, True, True)
        replay = result["replay"]
        assert replay.kind is ClaimKind.COMPLETED
        assert replay.response is not None
        assert replay.response.status == 201
        assert replay.response.body == b'{"ok":1}'
        assert dict(replay.response.headers)[b"location"] == key.encode()
        assert 0 < replay.ttl_ms <= 60_000
        record = result["record"]
        assert record is not None and record.state == "COMPLETED" and record.token == "owner"


async def test_take_over_unknown_and_release_on_every_master(
    redis_cluster: RedisCluster, cluster_store: RedisStore
) -> None:
    run = secrets.token_hex(4)
    claimed = [storage_key(f"cluster-claimed-{run}-{i}") for i in range(KEYS // 2)]
    sent = [storage_key(f"cluster-sent-{run}-{i}") for i in range(KEYS // 2)]
    assert len(masters_of(redis_cluster, claimed + sent)) == 3
    store = cluster_store

    # Owners with a 1 ms lease: dead as soon as the lease passes.
    for key in claimed:
        assert (await store.claim(key, "dead", "fp", 1, 60_000)).kind is ClaimKind.CLAIMED
    for key in sent:
        assert (await store.claim(key, "dead", "fp", 1, 60_000)).kind is ClaimKind.CLAIMED
        assert await store.mark_sent(key, "dead", 1)
    await asyncio.sleep(0.05)

    takeovers = await asyncio.gather(
        *(store.claim(key, "heir", "fp", 10_000, 60_000) for key in claimed)
    )
    unknowns = await asyncio.gather(
        *(store.claim(key, "heir", "fp", 10_000, 60_000) for key in sent)
    )
    # CLAIMED + expired: nothing was sent, so a new owner takes over with a higher fence.
    assert all(c.kind is ClaimKind.CLAIMED and c.fence == 2 for c in takeovers)
    # SENT + expired: the old owner may have sent; never again, UNKNOWN.
    assert all(c.kind is ClaimKind.UNKNOWN and c.reason == "owner-lost" for c in unknowns)
    # The old owner is fenced everywhere.
    assert not any(await asyncio.gather(*(store.mark_sent(k, "dead", 1000) for k in claimed)))
    assert not any(await asyncio.gather(*(store.complete(k, "dead", response("x")) for k in sent)))
    # The heir releases (its backend refused the connection): the key is free again.
    assert all(await asyncio.gather(*(store.release(k, "heir") for k in claimed)))
    assert all(r is None for r in await asyncio.gather(*(store.get(k) for k in claimed)))
    fresh = await asyncio.gather(*(store.claim(k, "next", "fp", 10_000, 60_000) for k in claimed))
    assert all(c.kind is ClaimKind.CLAIMED and c.fence == 1 for c in fresh)
    # The operator's tools work per slot too.
    assert await store.resolve(sent[0], response("resolved"), False)
    assert await store.discard(sent[1], False)
    assert (await store.claim(sent[0], "x", "fp", 10_000, 60_000)).kind is ClaimKind.COMPLETED
    assert (await store.claim(sent[1], "x", "fp", 10_000, 60_000)).kind is ClaimKind.CLAIMED


async def test_proxy_on_cluster_end_to_end(
    redis_cluster: RedisCluster, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    proxies = [proxy_factory(ledger_backend.url, redis_cluster.url, pay_config()) for _ in range(2)]
    run = secrets.token_hex(4)
    a, b = proxies

    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:

        async def pay(
            proxy_url: str, order: str, amount: int = 1250, **faults: str
        ) -> httpx.Response:
            return await http.post(
                proxy_url + PAY_PATH,
                content=body_of(order, amount),
                headers={**JSON_HEADERS, **faults},
            )

        # First request, then replays on both replicas.
        first_order = f"e2e-{run}-first"
        first = await pay(a.url, first_order)
        replays = [await pay(a.url, first_order), await pay(b.url, first_order)]

        # In flight: the backend holds the answer; a duplicate on the other replica.
        slow_order = f"e2e-{run}-slow"
        slow = asyncio.ensure_future(pay(a.url, slow_order, **{"X-Sample-Delay": "1.5"}))
        for _ in range(100):  # bounded: until the backend has the request
            if (await http.get(ledger_backend.url + f"/v1/orders/{slow_order}")).json()[
                "times_charged"
            ]:
                break
            await asyncio.sleep(0.05)
        in_flight = await pay(b.url, slow_order)
        slow_answer = await slow

        # Same key, other payload.
        reused = await pay(b.url, first_order, amount=999)

        # A release status (the backend refused without charging): the retry executes.
        limited_order = f"e2e-{run}-limited"
        limited = await pay(a.url, limited_order, **{"X-Sample-Reject": "429"})
        retried = await pay(b.url, limited_order)

        # A burst of keys on all slots, two copies each on two replicas.
        burst_orders = [f"e2e-{run}-burst-{i}" for i in range(20)]
        burst = await asyncio.gather(
            *(pay(p.url, o) for o in burst_orders for p in proxies), return_exceptions=False
        )
        ledger = (await http.get(ledger_backend.url + "/v1/ledger")).json()

    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    for replay in replays:
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == first.content
        assert replay.headers["location"] == first.headers["location"]
        assert "set-cookie" not in replay.headers
    assert in_flight.status_code == 409 and problem_name(in_flight) == "request-in-progress"
    assert int(in_flight.headers["retry-after"]) >= 1
    assert slow_answer.status_code == 201
    assert reused.status_code == 422 and problem_name(reused) == "key-reused"
    assert limited.status_code == 429
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
    statuses = Counter(
        (r.status_code, r.headers.get("idempotent-replayed") == "true") for r in burst
    )
    # Each pair raced: one executed; the other replayed or saw it in flight.
    assert statuses[(201, False)] == len(burst_orders)
    assert set(statuses) <= {(201, False), (201, True), (409, False)}
    orders = ledger["orders"]
    assert ledger["double_charged_count"] == 0
    assert orders[first_order] == 1
    assert orders[slow_order] == 1
    assert orders[limited_order] == 1
    assert all(orders[o] == 1 for o in burst_orders)
    assert ledger["requests_seen"] == 4 + len(burst_orders)  # first, slow, 429, retry, burst


async def test_one_canary_per_master(
    redis_cluster: RedisCluster, cluster_store: RedisStore
) -> None:
    keys = cluster_store.canaries()
    assert sorted(masters_of(redis_cluster, keys).values()) == [1, 1, 1], keys
    assert "idem:{canary}" in keys  # the name a single node and older versions watch
    await cluster_store.check_canary()
    with redis_cluster.client() as admin:
        assert all(admin.get(key) for key in keys)
    assert not cluster_store.watch.active


def test_canaries_follow_the_topology() -> None:
    """Chosen from the slot map alone: one per master, the same names for the same
    partition of slots, whatever the masters are called."""

    def choose(owners: dict[int, str]) -> dict[str, str]:
        chosen = canary_keys(set(owners.values()), lambda key: owners[key_slot(key.encode())])
        assert sorted(chosen) == sorted(set(owners.values()))
        assert all(owners[key_slot(key.encode())] == master for master, key in chosen.items())
        return chosen

    three = {s: ("a" if s < 5461 else "b" if s < 10923 else "c") for s in range(16384)}
    chosen = choose(three)
    assert "idem:{canary}" in chosen.values()
    # A failover: `a` replaced by its replica `a2` with the same slots keeps the name, so
    # an empty replica's missing canary reads as a loss, not as a first sight.
    failover = {s: ("a2" if m == "a" else m) for s, m in three.items()}
    assert choose(failover) == {("a2" if m == "a" else m): k for m, k in chosen.items()}
    # `a`'s canary slot moves to `c` (a resharding); a fourth master with slots of its
    # own; a master that left.
    moved = dict(three)
    moved[key_slot(chosen["a"].encode())] = "c"
    choose(moved)
    four = {**moved, **{s: "d" for s in range(16000, 16384)}}
    choose(four)
    choose({s: ("b" if m == "c" else m) for s, m in four.items()})
    # A master with one slot only still gets one.
    choose({**three, 42: "e"})


async def test_a_flushed_master_without_the_first_canary_is_a_data_loss(
    tmp_path_factory: pytest.TempPathFactory,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    """One master loses its data (FLUSHALL, or a failover to an empty replica) while a
    request whose record lives there is in flight. The loss must be seen on that master,
    not only on the one that holds `idem:{canary}`: a duplicate is refused (503), never
    executed again."""
    # A private cluster: flushing a master of the session's cluster would reach other tests.
    with RedisCluster(tmp_path_factory.mktemp("cluster-flush")) as cluster:
        interval = 0.2
        config = pay_config(
            store={"canary_interval": f"{interval}s"},
            defaults={"lease": "2s", "upstream_timeout": "20s"},
        )
        proxy = proxy_factory(ledger_backend.url, cluster.url, config)
        run = secrets.token_hex(4)
        with cluster.client() as admin:
            canary_master = admin.get_node_from_key("idem:{canary}").name
            order = next(
                o
                for o in (f"flush-{run}-{i}" for i in range(200))
                if admin.get_node_from_key(storage_key(o)).name != canary_master
            )
            record_master = admin.get_node_from_key(storage_key(order))
        url = proxy.url + PAY_PATH
        slow = asyncio.ensure_future(
            client.post(
                url, content=body_of(order), headers={**JSON_HEADERS, "X-Sample-Delay": "4"}
            )
        )
        for _ in range(100):  # bounded: until the backend has the request
            if (await client.get(f"{ledger_backend.url}/v1/orders/{order}")).json()[
                "times_charged"
            ]:
                break
            await asyncio.sleep(0.05)
        host, port = record_master.host, record_master.port
        [flushed] = [node for node in cluster.nodes if node.port == port]
        assert host == "127.0.0.1"
        flushed.flushall()  # the record vanishes with every other key of that master
        await asyncio.sleep(interval * 5)  # a few canary reads
        started = asyncio.get_running_loop().time()
        duplicate = await client.post(url, content=body_of(order), headers=JSON_HEADERS)
        elapsed = asyncio.get_running_loop().time() - started
        first = await slow
        charged = (await client.get(f"{ledger_backend.url}/v1/orders/{order}")).json()
    assert first.status_code == 201
    assert duplicate.status_code == 503, duplicate.text
    assert problem_name(duplicate) == "store-unavailable"
    assert elapsed < 2.0
    assert charged["times_charged"] == 1


async def test_a_burst_larger_than_the_connection_pool_waits_for_connections(
    redis_cluster: RedisCluster,
) -> None:
    """redis-py's cluster client raises MaxConnectionsError at once when every connection
    to a node is in use, where the single-node pool waits for one. A burst of new payments
    larger than `store.max_connections` would get 503s and open the circuit for everyone.
    Here 2 connections serve 90 concurrent claims and their reads: each one waits its turn."""
    run = secrets.token_hex(4)
    names = [storage_key(f"burst-{run}-{i}") for i in range(90)]
    assert len(masters_of(redis_cluster, names)) == 3
    store = RedisStore(StoreSettings(url=redis_cluster.url, max_connections=2))
    await store.start()
    try:
        claims = await asyncio.gather(
            *(store.claim(key, "owner", "fp", 10_000, 60_000) for key in names),
            return_exceptions=True,
        )
        assert [getattr(c, "kind", c) for c in claims] == [ClaimKind.CLAIMED] * len(names)
        records = await asyncio.gather(*(store.get(key) for key in names), return_exceptions=True)
        assert [getattr(r, "state", r) for r in records] == ["CLAIMED"] * len(names)
        assert not store.breaker.is_open
    finally:
        await store.close()
