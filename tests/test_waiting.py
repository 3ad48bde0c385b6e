"""`in_flight: wait`: a duplicate that arrives while the first request runs waits for its
outcome instead of getting 409, and then gets what the first got, or, when the first was
released, executes itself. Memory and Redis stores alike.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from harness import (
    HOST,
    JSON_HEADERS,
    BackendServer,
    ProxyFactory,
    body_of,
    eventually,
    pay,
    pay_route,
)


def new_key() -> str:
    return f"wait-{uuid.uuid4().hex[:16]}"


async def _requests_seen(backend: BackendServer, at_least: int) -> int | None:
    seen = int(backend.ledger()["requests_seen"])
    return seen if seen >= at_least else None


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_waiting_duplicate_gets_unknown_or_executes_after_a_release(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None
    route = pay_route(in_flight="wait", wait_timeout="20s", upstream_timeout="1s", outcome_wait="0")
    proxy = proxy_factory(
        ledger_backend.url, redis_url, config={"admin": {"host": HOST}, "routes": [route]}
    )

    # The first ends UNKNOWN (charged, then too slow): the waiter gets the same, replayed.
    order = new_key()
    first = asyncio.create_task(pay(client, proxy, order, {"X-Sample-Delay": "3"}))
    await eventually(lambda: _requests_seen(ledger_backend, 1), "the first request")
    waiter = await pay(client, proxy, order)
    assert (waiter.status, waiter.problem, waiter.replayed) == (504, "outcome-unknown", True)
    assert ((await first).status, (await first).problem) == (504, "outcome-unknown")

    # The first is released (429, nothing done): the waiter takes the key and executes.
    order = new_key()
    faults = {"X-Sample-Delay-Before": "0.5", "X-Sample-Reject": "429"}
    first = asyncio.create_task(pay(client, proxy, order, faults))
    await eventually(lambda: _requests_seen(ledger_backend, 2), "the second first request")
    waiter = await pay(client, proxy, order)
    assert ((await first).status, (await first).replayed) == (429, False)
    assert (waiter.status, waiter.problem, waiter.replayed) == (201, None, False)
    again = await client.post(
        proxy.url + "/v1/orders/pay", content=body_of(order), headers=JSON_HEADERS
    )
    assert again.headers["idempotent-replayed"] == "true"
    ledger = ledger_backend.ledger()
    assert ledger["charges"] == 2  # one per order
    assert ledger["double_charged_count"] == 0
