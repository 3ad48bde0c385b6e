"""Chaos: five proxy replicas, one Redis with AOF, the sample backend, and faults.

Each test sends bursts of duplicate traffic (30 orders x 3 copies, spread over the
replicas) while something breaks: a replica is SIGKILLed or SIGSTOPped, Redis stops and
restarts, the backend is slow or drops the connection. The ledger of the sample backend is
the ground truth: no order may ever be charged twice. The outcomes clients saw are printed
(run with ``-s``) and asserted where they do not depend on the scheduler's luck.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from harness import (
    BackendServer,
    Outcome,
    ProxyFactory,
    ProxyServer,
    RedisFactory,
    body_of,
    eventually,
    fingerprint_of,
    pay,
    pay_config,
    pay_until,
    records_cli,
    storage_key,
    tally,
)

from proxy.config import StoreSettings
from proxy.records import ClaimKind, StoredResponse
from proxy.store.redis import RedisStore

pytestmark = pytest.mark.chaos

T = TypeVar("T")

REPLICAS = 5
ORDERS = 30
CLIENT_TIMEOUT = 30.0


# --------------------------------------------------------------------------- helpers


def start_replicas(
    factory: ProxyFactory, upstream: str, redis_url: str, **defaults: str
) -> list[ProxyServer]:
    """Five replicas sharing one Redis, with the `pay` route alone and these route defaults
    (lease, upstream_timeout), started side by side to keep the suite fast."""
    config = pay_config(defaults=defaults)
    proxies = [factory(upstream, redis_url, config, start=False) for _ in range(REPLICAS)]
    with ThreadPoolExecutor(max_workers=REPLICAS) as pool:
        for started in [pool.submit(proxy.start) for proxy in proxies]:
            started.result()
    return proxies


def kill_all(proxies: Iterable[ProxyServer]) -> None:
    """The test is over: a SIGKILL is instant, and graceful shutdown is not under test here."""
    for proxy in proxies:
        proxy.kill()


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=CLIENT_TIMEOUT,
        trust_env=False,
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
    )


async def ledger(http: httpx.AsyncClient, backend: BackendServer) -> dict[str, Any]:
    response = await http.get(backend.url + "/v1/ledger")
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


async def charged(
    http: httpx.AsyncClient, backend: BackendServer, orders: Sequence[str], timeout: float = 20.0
) -> dict[str, Any]:
    """Wait until every order in `orders` shows at least one charge (it reached the backend)."""

    async def probe() -> dict[str, Any] | None:
        book = await ledger(http, backend)
        return book if all(book["orders"].get(o, 0) >= 1 for o in orders) else None

    return await eventually(probe, f"charges for {len(orders)} orders", timeout)


def times_charged(book: dict[str, Any], order: str) -> int:
    return int(book["orders"].get(order, 0))


def assert_never_twice(book: dict[str, Any]) -> None:
    assert book["double_charged_count"] == 0, book["orders_charged_more_than_once"]
    assert all(times <= 1 for times in book["orders"].values()), book["orders"]


def flatten(groups: Iterable[list[Outcome]]) -> list[Outcome]:
    return [outcome for group in groups for outcome in group]


async def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    """One sample from the replica's /metrics (0 when the series does not exist yet)."""
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
        text = (await http.get(proxy.admin_url + "/metrics")).text
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


async def gather(*tasks: Awaitable[T]) -> list[T]:
    return list(await asyncio.gather(*tasks))


# --------------------------------------------------------------------------- (a) SIGKILL


async def test_owner_killed_after_forwarding_is_never_sent_again(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """The owner dies while the backend holds the charged request: 409, then outcome-unknown."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(
        proxy_factory, ledger_backend.url, redis.url, lease="2s", upstream_timeout="30s"
    )
    victim = proxies[0]
    orders = [f"kill-sent-{i}" for i in range(ORDERS)]
    owner = {order: proxies[i % REPLICAS] for i, order in enumerate(orders)}
    lost = [o for o in orders if owner[o] is victim]
    slow = {"X-Sample-Delay": "4"}  # charge at once, answer 4 s later

    async with client() as http:
        firsts = {o: asyncio.ensure_future(pay(http, owner[o], o, slow)) for o in orders}
        await charged(http, ledger_backend, orders)
        # Copies 2 and 3 on two other replicas while every owner is alive and renewing.
        copies = await gather(
            *(
                pay(http, proxies[(i + k) % REPLICAS], o)
                for i, o in enumerate(orders)
                for k in (1, 2)
            )
        )
        victim.kill()
        first = {o: await task for o, task in firsts.items()}
        # Clients retry on the survivors; the dead owner's records stay SENT until the
        # lease runs out, then the first duplicate turns them UNKNOWN.
        survivors = proxies[1:]
        retries = await gather(
            *(pay_until(http, survivors[i % len(survivors)], o) for i, o in enumerate(orders))
        )
        book = await ledger(http, ledger_backend)
    kill_all(proxies)

    tally("first copies", first.values())
    tally("copies while in flight", copies)
    tally("retries after the kill", flatten(retries))
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert book["requests_seen"] == ORDERS  # nothing was ever sent a second time
    assert {c.label for c in copies} == {"409 request-in-progress"}
    assert all(first[o].status is None for o in lost)
    assert all(first[o].label == "201" for o in orders if o not in lost)
    finals = {group[-1].order: group[-1] for group in retries}
    assert all(finals[o].label == "502 outcome-unknown (replayed)" for o in lost)
    assert all(finals[o].label == "201 (replayed)" for o in orders if o not in lost)
    assert all(b"owner-lost" in finals[o].body for o in lost)


async def test_claimed_but_never_sent_is_taken_over_exactly_once(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """A replica claimed and died before sending: after its lease one duplicate takes over."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(proxy_factory, ledger_backend.url, redis.url, lease="2s")
    orders = [f"kill-claimed-{i}" for i in range(ORDERS)]
    dead = "dead-replica-token"

    store = RedisStore(StoreSettings(url=redis.url))
    await store.start()
    try:
        # The claim a replica made just before its SIGKILL: CLAIMED, nothing sent.
        for order in orders:
            claim = await store.claim(
                storage_key(order), dead, fingerprint_of(body_of(order)), 1500, 60_000
            )
            assert claim.kind is ClaimKind.CLAIMED
        async with client() as http:
            burst = await gather(
                *(
                    pay(http, proxies[(i + k) % REPLICAS], o)
                    for i, o in enumerate(orders)
                    for k in (0, 1, 2)
                )
            )
            retries = await gather(
                *(pay_until(http, proxies[(i + 3) % REPLICAS], o) for i, o in enumerate(orders))
            )
            book = await ledger(http, ledger_backend)
        records = {o: await store.get(storage_key(o)) for o in orders}
        # The dead owner comes back (a replica that was only frozen): every transition
        # it tries is refused, so it can neither send nor overwrite the new owner's record.
        key = storage_key(orders[0])
        fenced = (
            await store.mark_sent(key, dead, 1000),
            await store.renew(key, dead, 1000),
            await store.complete(key, dead, StoredResponse(500)),
            await store.mark_unknown(key, dead, 502, "late"),
            await store.release(key, dead),
        )
        after = await store.get(key)
    finally:
        await store.close()
    kill_all(proxies)

    tally("burst during the dead owner's lease", burst)
    tally("retries", flatten(retries))
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert book["requests_seen"] == ORDERS
    everything = burst + flatten(retries)
    assert {o.label for o in everything} <= {"409 request-in-progress", "201", "201 (replayed)"}
    executed = Counter(o.order for o in everything if o.executed_here)
    assert executed == Counter(orders)  # exactly one take-over per order forwarded
    assert all(group[-1].status == 201 for group in retries)
    for record in records.values():
        assert record is not None
        assert record.state == "COMPLETED"
        assert record.fence == 2  # taken over once
        assert record.token != dead
    assert fenced == (False, False, False, False, False)
    assert after is not None and after.state == "COMPLETED" and after.response is not None
    assert after.response.status == 201


# --------------------------------------------------------------------------- (b) SIGSTOP


async def test_owner_paused_past_its_lease_is_fenced(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """A frozen owner loses its record to UNKNOWN; when it thaws it cannot overwrite it."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(
        proxy_factory, ledger_backend.url, redis.url, lease="1s", upstream_timeout="30s"
    )
    victim = proxies[0]
    orders = [f"pause-{i}" for i in range(ORDERS)]
    owner = {order: proxies[i % REPLICAS] for i, order in enumerate(orders)}
    lost = [o for o in orders if owner[o] is victim]
    slow = {"X-Sample-Delay": "2.5"}

    async with client() as http:
        firsts = {o: asyncio.ensure_future(pay(http, owner[o], o, slow)) for o in orders}
        await charged(http, ledger_backend, orders)
        copies = await gather(
            *(pay(http, proxies[(i + 1) % REPLICAS], o) for i, o in enumerate(orders))
        )
        victim.pause()
        try:
            # Past the frozen owner's lease a duplicate finds SENT + expired: UNKNOWN.
            takeovers = await gather(
                *(pay_until(http, proxies[1 + i % 4], o) for i, o in enumerate(lost))
            )
            # The backend answers everyone (the frozen owner's answer waits in its socket).
            others = {o: await firsts[o] for o in orders if o not in lost}
        finally:
            victim.resume()
        thawed = {o: await firsts[o] for o in lost}
        finals = await gather(
            *(pay(http, proxies[(i + 2) % REPLICAS], o) for i, o in enumerate(orders))
        )
        book = await ledger(http, ledger_backend)
        fenced_complete = await metric(
            victim, "idempotency_proxy_fenced_total", operation="complete"
        )
        fenced_renew = await metric(victim, "idempotency_proxy_fenced_total", operation="renew")
    store = RedisStore(StoreSettings(url=redis.url))
    await store.start()
    try:
        records = {o: await store.get(storage_key(o)) for o in lost}
    finally:
        await store.close()
    kill_all(proxies)

    tally("copies while in flight", copies)
    tally("duplicates while the owner is frozen", flatten(takeovers))
    tally("first copies (thawed owner)", thawed.values())
    tally("first copies (live owners)", others.values())
    tally("final copies", finals)
    print(f"\n[victim metrics] fenced complete={fenced_complete} renew={fenced_renew}")
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert book["requests_seen"] == ORDERS  # the thawed owner never sent again
    assert {c.label for c in copies} == {"409 request-in-progress"}
    assert all(group[-1].label == "502 outcome-unknown (replayed)" for group in takeovers)
    # The thawed owner still hands its client the backend's real answer...
    assert all(outcome.label == "201" for outcome in thawed.values())
    assert all(outcome.label == "201" for outcome in others.values())
    # ...but cannot overwrite the record a duplicate turned UNKNOWN.
    assert fenced_complete == len(lost)
    for record in records.values():
        assert record is not None and record.state == "UNKNOWN" and record.reason == "owner-lost"
    final = {o.order: o for o in finals}
    assert all(final[o].label == "502 outcome-unknown (replayed)" for o in lost)
    assert all(final[o].label == "201 (replayed)" for o in orders if o not in lost)


async def test_requests_queued_on_a_paused_replica_replay_after_resume(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """Requests stuck in a frozen replica's accept queue find the finished records on thaw."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(proxy_factory, ledger_backend.url, redis.url)
    victim = proxies[0]
    orders = [f"queued-{i}" for i in range(ORDERS)]

    async with client() as http:
        victim.pause()
        try:
            queued = [asyncio.ensure_future(pay(http, victim, o)) for o in orders]
            await asyncio.sleep(0.2)  # let the queued requests reach the frozen socket
            others = await gather(
                *(
                    pay_until(http, proxies[1 + (i + k) % 4], o)
                    for i, o in enumerate(orders)
                    for k in (0, 1)
                )
            )
        finally:
            victim.resume()
        thawed = [await task for task in queued]
        book = await ledger(http, ledger_backend)
    kill_all(proxies)

    tally("copies on live replicas", flatten(others))
    tally("copies queued on the frozen replica", thawed)
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert book["requests_seen"] == ORDERS
    assert Counter(o.order for o in flatten(others) if o.executed_here) == Counter(orders)
    assert {o.label for o in thawed} == {"201 (replayed)"}


# --------------------------------------------------------------------------- (c) Redis restart


async def test_redis_restart_mid_burst_fails_closed_then_every_order_completes_once(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """Store down: 503 and nothing forwarded; in-flight owners still answer; after the
    restart (AOF) every retried order is charged exactly once."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(proxy_factory, ledger_backend.url, redis.url, upstream_timeout="30s")
    done = [f"redis-done-{i}" for i in range(10)]
    flying = [f"redis-flying-{i}" for i in range(10)]
    outage = [f"redis-outage-{i}" for i in range(10)]
    orders = done + flying + outage

    def spread(group: Sequence[str], copies: Sequence[int]) -> list[tuple[ProxyServer, str]]:
        return [(proxies[(i + k) % REPLICAS], o) for i, o in enumerate(group) for k in copies]

    async with client() as http:
        before = await gather(*(pay_until(http, p, o) for p, o in spread(done, (0, 1, 2))))
        in_flight = [
            asyncio.ensure_future(pay(http, p, o, {"X-Sample-Delay": "2"}))
            for p, o in spread(flying, (0,))
        ]
        await charged(http, ledger_backend, flying)
        redis.stop()
        try:
            during = await gather(
                *(pay(http, p, o) for p, o in spread(outage, (0, 1, 2)) + spread(flying, (1, 2)))
            )
            done_during = await gather(*(pay(http, p, o) for p, o in spread(done, (3,))))
            answered = [await task for task in in_flight]
            book_during = await ledger(http, ledger_backend)
        finally:
            redis.start()  # same port and dir: the AOF is replayed
        retry = [o for o in during + done_during if o.status == 503]
        after = await gather(
            *(
                pay_until(
                    http,
                    proxies[i % REPLICAS],
                    o.order,
                    retry_on=("request-in-progress", "store-unavailable"),
                )
                for i, o in enumerate(retry)
            )
        )
        book = await ledger(http, ledger_backend)
    kill_all(proxies)

    tally("before the outage", flatten(before))
    tally("in flight when Redis stopped", answered)
    tally("during the outage", during)
    tally("completed orders during the outage", done_during)
    tally("retried after the restart", flatten(after))
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert book["requests_seen"] == ORDERS
    # Nothing was forwarded while the store was down.
    assert all(times_charged(book_during, o) == 0 for o in outage)
    assert book_during["requests_seen"] == len(done) + len(flying)
    assert {o.label for o in during} == {"503 store-unavailable"}
    # A replica may answer a completed order from its own replay cache during the outage.
    assert {o.label for o in done_during} <= {"503 store-unavailable", "201 (replayed)"}
    # The store went away after the backend answered: the client still gets the answer.
    assert {o.label for o in answered} == {"201"}
    finals = {group[-1].order: group[-1] for group in after}
    assert set(finals) == {o.order for o in retry}
    executed = Counter(o.order for o in flatten(after) if o.executed_here)
    assert executed == Counter(outage)  # each outage order ran exactly once, after the restart
    # Records written before the outage survived it (AOF), and the in-flight owners
    # recorded their outcome in the background once Redis was back (lease 10 s > outage).
    assert all(finals[o].label == "201 (replayed)" for o in finals if o not in outage)
    assert all(finals[o].status == 201 for o in finals)


# --------------------------------------------------------------------------- (d) slow backend


def unknown_share(title: str, finals: Iterable[Outcome]) -> float:
    """Print and return the share of orders whose final answer is outcome-unknown."""
    outcomes = list(finals)
    unknown = sum(o.problem == "outcome-unknown" for o in outcomes)
    share = unknown / len(outcomes)
    print(f"\n[{title}] final outcome-unknown: {unknown}/{len(outcomes)} = {share:.0%}")
    return share


@pytest.mark.parametrize("outcome_wait", ["0", "20s"])
async def test_backend_slower_than_the_lease_and_than_the_upstream_timeout(
    redis_factory: RedisFactory,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    outcome_wait: str,
) -> None:
    """Renewal keeps a slow owner alive; a timeout is never re-sent. Without an outcome
    wait it becomes UNKNOWN; with one, the late answer is recorded and replayed."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(
        proxy_factory,
        ledger_backend.url,
        redis.url,
        lease="1200ms",
        upstream_timeout="3500ms",
        outcome_wait=outcome_wait,
    )
    slow = [f"slow-{i}" for i in range(15)]  # 2.5 s: twice the lease, under the timeout
    late = [f"late-{i}" for i in range(10)]  # charged, then 4.5 s: past the timeout
    stuck = [f"stuck-{i}" for i in range(5)]  # 4.5 s before charging: past the timeout
    orders = slow + late + stuck
    faults = {
        **{o: {"X-Sample-Delay": "2.5"} for o in slow},
        **{o: {"X-Sample-Delay": "4.5"} for o in late},
        **{o: {"X-Sample-Delay-Before": "4.5"} for o in stuck},
    }

    async with client() as http:
        firsts = {
            o: asyncio.ensure_future(pay(http, proxies[i % REPLICAS], o, faults[o]))
            for i, o in enumerate(orders)
        }
        await charged(http, ledger_backend, slow + late)
        copies = await gather(
            *(
                pay(http, proxies[(i + k) % REPLICAS], o)
                for i, o in enumerate(orders)
                for k in (1, 2)
            )
        )
        first = {o: await task for o, task in firsts.items()}
        # A retrying client: again while the answer is still being waited for.
        tries = await gather(
            *(pay_until(http, proxies[(i + 3) % REPLICAS], o) for i, o in enumerate(orders))
        )
        finals = [seen[-1] for seen in tries]
        # The stuck requests' handlers still run in the backend after the proxy gave up.
        book = await charged(http, ledger_backend, orders, timeout=15.0)
    kill_all(proxies)

    tally("first copies", first.values())
    tally("copies while in flight", copies)
    tally("copies afterwards", finals)
    share = unknown_share(f"slow backend, outcome_wait {outcome_wait}", finals)
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert book["requests_seen"] == ORDERS
    assert {c.label for c in copies} == {"409 request-in-progress"}
    assert all(first[o].label == "201" for o in slow)
    assert all(first[o].label == "504 outcome-unknown" for o in late + stuck)
    final = {o.order: o for o in finals}
    assert all(final[o].label == "201 (replayed)" for o in slow)
    if outcome_wait == "0":
        assert all(final[o].label == "504 outcome-unknown (replayed)" for o in late + stuck)
        assert share == 0.5
    else:
        # The one real charge, answered late, replayed to the retrying client.
        assert all(final[o].label == "201 (replayed)" for o in late + stuck)
        assert share == 0.0


# --------------------------------------------------------------------------- (e) dropped connection


async def test_backend_drops_the_connection_then_an_operator_reconciles(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """A dropped connection is UNKNOWN whether or not the charge happened; an operator
    checks the ledger and resolves (charged) or releases (not charged) the record."""
    redis = redis_factory(appendonly=True)
    proxies = start_replicas(proxy_factory, ledger_backend.url, redis.url)
    after = [f"drop-after-{i}" for i in range(15)]  # charged, then the connection closed
    before = [f"drop-before-{i}" for i in range(15)]  # closed without charging
    orders = after + before
    drop = {**{o: "after" for o in after}, **{o: "before" for o in before}}

    async with client() as http:
        first = await gather(
            *(
                pay(http, proxies[i % REPLICAS], o, {"X-Sample-Drop": drop[o]})
                for i, o in enumerate(orders)
            )
        )
        copies = await gather(
            *(
                pay(http, proxies[(i + k) % REPLICAS], o)
                for i, o in enumerate(orders)
                for k in (1, 2)
            )
        )
        book = await ledger(http, ledger_backend)

        # The operator's side, for one order of each kind.
        assert proxies[0].config_path is not None
        cli = ("--redis-url", redis.url, "--config", str(proxies[0].config_path), "--route", "pay")

        async def release_unsent() -> tuple[tuple[int, str, str], tuple[int, str, str]]:
            # The ledger shows no charge for this order: free the key for the retry.
            shown = await records_cli("show", *cli, "--key", before[0])
            return shown, await records_cli("release", *cli, "--key", before[0])

        async def resolve_charged() -> tuple[tuple[int, str, str], tuple[int, str, str]]:
            # The ledger shows the charge: store the answer duplicates should get.
            resolved = await records_cli(
                "resolve", *cli, "--key", after[0], "--status", "201", "--body", '{"resolved":true}'
            )
            # COMPLETED now: releasing it would allow a second charge, so it needs --force.
            return resolved, await records_cli("release", *cli, "--key", after[0])

        (shown, released), (resolved, refused) = await asyncio.gather(
            release_unsent(), resolve_charged()
        )
        retried_before = await pay(http, proxies[1], before[0])
        again_before = await pay(http, proxies[2], before[0])
        retried_after = await pay(http, proxies[3], after[0])
        book_after = await ledger(http, ledger_backend)
    kill_all(proxies)

    tally("first copies", first)
    tally("copies", copies)
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in after)
    assert all(times_charged(book, o) == 0 for o in before)
    assert book["requests_seen"] == ORDERS  # a dropped request is never re-sent
    assert {o.label for o in first} == {"502 outcome-unknown"}
    assert {o.label for o in copies} == {"502 outcome-unknown (replayed)"}

    assert shown[0] == 0, shown[2]
    assert orjson.loads(shown[1])["state"] == "UNKNOWN"
    assert released[0] == 0, released[2]
    assert resolved[0] == 0, resolved[2]
    assert refused[0] == 1, refused
    assert retried_before.label == "201"  # released: the retry executes, once
    assert again_before.label == "201 (replayed)"
    assert retried_after.label == "201 (replayed)"
    assert orjson.loads(retried_after.body) == {"resolved": True}
    assert_never_twice(book_after)
    assert times_charged(book_after, before[0]) == 1
    assert times_charged(book_after, after[0]) == 1


async def test_backend_drops_the_connection_and_the_status_check_reconciles(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    """The same drops on a route with a status check: every replica that meets an UNKNOWN
    record may check it, one at a time; charged orders replay the check's answer, uncharged
    ones are released and their retry executes exactly once. No operator."""
    redis = redis_factory(appendonly=True)
    config = pay_config()
    config["routes"][0]["status_check"] = {
        "path": "/v1/orders/{order_id}/status",
        "after": "0s",
        "backoff": "200ms",
    }
    proxies = [
        proxy_factory(ledger_backend.url, redis.url, config, start=False) for _ in range(REPLICAS)
    ]
    with ThreadPoolExecutor(max_workers=REPLICAS) as pool:
        for started in [pool.submit(proxy.start) for proxy in proxies]:
            started.result()
    after = [f"check-after-{i}" for i in range(15)]  # charged, then the connection closed
    before = [f"check-before-{i}" for i in range(15)]  # closed without charging
    orders = after + before
    drop = {**{o: "after" for o in after}, **{o: "before" for o in before}}

    async with client() as http:
        first = await gather(
            *(
                pay(http, proxies[i % REPLICAS], o, {"X-Sample-Drop": drop[o]})
                for i, o in enumerate(orders)
            )
        )
        # Clients retry, through other replicas, while the answer is outcome-unknown.
        tries = await gather(
            *(
                pay_until(
                    http,
                    proxies[(i + 1) % REPLICAS],
                    o,
                    retry_on=("outcome-unknown", "request-in-progress"),
                    timeout=15.0,
                )
                for i, o in enumerate(orders)
            )
        )
        finals = [seen[-1] for seen in tries]
        again = await gather(
            *(pay(http, proxies[(i + 2) % REPLICAS], o) for i, o in enumerate(orders))
        )
        book = await ledger(http, ledger_backend)
    kill_all(proxies)

    tally("first copies", first)
    tally("retries until answered", flatten(tries))
    tally("copies afterwards", again)
    share = unknown_share("dropped connections, status check", again)
    assert_never_twice(book)
    assert all(times_charged(book, o) == 1 for o in orders)
    assert {o.label for o in first} == {"502 outcome-unknown"}
    final = {o.order: o for o in finals}
    assert all(final[o].label == "200 (replayed)" for o in after)
    # Released by the check: exactly one retry per order executed (the rest replayed).
    executed = [o for o in flatten(tries) if o.executed_here]
    assert sorted(o.order for o in executed) == sorted(before)
    assert share == 0.0
    assert {o.label for o in again} <= {"200 (replayed)", "201 (replayed)"}
