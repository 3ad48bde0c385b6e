"""Store health on /metrics of a real proxy process: the circuit breaker, data-loss safe mode,
WAIT shortfalls and the replay cache, each driven by what really happens to a real Redis.
Also: no `_created` series.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from harness import (
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyFactory,
    ProxyServer,
    RedisFactory,
    body_of,
    eventually,
    pay_route,
    wait_for_http,
)
from prometheus_client.parser import text_string_to_metric_families


async def _metrics(client: httpx.AsyncClient, proxy: ProxyServer) -> dict[str, float]:
    text = (await client.get(f"{proxy.admin_url}/metrics")).text
    assert "_created" not in text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels and sample.name.startswith("idempotency_proxy_")
    }


async def test_store_health_metrics_follow_the_store(
    ledger_backend: BackendServer,
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory()
    config = {
        "admin": {"host": "127.0.0.1"},
        "store": {
            # A frozen Redis times out whatever the timeout; a loaded machine must not make
            # a healthy one look frozen (the first payment after the cooldown connects
            # afresh and makes three store calls, each within this, with no retry).
            "timeout": "500ms",
            "retries": 0,
            "breaker_threshold": 2,
            "breaker_cooldown": "5s",
            "canary_interval": "100ms",
            # No replica is attached, so every WAIT comes back short.
            "wait_replicas": 1,
            "wait_timeout": "5ms",
        },
        # Safe mode lasts lease + upstream_timeout: long enough to see, short to wait out.
        "defaults": {"lease": "2s", "upstream_timeout": "2s", "outcome_wait": "0s"},
        "routes": [pay_route()],
    }
    proxy = proxy_factory(ledger_backend.url, redis.url, config=config)
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    pay = proxy.url + PAY_PATH

    before = await _metrics(client, proxy)
    for name in (
        "idempotency_proxy_store_circuit_open",
        "idempotency_proxy_store_circuit_opened_total",
        "idempotency_proxy_store_safe_mode",
        "idempotency_proxy_store_data_losses_total",
        "idempotency_proxy_replay_cache_hits_total",
        "idempotency_proxy_replay_cache_entries",
    ):
        assert before[name] == 0, name

    # Replay cache: the owner caches its completed response; the duplicate is a hit.
    first = await client.post(pay, content=body_of("m-1"), headers=JSON_HEADERS)
    again = await client.post(pay, content=body_of("m-1"), headers=JSON_HEADERS)
    assert again.headers["idempotent-replayed"] == "true"
    seen = await _metrics(client, proxy)
    assert seen["idempotency_proxy_replay_cache_misses_total"] == 1
    assert seen["idempotency_proxy_replay_cache_hits_total"] == 1
    assert seen["idempotency_proxy_replay_cache_entries"] == 1
    assert seen["idempotency_proxy_replay_cache_bytes"] >= len(first.content)
    # claim, mark_sent and complete each waited for a replica that is not there.
    assert seen["idempotency_proxy_store_wait_shortfalls_total"] == 3

    # Data loss: the canary vanishes with everything else; claims fail closed for a while.
    with redis.client() as direct:
        direct.flushall()

    async def safe_mode() -> dict[str, float] | None:
        now = await _metrics(client, proxy)
        return now if now["idempotency_proxy_store_safe_mode"] == 1 else None

    lost = await eventually(safe_mode, "safe mode", timeout=10)
    assert lost["idempotency_proxy_store_data_losses_total"] == 1
    refused = await client.post(pay, content=body_of("m-2"), headers=JSON_HEADERS)
    assert refused.status_code == 503

    async def safe_again() -> dict[str, float] | None:
        now = await _metrics(client, proxy)
        return now if now["idempotency_proxy_store_safe_mode"] == 0 else None

    await eventually(safe_again, "safe mode to end", timeout=15)

    # Breaker: a frozen Redis times out; after two failures in a row the circuit opens.
    redis.pause()
    try:
        for n in range(3):
            answer = await client.post(pay, content=body_of(f"m-3-{n}"), headers=JSON_HEADERS)
            assert answer.status_code == 503
        opened = await _metrics(client, proxy)
        assert opened["idempotency_proxy_store_circuit_open"] == 1
        assert opened["idempotency_proxy_store_circuit_opened_total"] == 1
    finally:
        redis.resume()
    await asyncio.sleep(5.2)  # the cooldown; the next call probes and closes it
    ok = await client.post(pay, content=body_of("m-4"), headers=JSON_HEADERS)
    assert ok.status_code == 201
    closed = await _metrics(client, proxy)
    assert closed["idempotency_proxy_store_circuit_open"] == 0
    assert closed["idempotency_proxy_store_circuit_opened_total"] == 1


async def test_a_503_logs_the_time_it_spent_on_the_store(
    ledger_backend: BackendServer,
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    """A store call that timed out is store time: the log line of the 503 it caused says
    so, instead of 0 (or only the time of the calls that succeeded before it)."""
    redis = redis_factory()
    config = {
        "admin": {"host": "127.0.0.1"},
        "store": {"timeout": "300ms", "retries": 0, "breaker_threshold": 100},
        "routes": [pay_route()],
    }
    proxy = proxy_factory(ledger_backend.url, redis.url, config=config)
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    redis.pause()
    try:
        refused = await client.post(
            proxy.url + PAY_PATH, content=body_of("slow-store"), headers=JSON_HEADERS
        )
    finally:
        redis.resume()
    assert refused.status_code == 503
    request_id = refused.headers["x-request-id"]

    async def logged() -> dict[str, object] | None:
        for line in proxy.logs().splitlines():
            if request_id in line and '"msg":"request"' in line:
                found: dict[str, object] = json.loads(line)
                return found
        return None

    line = await eventually(logged, "the request's log line")
    assert line["outcome"] == "store_unavailable"
    assert isinstance(line["store_ms"], float) and line["store_ms"] >= 250, line
