"""A store that may forget, fill up or hang must never turn into a second charge.

Real Redis servers with the settings under test (eviction policy, AOF, maxmemory), the
sample payment backend (its ledger is the witness) and real proxy processes:

- `check-store` and start-up name unsafe settings; `store.require_safe` refuses them.
- A Redis that lost data (restart without persistence, FLUSHALL) is noticed through the
  canary, and claims fail closed (503) for lease + upstream timeout, then serve again.
- A full Redis (OOM) and a black-holed one (SIGSTOP) answer 503 and never reach the
  backend; the circuit breaker makes the black hole cheap after a few requests.

Timings are printed, never asserted: the machine is shared.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from harness import (
    REPO_ROOT,
    BackendServer,
    ProxyFactory,
    ProxyServer,
    RedisFactory,
    RedisServer,
    free_port,
)

PROBLEM_BASE = "https://idempotency-proxy.dev/problems/"
CANARY_KEY = "idem:{canary}"
SAFE = ("--maxmemory-policy", "noeviction")
LRU = ("--maxmemory-policy", "allkeys-lru")
PAY_ROUTE: dict[str, Any] = {
    "name": "pay",
    "methods": ["POST"],
    "path": "/v1/orders/pay",
    "key": {"from": "json", "field": "order_id"},
}
# Safe mode lasts lease + upstream timeout: 3 s here instead of 40 s by default.
SHORT_WINDOW_CONFIG: dict[str, Any] = {
    "store": {"canary_interval": "100ms"},
    "routes": [{**PAY_ROUTE, "lease": "1s", "upstream_timeout": "2s"}],
}
PAY_CONFIG: dict[str, Any] = {"routes": [PAY_ROUTE]}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0, trust_env=False) as http:
        yield http


def _order() -> str:
    return f"safety-{uuid.uuid4().hex[:12]}"


async def pay(client: httpx.AsyncClient, proxy: ProxyServer, order_id: str) -> httpx.Response:
    return await client.post(
        f"{proxy.url}/v1/orders/pay",
        json={"order_id": order_id, "amount": 1000, "currency": "EUR"},
    )


def times_charged(backend: BackendServer, order_id: str) -> int:
    orders: dict[str, int] = backend.ledger()["orders"]
    return int(orders.get(order_id, 0))


def requests_seen(backend: BackendServer) -> int:
    return int(backend.ledger()["requests_seen"])


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    assert "retry-after" in response.headers
    document = response.json()
    assert document["type"] == PROBLEM_BASE + "store-unavailable", document
    assert document["status"] == 503


def wait_for_canary(redis: RedisServer, timeout: float = 10.0) -> None:
    """Block until the proxy has written its canary (start-up, or after noticing a loss)."""
    deadline = time.monotonic() + timeout
    with redis.client() as sync:
        while time.monotonic() < deadline:
            if sync.exists(CANARY_KEY):
                return
            time.sleep(0.02)
    raise AssertionError("the proxy never (re)wrote its canary")


def proxy_log_lines(proxy: ProxyServer) -> list[dict[str, Any]]:
    lines = []
    for line in proxy.logs().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


# --------------------------------------------------------------------------- check-store


def _check_store(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-store", "--redis-url", url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("appendonly", "args", "code", "named"),
    [
        pytest.param(True, LRU, 1, "maxmemory-policy is allkeys-lru", id="allkeys-lru"),
        pytest.param(False, SAFE, 1, "AOF persistence is off", id="aof-off"),
        pytest.param(True, SAFE, 0, "maxmemory-policy is noeviction", id="safe"),
    ],
)
def test_check_store_names_unsafe_settings(
    redis_factory: RedisFactory, appendonly: bool, args: tuple[str, ...], code: int, named: str
) -> None:
    redis = redis_factory(appendonly=appendonly, args=args)
    result = _check_store(redis.url)
    assert result.returncode == code, result.stdout + result.stderr
    assert named in result.stdout, result.stdout
    if code == 0:
        assert "WARNING" not in result.stdout
    else:
        assert "WARNING" in result.stdout


def test_check_store_exits_2_when_redis_is_unreachable() -> None:
    result = _check_store(f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "store unavailable" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- start-up


def test_require_safe_refuses_to_start_on_an_unsafe_redis(
    redis_factory: RedisFactory, proxy_factory: ProxyFactory, ledger_backend: BackendServer
) -> None:
    redis = redis_factory(appendonly=True, args=LRU)
    proxy = proxy_factory(
        ledger_backend.url,
        redis.url,
        {**PAY_CONFIG, "store": {"require_safe": True}},
        start=False,
    )
    result = subprocess.run(
        proxy.command(),
        cwd=REPO_ROOT,
        env=proxy.environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    reasons = [line for line in output.splitlines() if "store.require_safe" in line]
    assert len(reasons) == 1, output
    assert "maxmemory-policy is allkeys-lru" in reasons[0]
    assert "Traceback" not in output


async def test_require_safe_starts_on_a_safe_redis(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory(appendonly=True, args=SAFE)
    proxy = proxy_factory(
        ledger_backend.url, redis.url, {**PAY_CONFIG, "store": {"require_safe": True}}
    )
    order = _order()
    assert (await pay(client, proxy, order)).status_code == 201
    assert times_charged(ledger_backend, order) == 1
    warnings = [line for line in proxy_log_lines(proxy) if line["level"] == "warning"]
    assert not [w for w in warnings if "maxmemory-policy" in w["msg"] or "AOF" in w["msg"]]


async def test_an_unsafe_redis_is_named_in_the_log_at_start_up(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory(appendonly=False, args=LRU)
    proxy = proxy_factory(ledger_backend.url, redis.url, PAY_CONFIG)
    order = _order()
    assert (await pay(client, proxy, order)).status_code == 201
    warnings = [line["msg"] for line in proxy_log_lines(proxy) if line["level"] == "warning"]
    assert any("maxmemory-policy is allkeys-lru" in msg for msg in warnings), warnings
    assert any("AOF persistence is off" in msg for msg in warnings), warnings


# --------------------------------------------------------------------------- data loss


async def _safe_mode_then_recovery(
    client: httpx.AsyncClient,
    proxy: ProxyServer,
    backend: BackendServer,
    redis: RedisServer,
    first: str,
    first_body: bytes,
) -> None:
    """After a loss: claims fail closed, the lost record's duplicate is never re-executed,
    and a bounded poll sees the proxy serve again once the window has passed."""
    wait_for_canary(redis)  # rewritten by the watcher in the same step that noticed the loss
    noticed = time.monotonic()
    seen = requests_seen(backend)
    fresh = _order()
    refused = await pay(client, proxy, fresh)
    assert_store_unavailable(refused)
    duplicate = await pay(client, proxy, first)
    # The record is gone from Redis; a replay from the proxy's own cache is still the true
    # answer, anything else must be a refusal. Never a second execution.
    if duplicate.status_code != 503:
        assert duplicate.headers.get("idempotent-replayed") == "true"
        assert duplicate.content == first_body
    else:
        assert_store_unavailable(duplicate)
    assert requests_seen(backend) == seen
    assert times_charged(backend, fresh) == 0
    assert times_charged(backend, first) == 1

    statuses = []
    deadline = time.monotonic() + 30
    response = refused
    while response.status_code == 503 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        response = await pay(client, proxy, fresh)
        statuses.append(response.status_code)
    print(f"safe mode lasted ~{time.monotonic() - noticed:.2f}s after the canary came back")
    assert response.status_code == 201, statuses
    assert set(statuses[:-1]) <= {503}, statuses
    assert times_charged(backend, fresh) == 1
    assert times_charged(backend, first) == 1
    losses = [line for line in proxy_log_lines(proxy) if "canary gone" in line["msg"]]
    assert losses and losses[-1]["level"] == "error"


async def test_a_redis_restart_without_persistence_puts_claims_in_safe_mode(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory(appendonly=False, args=SAFE)
    proxy = proxy_factory(ledger_backend.url, redis.url, SHORT_WINDOW_CONFIG)
    wait_for_canary(redis)
    first = _order()
    answer = await pay(client, proxy, first)
    assert answer.status_code == 201
    assert (await pay(client, proxy, first)).headers.get("idempotent-replayed") == "true"

    redis.stop()
    redis.start()  # same port, no AOF, no RDB: every record and the canary are gone
    with redis.client() as sync:
        assert sync.dbsize() <= 1  # at most the canary, if the proxy already rewrote it
    await _safe_mode_then_recovery(client, proxy, ledger_backend, redis, first, answer.content)
    assert any("AOF persistence is off" in line["msg"] for line in proxy_log_lines(proxy))


async def test_flushall_puts_claims_in_safe_mode(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory(appendonly=True, args=SAFE)
    proxy = proxy_factory(ledger_backend.url, redis.url, SHORT_WINDOW_CONFIG)
    wait_for_canary(redis)
    first = _order()
    answer = await pay(client, proxy, first)
    assert answer.status_code == 201

    with redis.client() as sync:
        sync.flushall()
    await _safe_mode_then_recovery(client, proxy, ledger_backend, redis, first, answer.content)


# --------------------------------------------------------------------------- full, hung


async def test_an_out_of_memory_redis_fails_closed(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory(appendonly=True, args=("--maxmemory", "2mb", *SAFE))
    proxy = proxy_factory(ledger_backend.url, redis.url, PAY_CONFIG)
    wait_for_canary(redis)
    assert (await pay(client, proxy, _order())).status_code == 201

    filler = b"x" * 1024
    filled = 0
    with redis.client() as sync:
        for index in range(20_000):  # ~2 MB of junk at most before Redis says OOM
            try:
                sync.set(f"junk:{index}", filler)
            except Exception as exc:
                assert "OOM" in str(exc), exc
                break
            filled += 1
        else:
            raise AssertionError("Redis never ran out of memory")
    print(f"Redis refused writes after {filled} junk keys")

    seen = requests_seen(ledger_backend)
    orders = [_order() for _ in range(4)]
    for order in orders:
        assert_store_unavailable(await pay(client, proxy, order))
    assert requests_seen(ledger_backend) == seen
    assert all(times_charged(ledger_backend, order) == 0 for order in orders)

    # Memory back: the same keys are served, once each (nothing was left half-claimed).
    with redis.client() as sync:
        for start in range(0, filled, 500):
            sync.delete(*[f"junk:{i}" for i in range(start, min(filled, start + 500))])
    for order in orders:
        response = await pay(client, proxy, order)
        deadline = time.monotonic() + 15
        while response.status_code == 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            response = await pay(client, proxy, order)
        assert response.status_code == 201, response.text
        assert times_charged(ledger_backend, order) == 1


async def test_a_black_holed_redis_answers_503_and_the_breaker_makes_it_fast(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory(appendonly=True, args=SAFE)
    proxy = proxy_factory(ledger_backend.url, redis.url, PAY_CONFIG)
    wait_for_canary(redis)
    assert (await pay(client, proxy, _order())).status_code == 201
    seen = requests_seen(ledger_backend)

    async def timed(order: str) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = await pay(client, proxy, order)
        return response, time.perf_counter() - started

    redis.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        # Five at once: each waits out the store timeout and retries, and together they
        # open the breaker (threshold 5) ...
        first_wave = await asyncio.gather(*(timed(_order()) for _ in range(5)))
        # ... so the next ones are refused without touching Redis.
        second_wave = [await timed(_order()) for _ in range(3)]
    finally:
        redis.resume()
    print(
        "black-holed Redis, latencies (s): first wave "
        + ", ".join(f"{t:.2f}" for _, t in first_wave)
        + "; after the breaker opened "
        + ", ".join(f"{t:.3f}" for _, t in second_wave)
    )
    for response, _ in (*first_wave, *second_wave):
        assert_store_unavailable(response)
    assert requests_seen(ledger_backend) == seen

    # Resumed: after the cooldown the breaker lets a probe through and traffic flows again.
    order = _order()
    deadline = time.monotonic() + 30
    response = await pay(client, proxy, order)
    while response.status_code == 503 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        response = await pay(client, proxy, order)
    assert response.status_code == 201, response.text
    assert times_charged(ledger_backend, order) == 1
