"""Late answers: the backend answers after the proxy's upstream timeout.

The client that timed out gets its 504 at once; the proxy keeps listening on the
same exchange for the route's `outcome_wait`, renewing its lease, so a duplicate
meanwhile gets 409 (or waits) and, once the answer is in, the replay of the one
real charge. Real processes throughout; the backend's ledger counts executions.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from conftest import ProxyFactory
from harness import (
    HOST,
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    Outcome,
    ProxyServer,
    body_of,
    eventually,
    pay,
    pay_route,
    records_cli,
)

SLOW = {"X-Sample-Delay": "2"}  # commits at once, answers 2 s later


def late_config(**route: Any) -> dict[str, Any]:
    # A lease shorter than the backend's delay: only renewal during the wait keeps the
    # record SENT (else a duplicate would turn it UNKNOWN as owner-lost).
    policy = {"upstream_timeout": "300ms", "lease": "1s", "outcome_wait": "10s", **route}
    return {"admin": {"host": HOST}, "routes": [pay_route(**policy)]}


async def times_charged(client: httpx.AsyncClient, backend: BackendServer, order: str) -> int:
    response = await client.get(f"{backend.url}/v1/orders/{order}")
    response.raise_for_status()
    return int(response.json()["times_charged"])


async def charged_once(client: httpx.AsyncClient, backend: BackendServer, order: str) -> None:
    async def probe() -> bool | None:
        return True if await times_charged(client, backend, order) >= 1 else None

    await eventually(probe, f"order {order} charged", timeout=10.0, interval=0.05)


async def metric(client: httpx.AsyncClient, proxy: ProxyServer, line_start: str) -> float:
    text = (await client.get(proxy.admin_url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def new_order(name: str) -> str:
    return f"late-{name}-{time.monotonic_ns()}"


async def test_a_late_answer_is_recorded_and_replayed_after_a_409_during_the_wait(
    store_url: str | None,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(ledger_backend.url, store_url, late_config())
    order = new_order("replay")
    started = time.monotonic()
    first = await pay(client, proxy, order, SLOW)
    # The timed-out client is answered at once, not after the wait.
    assert time.monotonic() - started < 1.5
    assert (first.status, first.problem, first.replayed) == (504, "outcome-unknown", False)
    await charged_once(client, ledger_backend, order)

    during = await client.post(proxy.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS)
    assert during.status_code == 409, during.text
    assert during.json()["type"].endswith("/request-in-progress")
    assert int(during.headers["retry-after"]) >= 1

    async def replayed() -> Outcome | None:
        outcome = await pay(client, proxy, order)
        return outcome if outcome.problem != "request-in-progress" else None

    after = await eventually(replayed, "the late answer's replay", timeout=10.0, interval=0.2)
    assert (after.status, after.problem, after.replayed) == (201, None, True)
    assert b'"order_id"' in after.body
    assert await times_charged(client, ledger_backend, order) == 1
    executed = 'idempotency_proxy_outcome_resolutions_total{result="executed",via="late_answer"}'
    assert await metric(client, proxy, executed) == 1.0
    if store_url is not None:
        assert proxy.config_path is not None
        code, out, err = await records_cli(
            "show",
            "--redis-url",
            store_url,
            "--config",
            str(proxy.config_path),
            "--route",
            "pay",
            "--key",
            order,
        )
        assert code == 0, err
        assert "late-answer" in out and "COMPLETED" in out


async def test_a_waiting_duplicate_gets_the_late_answer(
    ledger_backend: BackendServer, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(
        ledger_backend.url, None, late_config(in_flight="wait", wait_timeout="10s")
    )
    order = new_order("wait")
    first = await pay(client, proxy, order, SLOW)
    assert (first.status, first.problem) == (504, "outcome-unknown")
    duplicate = await pay(client, proxy, order)
    assert (duplicate.status, duplicate.problem, duplicate.replayed) == (201, None, True)
    assert await times_charged(client, ledger_backend, order) == 1


async def test_a_wait_that_runs_out_leaves_unknown_and_nothing_is_sent_again(
    ledger_backend: BackendServer, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(ledger_backend.url, None, late_config(outcome_wait="500ms"))
    order = new_order("runs-out")
    first = await pay(client, proxy, order, SLOW)
    assert (first.status, first.problem) == (504, "outcome-unknown")

    async def settled() -> Outcome | None:
        outcome = await pay(client, proxy, order)
        return outcome if outcome.problem != "request-in-progress" else None

    after = await eventually(settled, "the wait to run out", timeout=10.0, interval=0.1)
    assert (after.status, after.problem, after.replayed) == (504, "outcome-unknown", True)
    await asyncio.sleep(2.0)  # the backend's answer comes, to a closed exchange
    again = await pay(client, proxy, order)
    assert (again.status, again.problem) == (504, "outcome-unknown")
    assert await times_charged(client, ledger_backend, order) == 1


async def test_outcome_wait_zero_and_the_held_bound_keep_todays_behaviour(
    ledger_backend: BackendServer, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    off = proxy_factory(ledger_backend.url, None, late_config(outcome_wait="0"))
    full = proxy_factory(
        ledger_backend.url,
        None,
        {**late_config(), "upstream_pool": {"max_held_exchanges": 0}},
    )
    for proxy, name in ((off, "off"), (full, "bound")):
        order = new_order(name)
        first = await pay(client, proxy, order, SLOW)
        assert (first.status, first.problem) == (504, "outcome-unknown")
        duplicate = await pay(client, proxy, order)
        assert (duplicate.status, duplicate.problem, duplicate.replayed) == (
            504,
            "outcome-unknown",
            True,
        ), name
        assert await times_charged(client, ledger_backend, order) == 1
    not_held = 'idempotency_proxy_outcome_resolutions_total{result="not_held",via="late_answer"}'
    assert await metric(client, full, not_held) == 1.0


async def test_the_owner_killed_during_the_wait_leaves_unknown_never_a_second_charge(
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    owner = proxy_factory(ledger_backend.url, redis_url, late_config())
    other = proxy_factory(ledger_backend.url, redis_url, late_config())
    order = new_order("killed")
    first = await pay(client, owner, order, SLOW)
    assert (first.status, first.problem) == (504, "outcome-unknown")
    owner.kill()
    seen = []

    async def settled() -> Outcome | None:
        outcome = await pay(client, other, order)
        seen.append(outcome)
        return outcome if outcome.problem != "request-in-progress" else None

    after = await eventually(settled, "the dead owner's lease to run out", timeout=10.0)
    assert (after.status, after.problem, after.replayed) == (502, "outcome-unknown", True)
    await asyncio.sleep(2.0)
    assert (await pay(client, other, order)).problem == "outcome-unknown"
    assert await times_charged(client, ledger_backend, order) == 1
    assert all(o.status in (409, 502) for o in seen)


async def test_graceful_shutdown_records_a_late_answer_that_comes_within_the_grace(
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    owner = proxy_factory(ledger_backend.url, redis_url, late_config())
    order = new_order("shutdown")
    first = await pay(client, owner, order, SLOW)
    assert (first.status, first.problem) == (504, "outcome-unknown")
    assert owner.stop(timeout=20.0) == 0
    other = proxy_factory(ledger_backend.url, redis_url, late_config())
    replay = await pay(client, other, order)
    assert (replay.status, replay.problem, replay.replayed) == (201, None, True)
    assert await times_charged(client, ledger_backend, order) == 1
