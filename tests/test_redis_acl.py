"""The minimal Redis ACL in docs/security.md is enough for the proxy and its operator tools.

The ACL line is read from the document itself, applied to a real Redis, and the proxy then
claims, completes and replays a payment as that user; `records` and `check-store` work
too. A command the proxy needs and the line forgets would show up here as a 503.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

import httpx
import redis
from harness import (
    HOST,
    BackendServer,
    ProxyFactory,
    RedisFactory,
    pay_route,
    records_cli,
    wait_for_http,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
PASSWORD = "acl-test-password-0123456789"


def _acl_line() -> list[str]:
    (line,) = [
        line.strip()
        for line in DOC.read_text().splitlines()
        if line.strip().startswith("ACL SETUSER idempotency-proxy ")
    ]
    words = shlex.split(line.replace(">CHANGE-ME", ">" + PASSWORD))
    assert words[:3] == ["ACL", "SETUSER", "idempotency-proxy"]
    return words


async def test_the_documented_acl_is_enough_for_the_proxy_and_the_records_commands(
    redis_factory: RedisFactory, ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    server = redis_factory(appendonly=True)
    admin = redis.Redis.from_url(server.url)
    try:
        admin.execute_command(*_acl_line())
        # Outside the ACL: another key, a command the proxy never needs.
        user = redis.Redis.from_url(server.url, username="idempotency-proxy", password=PASSWORD)
        try:
            for denied in (("GET", "other-key"), ("FLUSHALL",), ("KEYS", "*")):
                try:
                    user.execute_command(*denied)
                except redis.exceptions.NoPermissionError:
                    continue
                raise AssertionError(f"{denied} was allowed")
        finally:
            user.close()
    finally:
        admin.close()
    url = server.url.replace("redis://", f"redis://idempotency-proxy:{PASSWORD}@", 1)

    # A waiting route (woken over pub/sub) with a status check: every script runs.
    route = pay_route(
        required=True,
        in_flight="wait",
        wait_timeout="10s",
        status_check={"path": "/v1/orders/{order_id}/status", "after": "0s"},
    )
    config = {"admin": {"host": HOST}, "routes": [route]}
    proxy = proxy_factory(ledger_backend.url, url, config=config)
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    order = {"order_id": "ord-acl-1", "amount": 700, "currency": "EUR"}
    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
        first = await client.post(f"{proxy.url}/v1/orders/pay", json=order)
        replay = await client.post(f"{proxy.url}/v1/orders/pay", json=order)
    assert first.status_code == 201, first.text
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
        slow = {**order, "order_id": "ord-acl-2"}
        late = asyncio.ensure_future(
            client.post(f"{proxy.url}/v1/orders/pay", json=slow, headers={"X-Sample-Delay": "1"})
        )
        await asyncio.sleep(0.3)
        waiter = await client.post(f"{proxy.url}/v1/orders/pay", json=slow)
        assert (await late).status_code == 201
        assert waiter.status_code == 201 and waiter.headers["idempotent-replayed"] == "true"
        reset = {**order, "order_id": "ord-acl-3"}
        dropped = await client.post(
            f"{proxy.url}/v1/orders/pay", json=reset, headers={"X-Sample-Drop": "after"}
        )
        assert dropped.status_code == 502
        for _ in range(50):
            resolved = await client.post(f"{proxy.url}/v1/orders/pay", json=reset)
            if resolved.status_code != 502:
                break
            await asyncio.sleep(0.1)
        assert resolved.status_code == 200, resolved.text
    assert ledger_backend.ledger()["orders"] == {"ord-acl-1": 1, "ord-acl-2": 1, "ord-acl-3": 1}
    logs = proxy.logs()
    assert "subscription lost" not in logs
    assert "NoPermission" not in logs and "NOPERM" not in logs
    assert PASSWORD not in "\n".join(
        line for line in logs.splitlines() if not line.startswith("=== start ")
    )

    assert proxy.config_path is not None
    common = ("--redis-url", url, "--config", str(proxy.config_path))
    code, out, err = await records_cli("show", *common, "--route", "pay", "--key", "ord-acl-1")
    assert code == 0 and '"COMPLETED"' in out, err
    code, out, err = await records_cli(
        "release", *common, "--route", "pay", "--key", "ord-acl-1", "--force"
    )
    assert code == 0, err
