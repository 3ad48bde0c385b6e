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
    pay_route,
    run_to_exit,
)
from redis import exceptions as redis_errors

PROBLEM_BASE = "https://idempotency-proxy.dev/problems/"
CANARY_KEY = "idem:{canary}"
SAFE = ("--maxmemory-policy", "noeviction")
LRU = ("--maxmemory-policy", "allkeys-lru")
PAY_ROUTE = pay_route()
# Safe mode lasts lease + upstream timeout: 3 s here instead of 40 s by default.
SHORT_WINDOW_CONFIG: dict[str, Any] = {
    "store": {"canary_interval": "100ms"},
    "routes": [{**PAY_ROUTE, "lease": "1s", "upstream_timeout": "2s", "outcome_wait": "1s"}],
}
PAY_CONFIG: dict[str, Any] = {"routes": [PAY_ROUTE]}


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


def _check_store(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "check-store", "--redis-url", url],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_check_store_names_unsafe_settings_and_exits_by_severity(
    redis_factory: RedisFactory,
) -> None:
    """1 and the reason for each unsafe setting, 0 when safe, 2 when unreachable."""
    cases = {
        "allkeys-lru": (redis_factory(appendonly=True, args=LRU).url, 1),
        "aof-off": (redis_factory(appendonly=False, args=SAFE).url, 1),
        "safe": (redis_factory(appendonly=True, args=SAFE).url, 0),
        "unreachable": (f"redis://127.0.0.1:{free_port()}/0", 2),
    }
    # One interpreter start each; run side by side to keep the suite fast.
    running = {name: _check_store(url) for name, (url, _) in cases.items()}
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=60)
        results[name] = (process.returncode, stdout, stderr)
    for name, (code, stdout, stderr) in results.items():
        assert code == cases[name][1], (name, code, stdout, stderr)
        assert "Traceback" not in stderr, (name, stderr)

    _, lru_out, _ = results["allkeys-lru"]
    assert "WARNING  maxmemory-policy is allkeys-lru" in lru_out, lru_out
    assert "AOF persistence is on" in lru_out
    _, aof_out, _ = results["aof-off"]
    assert "WARNING  AOF persistence is off" in aof_out, aof_out
    assert "maxmemory-policy is noeviction" in aof_out
    _, safe_out, _ = results["safe"]
    assert "WARNING" not in safe_out, safe_out
    _, _, unreachable_err = results["unreachable"]
    assert "store unavailable" in unreachable_err, unreachable_err


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
    code, output = run_to_exit(proxy)
    assert code != 0, output
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


async def test_a_store_that_lost_data_puts_claims_in_safe_mode(
    redis_factory: RedisFactory,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    """A restart without persistence, then a FLUSHALL: each time the canary is gone, and
    each time claims fail closed for the window, then the proxy serves again."""
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

    second = _order()
    answer = await pay(client, proxy, second)
    assert answer.status_code == 201
    with redis.client() as sync:
        sync.flushall()
    await _safe_mode_then_recovery(client, proxy, ledger_backend, redis, second, answer.content)
    losses = [line for line in proxy_log_lines(proxy) if "canary gone" in line["msg"]]
    assert len(losses) == 2, losses


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

    # Redis refuses a write only while memory is already over the limit (counting the
    # command's own bytes), so fill with ever smaller values until even a one-byte SET is
    # refused. Then pin the limit below what is in use: a client hanging up frees a few
    # KB and would otherwise let the next write through again.
    filled, size = 0, 1024
    with redis.client() as sync:
        for index in range(20_000):  # ~2 MB of junk at most
            try:
                sync.set(f"junk:{index}", b"x" * size)
            except redis_errors.OutOfMemoryError:
                if size == 1:
                    break
                size = max(1, size // 16)
                continue
            filled = index + 1
        else:
            raise AssertionError("Redis never ran out of memory")
        sync.config_set("maxmemory", "1mb")
        with pytest.raises(redis_errors.OutOfMemoryError):
            sync.set("probe", b"x")
    print(f"Redis refused writes after {filled} junk keys")

    seen = requests_seen(ledger_backend)
    orders = [_order() for _ in range(4)]
    for order in orders:
        assert_store_unavailable(await pay(client, proxy, order))
    assert requests_seen(ledger_backend) == seen
    assert all(times_charged(ledger_backend, order) == 0 for order in orders)

    # Room again: the same keys are served, once each (nothing was left half-claimed).
    with redis.client() as sync:
        sync.config_set("maxmemory", "64mb")
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


def test_safe_mode_outlasts_a_request_that_waits_for_its_late_answer() -> None:
    """After a data loss the proxy fails closed until every request that may still reach
    the backend is over; one that timed out keeps its exchange open for `outcome_wait`."""
    from proxy.app import ProxyApp
    from proxy.config import Settings

    settings = Settings.model_validate(
        {
            "upstream": "http://127.0.0.1:1",
            "store": {"url": "redis://127.0.0.1:1/0"},
            "defaults": {"lease": "5s", "upstream_timeout": "10s", "outcome_wait": "60s"},
        }
    )
    app = ProxyApp(settings)
    assert app.store.watch.safe_mode_seconds >= 5 + 10 + 60  # type: ignore[attr-defined]
