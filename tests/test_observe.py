"""Observe mode on real processes: every request reaches the backend as if the proxy were not
there, first requests are still claimed and recorded, and each duplicate enforcement would have
answered itself is counted (`idempotency_proxy_observed_total{route, would}`) and logged with
what enforcement would have answered. A store that is down never blocks anything.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import redis
from harness import (
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyFactory,
    RedisFactory,
    body_of,
    charges_route,
    pay_route,
    problem_name,
    storage_key,
    wait_for_http,
)
from prometheus_client.parser import text_string_to_metric_families


def _observed(text: str) -> dict[tuple[str, str], float]:
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "idempotency_proxy_observed":
            for sample in family.samples:
                found[(sample.labels["route"], sample.labels["would"])] = sample.value
    return found


def _request_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for raw in log.splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            if line.get("msg") == "request":
                lines.append(line)
    return lines


async def test_observe_forwards_every_duplicate_and_counts_what_enforcement_would_do(
    ledger_backend: BackendServer,
    redis_url: str,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    config = {
        "admin": {"host": "127.0.0.1"},
        "routes": [pay_route(mode="observe"), charges_route()],
    }
    proxy = proxy_factory(ledger_backend.url, redis_url, config=config)
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    pay = proxy.url + PAY_PATH

    # A double click after completion: enforcement would replay; observe charges twice.
    first = await client.post(pay, content=body_of("obs-1"), headers=JSON_HEADERS)
    second = await client.post(pay, content=body_of("obs-1"), headers=JSON_HEADERS)
    assert (first.status_code, second.status_code) == (201, 201)
    assert "idempotent-replayed" not in second.headers
    assert first.json()["charge_id"] != second.json()["charge_id"]

    # A tampered amount: enforcement would answer 422; observe forwards it.
    tampered = await client.post(pay, content=body_of("obs-1", 99), headers=JSON_HEADERS)
    assert tampered.status_code == 201 and problem_name(tampered) is None

    # Two copies at once: enforcement would answer 409 to the one that arrives second.
    slow = {**JSON_HEADERS, "X-Sample-Delay": "0.5"}
    both = await asyncio.gather(
        client.post(pay, content=body_of("obs-2"), headers=slow),
        client.post(pay, content=body_of("obs-2"), headers=JSON_HEADERS),
    )
    assert [r.status_code for r in both] == [201, 201]

    # A missing key on a required route: enforcement would answer 400.
    keyless = await client.post(pay, json={"amount": 5}, headers=JSON_HEADERS)
    assert problem_name(keyless) != "key-missing"

    ledger = ledger_backend.ledger()
    assert ledger["orders"]["obs-1"] == 3
    assert ledger["orders"]["obs-2"] == 2

    # The first request of each order was recorded as enforcement would have.
    with redis.Redis.from_url(redis_url) as store:
        for order in ("obs-1", "obs-2"):
            assert store.hget(storage_key(order), "state") == b"COMPLETED", order

    metrics = (await client.get(f"{proxy.admin_url}/metrics")).text
    observed = _observed(metrics)
    assert observed[("pay", "replayed")] == 1
    assert observed[("pay", "key_reused")] == 1
    assert observed[("pay", "in_flight")] == 1
    assert observed[("pay", "key_missing")] == 1
    assert all(route == "pay" for route, _ in observed)

    lines = [line for line in _request_lines(proxy.logs()) if line.get("route") == "pay"]
    would = sorted((line["would"], line["would_status"]) for line in lines if "would" in line)
    assert would == [
        ("in_flight", 409),
        ("key_missing", 400),
        ("key_reused", 422),
        ("replayed", 201),
    ]
    assert {line["outcome"] for line in lines if "would" in line} == {"observed"}
    for line in lines:
        assert "obs-1" not in json.dumps(line)

    # The enforcing route next to it still enforces.
    charge = {"Idempotency-Key": "k-enforced", **JSON_HEADERS}
    c1 = await client.post(f"{proxy.url}/v1/charges", json={"amount": 1}, headers=charge)
    c2 = await client.post(f"{proxy.url}/v1/charges", json={"amount": 1}, headers=charge)
    assert c2.headers.get("idempotent-replayed") == "true"
    assert c1.content == c2.content


async def test_observe_forwards_when_the_store_is_down(
    ledger_backend: BackendServer,
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory()
    config = {
        "admin": {"host": "127.0.0.1"},
        "store": {"timeout": "100ms", "retries": 0},
        "routes": [pay_route()],
    }
    proxy = proxy_factory(ledger_backend.url, redis.url, config=config, args=["--mode", "observe"])
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    redis.stop()
    answers = [
        await client.post(proxy.url + PAY_PATH, content=body_of(f"down-{n}"), headers=JSON_HEADERS)
        for n in range(3)
    ]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert ledger_backend.ledger()["orders"] == {"down-0": 1, "down-1": 1, "down-2": 1}
    observed = _observed((await client.get(f"{proxy.admin_url}/metrics")).text)
    assert observed[("pay", "store_unavailable")] == 3


async def test_observe_logs_the_status_of_the_routes_error_format(
    ledger_backend: BackendServer,
    redis_url: str,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    config = {
        "error_formats": {
            "legacy": {
                "content_type": "application/json",
                "status": {"key-reused": 400},
                "body": {"message": "{detail}"},
            }
        },
        "routes": [pay_route(mode="observe", error_format="legacy")],
    }
    proxy = proxy_factory(ledger_backend.url, redis_url, config=config)
    pay = proxy.url + PAY_PATH
    for amount in (10, 11):
        answer = await client.post(pay, content=body_of("fmt-1", amount), headers=JSON_HEADERS)
        assert answer.status_code == 201
    proxy.stop()
    would = [line for line in _request_lines(proxy.logs()) if "would" in line]
    assert [(line["would"], line["would_status"]) for line in would] == [("key_reused", 400)]
