"""Waiting duplicates are woken when their record settles, on any replica.

On `in_flight: wait` routes a duplicate waits for the first request. With
`store.wake_waiters` (the default) the transition that settles the record
publishes its key and every replica wakes its waiters at once; polling (every
second at most) is only the fallback. Measured here: the time from the first
request's answer (its completion) to the waiting duplicate's replay, with and
without wake-ups, across two replicas on one Redis.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
import pytest
from conftest import ProxyFactory
from harness import HOST, BackendServer, pay, pay_route

ORDERS = 6
SLOW = {"X-Sample-Delay": "1.5"}


def wait_config(wake: bool) -> dict[str, Any]:
    return {
        "admin": {"host": HOST},
        "store": {"wake_waiters": wake},
        "routes": [pay_route(in_flight="wait", wait_timeout="10s")],
    }


async def completion_to_waiter(
    client: httpx.AsyncClient, first_to: Any, waiter_to: Any, order: str
) -> float:
    async def first() -> float:
        outcome = await pay(client, first_to, order, SLOW)
        assert (outcome.status, outcome.replayed) == (201, False), outcome.label
        return time.monotonic()

    async def waiter() -> float:
        await asyncio.sleep(0.3)  # the first one is in flight by now
        outcome = await pay(client, waiter_to, order)
        assert (outcome.status, outcome.replayed) == (201, True), outcome.label
        return time.monotonic()

    done, answered = await asyncio.gather(first(), waiter())
    return answered - done


@pytest.mark.parametrize("wake", [True, False], ids=["wake", "poll"])
async def test_a_waiting_duplicate_is_woken_across_replicas(
    wake: bool,
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    a = proxy_factory(ledger_backend.url, redis_url, wait_config(wake))
    b = proxy_factory(ledger_backend.url, redis_url, wait_config(wake))
    run = time.monotonic_ns()
    latencies = await asyncio.gather(
        *(completion_to_waiter(client, a, b, f"wake-{run}-{n}") for n in range(ORDERS))
    )
    ms = sorted(round(max(0.0, x) * 1000, 1) for x in latencies)
    print(f"\n[completion -> waiter's replay, {'wake' if wake else 'poll'}] ms: {ms}")
    book = ledger_backend.ledger()
    assert book["double_charged_count"] == 0 and book["charges"] == ORDERS
    if wake:
        # Woken within milliseconds; without the wake-up the fallback poll is ~1 s apart.
        assert statistics.median(latencies) < 0.08, ms
        assert max(latencies) < 0.5, ms


async def test_a_waiter_in_the_same_process_is_woken_by_the_memory_store(
    ledger_backend: BackendServer, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(ledger_backend.url, None, wait_config(True))
    run = time.monotonic_ns()
    latencies = await asyncio.gather(
        *(completion_to_waiter(client, proxy, proxy, f"wake-mem-{run}-{n}") for n in range(3))
    )
    assert statistics.median(latencies) < 0.08, latencies
