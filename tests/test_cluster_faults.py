"""Store faults on Redis Cluster never give a 500.

While a master is down or coming back, redis-py's cluster client raises more than
`RedisError`: `RuntimeError` and `AttributeError` from a closed transport,
`RedisClusterException`. Each must become the contract's 503 before sending, or a
background retry after, and no background task (lease renewal, completion, the
data-loss watch) may die of one. A replica started while its seed node is down starts
and answers 503 until the cluster is reachable.

A cluster of its own (AOF on, fsync always), because its masters are stopped and
restarted here.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from harness import (
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    Outcome,
    ProxyFactory,
    ProxyServer,
    RedisCluster,
    body_of,
    eventually,
    pay,
    pay_config,
    problem_name,
    redis_binaries_missing,
    tally,
)

pytestmark = pytest.mark.chaos

# Answers the proxy may make itself while the store fails; all of them problem+json.
STORE_FAULT_PROBLEMS = {"store-unavailable", "request-in-progress", "outcome-unknown"}
FAILURE_MARKS = (
    "Traceback",
    "Exception in ASGI application",
    "never retrieved",
    "without completing",
)
CONFIG = pay_config(store={"timeout": "300ms", "retries": 1})


@pytest.fixture(scope="module")
def aof_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    missing = redis_binaries_missing("redis-server", "redis-cli")
    if missing:
        pytest.fail(f"{', '.join(missing)} not found on PATH: install Redis >= 7", pytrace=False)
    cluster = RedisCluster(
        tmp_path_factory.mktemp("aof-cluster"),
        args=["--appendonly", "yes", "--appendfsync", "always"],
    )
    with cluster:
        yield cluster


def heal(cluster: RedisCluster) -> None:
    """Every master running and the cluster ok (an earlier test may have failed mid-way)."""
    for node in cluster.nodes:
        node.revive()
    cluster._wait_ok()


def assert_clean_logs(proxies: list[ProxyServer]) -> None:
    for proxy in proxies:
        log = proxy.logs()
        for mark in FAILURE_MARKS:
            assert mark not in log, (mark, log[-6000:])


async def paid(http: httpx.AsyncClient, proxy: ProxyServer) -> Outcome | None:
    """A new payment through `proxy` once it executes (None while it does not yet)."""
    outcome = await pay(http, proxy, f"probe-{secrets.token_hex(6)}")
    return outcome if outcome.status == 201 else None


async def safe_mode(http: httpx.AsyncClient, proxy: ProxyServer) -> Outcome | None:
    """A new payment refused with 503 (the store lost data), else None."""
    outcome = await pay(http, proxy, f"probe-{secrets.token_hex(6)}")
    return outcome if outcome.problem == "store-unavailable" else None


async def test_a_replica_started_while_the_seed_node_is_down_answers_503_until_it_is_back(
    aof_cluster: RedisCluster, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    heal(aof_cluster)
    seed = aof_cluster.nodes[0]  # the only node the proxy's URL names
    seed.stop()
    try:
        proxy = proxy_factory(ledger_backend.url, aof_cluster.url, CONFIG)
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
            down = await pay(http, proxy, f"seed-down-{secrets.token_hex(4)}")
            assert down.status == 503 and down.problem == "store-unavailable", down
            ready = await http.get(proxy.admin_url + "/readyz")
            assert ready.status_code == 200  # up and answering; 503s tell the story
            seed.start()
            aof_cluster._wait_ok()
            await eventually(lambda: paid(http, proxy), "a payment once the seed is back", 20)
    finally:
        seed.revive()
    assert proxy.running
    assert ledger_backend.ledger()["double_charged_count"] == 0
    assert_clean_logs([proxy])


async def test_a_master_restarted_on_its_aof_under_load_never_gives_a_500(
    aof_cluster: RedisCluster, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    heal(aof_cluster)
    proxies = [proxy_factory(ledger_backend.url, aof_cluster.url, CONFIG) for _ in range(2)]
    victim = aof_cluster.nodes[1]  # not the seed: the proxies keep their way in
    run = secrets.token_hex(4)
    outcomes: list[Outcome] = []
    tampered: list[Outcome] = []
    stop_at = time.monotonic() + 9.0  # bounded in time and count (at most ~1000 requests)

    async def worker(http: httpx.AsyncClient, n: int) -> None:
        for i in range(150):
            if time.monotonic() >= stop_at:
                return
            order = f"load-{run}-{n}-{i}"
            first, second = proxies[i % 2], proxies[(i + 1) % 2]
            outcomes.append(await pay(http, first, order))
            outcomes.append(await pay(http, second, order))  # a duplicate on another replica
            # The same key with another amount: 422, whatever the store is going through.
            try:
                response = await http.post(
                    second.url + PAY_PATH, content=body_of(order, 1), headers=JSON_HEADERS
                )
            except httpx.TransportError:
                tampered.append(Outcome(order, None, None, False))
                continue
            tampered.append(
                Outcome(
                    order,
                    response.status_code,
                    problem_name(response),
                    response.headers.get("idempotent-replayed") == "true",
                )
            )

    async def chaos() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(victim.stop)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(victim.start)  # reloads its AOF

    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        await asyncio.gather(chaos(), *(worker(http, n) for n in range(6)))
        await asyncio.to_thread(aof_cluster._wait_ok)
        for proxy in proxies:  # both recover on their own
            await eventually(lambda p=proxy: paid(http, p), "a payment after the restart", 20)
        # The data-loss watch survived the fault: a loss now still stops new claims.
        for node in aof_cluster.nodes:
            with node.client() as client:
                client.flushall()
        for proxy in proxies:
            await eventually(
                lambda p=proxy: safe_mode(http, p), "safe mode after a data loss", 10, 0.2
            )

    counts = tally("master restart", outcomes)
    tally("tampered", tampered)
    assert not [o for o in outcomes + tampered if o.status == 500], counts
    assert all(o.status is not None for o in outcomes + tampered), counts
    for outcome in outcomes:
        if outcome.problem is not None:
            assert outcome.problem in STORE_FAULT_PROBLEMS, outcome
        else:
            assert outcome.status == 201, outcome
    paid_orders = {o.order for o in outcomes if o.status == 201}
    for outcome in tampered:
        if outcome.order in paid_orders:
            # Never executed: 422 when the record was read, 503 when the store could not say.
            assert (outcome.status, outcome.problem) in {
                (422, "key-reused"),
                (503, "store-unavailable"),
            }, outcome
        else:
            # Neither earlier try executed: this one may be the first to claim the key, or
            # find the record an earlier try left (its 503 came after the claim was written).
            assert (
                outcome.status == 201
                or outcome.problem in STORE_FAULT_PROBLEMS
                or (outcome.status, outcome.problem) == (422, "key-reused")
            ), outcome
    assert Counter(o.status for o in outcomes)[503] > 0, counts  # the fault was felt
    ledger = ledger_backend.ledger()
    assert ledger["double_charged_count"] == 0
    assert all(times == 1 for times in ledger["orders"].values() if times)
    assert_clean_logs(proxies)
