"""The status check: an UNKNOWN record resolved by asking the backend, never by re-sending.

The backend resets the connection after (charged) or before (not charged) the
work; the route's status check asks the sample backend's ledger
(`GET /v1/orders/{order_id}/status`: 200 with the charge, 404 without). "Executed"
completes the record with the check's answer, "not executed" frees the key so the
retry executes exactly once, anything else leaves it UNKNOWN. Real processes; the
ledger counts charges and status checks.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
from conftest import ProxyFactory
from harness import (
    HOST,
    BackendServer,
    Outcome,
    ProxyServer,
    eventually,
    pay,
    pay_route,
    records_cli,
)

CHARGED_THEN_RESET = {"X-Sample-Drop": "after"}
RESET_BEFORE_CHARGING = {"X-Sample-Drop": "before"}
EXECUTED = 'idempotency_proxy_outcome_resolutions_total{result="executed",via="status_check"}'
GAVE_UP = 'idempotency_proxy_outcome_resolutions_total{result="gave_up",via="status_check"}'


def check_config(**check: Any) -> dict[str, Any]:
    status_check = {
        "path": "/v1/orders/{order_id}/status",
        "after": "0s",
        "backoff": "100ms",
        "max_checks": 3,
        "timeout": "2s",
        **check,
    }
    return {"admin": {"host": HOST}, "routes": [pay_route(status_check=status_check)]}


async def order_info(client: httpx.AsyncClient, backend: BackendServer, order: str) -> Any:
    response = await client.get(f"{backend.url}/v1/orders/{order}")
    response.raise_for_status()
    return response.json()


async def metric(client: httpx.AsyncClient, proxy: ProxyServer, line_start: str) -> float:
    text = (await client.get(proxy.admin_url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def show(redis_url: str, proxy: ProxyServer, order: str) -> Any:
    assert proxy.config_path is not None
    code, out, err = await records_cli(
        "show",
        "--redis-url",
        redis_url,
        "--config",
        str(proxy.config_path),
        "--route",
        "pay",
        "--key",
        order,
    )
    assert code == 0, err
    return orjson.loads(out)


def new_order(name: str) -> str:
    return f"check-{name}-{time.monotonic_ns()}"


async def until_not_unknown(client: httpx.AsyncClient, proxy: ProxyServer, order: str) -> Outcome:
    async def probe() -> Outcome | None:
        outcome = await pay(client, proxy, order)
        return outcome if outcome.problem != "outcome-unknown" else None

    return await eventually(probe, "the status check to resolve the record", 10.0, 0.1)


async def test_executed_the_retry_gets_the_one_real_charge(
    store_url: str | None,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(ledger_backend.url, store_url, check_config())
    order = new_order("executed")
    first = await pay(client, proxy, order, CHARGED_THEN_RESET)
    assert (first.status, first.problem) == (502, "outcome-unknown")
    retry = await until_not_unknown(client, proxy, order)
    info = await order_info(client, ledger_backend, order)
    assert info["times_charged"] == 1
    assert (retry.status, retry.replayed) == (200, True)
    assert orjson.loads(retry.body) == info["charges"][0]
    again = await client.post(
        proxy.url + "/v1/orders/pay",
        content=orjson.dumps({"order_id": order, "amount": 1250, "currency": "EUR"}),
        headers={"content-type": "application/json"},
    )
    assert again.headers["idempotent-reconciled"] == "true"
    assert again.headers["idempotent-replayed"] == "true"
    assert await metric(client, proxy, EXECUTED) == 1.0
    if store_url is not None:
        record = await show(store_url, proxy, order)
        assert (record["state"], record["reason"]) == ("COMPLETED", "status-check")
    assert (await order_info(client, ledger_backend, order))["times_charged"] == 1


async def test_not_executed_the_retry_executes_exactly_once(
    store_url: str | None,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(
        ledger_backend.url, store_url, check_config(replay_status=201, after="300ms")
    )
    order = new_order("not-executed")
    first = await pay(client, proxy, order, RESET_BEFORE_CHARGING)
    assert (first.status, first.problem) == (502, "outcome-unknown")
    # Several clients retry at once: one executes, the others get 409 or its replay.
    await asyncio.sleep(0.6)
    retries = await asyncio.gather(*(pay(client, proxy, order) for _ in range(5)))
    labels = sorted(o.label for o in retries)
    fresh = [o for o in retries if o.executed_here]
    if not fresh:  # the check had not finished yet: a retry after it executes
        retry = await until_not_unknown(client, proxy, order)
        assert retry.executed_here, retry.label
    else:
        assert len(fresh) == 1, labels
    last = await pay(client, proxy, order)
    assert (last.status, last.replayed) == (201, True)
    assert (await order_info(client, ledger_backend, order))["times_charged"] == 1
    released = (
        'idempotency_proxy_outcome_resolutions_total{result="not_executed",via="status_check"}'
    )
    assert await metric(client, proxy, released) == 1.0


async def test_two_replicas_racing_make_one_check(
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    config = check_config(after="1s")
    replicas = [proxy_factory(ledger_backend.url, redis_url, config) for _ in range(3)]
    order = new_order("race")
    first = await pay(client, replicas[0], order, CHARGED_THEN_RESET)
    assert (first.status, first.problem) == (502, "outcome-unknown")
    # Every replica meets the UNKNOWN record before the check is due: each one follows it.
    copies = await asyncio.gather(*(pay(client, r, order) for r in replicas for _ in range(3)))
    assert {o.problem for o in copies} == {"outcome-unknown"}
    for replica in replicas:
        retry = await until_not_unknown(client, replica, order)
        assert (retry.status, retry.replayed) == (200, True)
    await asyncio.sleep(0.5)  # a losing replica would have checked by now
    info = await order_info(client, ledger_backend, order)
    assert (info["times_charged"], info["status_checks"]) == (1, 1)
    assert sum([await metric(client, r, EXECUTED) for r in replicas]) == 1.0


async def test_a_check_that_keeps_failing_leaves_unknown_after_its_limit(
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(
        ledger_backend.url,
        redis_url,
        check_config(path="/v1/orders/{order_id}/status?reject=503", max_checks=3),
    )
    order = new_order("failing")
    first = await pay(client, proxy, order, CHARGED_THEN_RESET)
    assert (first.status, first.problem) == (502, "outcome-unknown")

    async def gave_up() -> bool | None:
        return True if await metric(client, proxy, GAVE_UP) == 1.0 else None

    await eventually(gave_up, "three failed checks", timeout=10.0)
    await asyncio.sleep(1.0)
    again = await pay(client, proxy, order)
    assert (again.status, again.problem, again.replayed) == (502, "outcome-unknown", True)
    await asyncio.sleep(0.5)
    info = await order_info(client, ledger_backend, order)
    assert (info["times_charged"], info["status_checks"]) == (1, 3)
    record = await show(redis_url, proxy, order)
    assert (record["state"], record["checks"]) == ("UNKNOWN", 3)
