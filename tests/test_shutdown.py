"""Graceful shutdown of a real proxy process, as Kubernetes does it: SIGTERM mid-request.

A rolling update must not turn a payment in flight into an error or an UNKNOWN record:
the client still gets the backend's answer, the record is COMPLETED (so a retry on another
replica is a replay, not a second charge), readiness drops so no new traffic arrives, and
the process exits 0 well within the pod's termination grace period.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
from harness import BackendServer, ProxyFactory, eventually, pay_route, wait_for_http
from prometheus_client.parser import text_string_to_metric_families

CONFIG: dict[str, Any] = {"routes": [pay_route()]}
# The pods' terminationGracePeriodSeconds is 60 (k8s/); stay well inside it.
GRACE_SECONDS = 30.0
POLL_SECONDS = 0.02


async def test_sigterm_drains_a_request_in_flight(
    ledger_backend: BackendServer, redis_url: str, proxy_factory: ProxyFactory
) -> None:
    draining = proxy_factory(ledger_backend.url, redis_url, config=CONFIG)
    other = proxy_factory(ledger_backend.url, redis_url, config=CONFIG)
    for proxy in (draining, other):
        wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    order = {"order_id": "ord-drain-1", "amount": 4200, "currency": "EUR"}

    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
        # The backend commits the charge, then sleeps 1.5 s before answering.
        in_flight = asyncio.ensure_future(
            client.post(
                f"{draining.url}/v1/orders/pay", json=order, headers={"X-Sample-Delay": "1.5"}
            )
        )

        async def charged() -> bool | None:
            ledger = (await client.get(f"{ledger_backend.url}/v1/ledger")).json()
            return True if ledger["orders"].get(order["order_id"]) == 1 else None

        await eventually(
            charged, "the backend to commit the charge", timeout=15.0, interval=POLL_SECONDS
        )

        async def gauge() -> float | None:
            text = (await client.get(f"{draining.admin_url}/metrics")).text
            for family in text_string_to_metric_families(text):
                if family.name == "idempotency_proxy_in_flight_requests":
                    return family.samples[0].value
            return None

        assert await gauge() == 1
        assert not in_flight.done()
        os.kill(draining.pid, signal.SIGTERM)

        # Draining: no longer ready, and the traffic port takes no new connection.
        async def not_ready() -> str | None:
            try:
                ready = await client.get(f"{draining.admin_url}/readyz")
            except httpx.TransportError:
                return "admin port closed"
            if ready.status_code == 503:
                assert ready.json() == {"status": "draining"}
                return "503 draining"
            return None

        await eventually(not_ready, "readiness to drop", timeout=15.0, interval=POLL_SECONDS)

        async def refused() -> bool | None:
            try:
                async with httpx.AsyncClient(timeout=2.0, trust_env=False) as fresh:
                    await fresh.get(f"{draining.url}/v1/orders/{order['order_id']}")
            except httpx.ConnectError:
                return True
            return None

        await eventually(refused, "the traffic port to close", timeout=15.0, interval=POLL_SECONDS)

        response = await in_flight
        assert response.status_code == 201
        assert "idempotent-replayed" not in response.headers
        assert response.json()["order_id"] == order["order_id"]

        code = await asyncio.to_thread(draining.wait, GRACE_SECONDS)
        assert code == 0, draining.logs()[-4000:]

        # The record was completed before the process went away: another replica replays.
        duplicate = await client.post(f"{other.url}/v1/orders/pay", json=order)
        assert duplicate.status_code == 201
        assert duplicate.headers["idempotent-replayed"] == "true"
        assert duplicate.content == response.content

    assert ledger_backend.ledger()["orders"] == {order["order_id"]: 1}
    assert '"outcome":"forwarded"' in draining.logs()
