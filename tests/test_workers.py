"""`--workers N`: one port, N processes, and one admin port that speaks for all of them.

Each worker is a whole proxy with its own metrics, breaker and replay cache; the
supervisor's admin port asks every worker: ready when all are, every worker's series
labelled `worker`, so that their sum is the pod's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter, defaultdict
from typing import Any

import httpx
from harness import (
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyFactory,
    RedisFactory,
    body_of,
    eventually,
    pay_config,
    run_to_exit,
    wait_for_http,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy import workers as workers_module

NEW_PAYMENTS = 24


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


async def test_two_workers_answer_one_admin_port_for_both(
    ledger_backend: BackendServer, redis_factory: RedisFactory, proxy_factory: ProxyFactory
) -> None:
    """Readiness names both workers; the requests counted under `worker="0"` and
    `worker="1"` add up to exactly the requests sent, one execution per new key."""
    redis = redis_factory()
    proxy = proxy_factory(
        ledger_backend.url, redis.url, config=pay_config(), args=["--workers", "2"]
    )
    wait_for_http(f"{proxy.admin_url}/readyz", 20.0)
    async with httpx.AsyncClient(timeout=10, trust_env=False) as admin:
        ready = await admin.get(f"{proxy.admin_url}/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "workers": {"0": "ready", "1": "ready"}}
        assert (await admin.get(f"{proxy.admin_url}/livez")).json() == {"status": "ok"}

    orders = [f"ord-{uuid.uuid4().hex[:12]}" for _ in range(NEW_PAYMENTS)]

    async def pay_twice(order: str) -> tuple[int, int]:
        # A connection each, so that the kernel hands them to either worker.
        statuses = []
        for _ in range(2):
            async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
                response = await client.post(
                    proxy.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
                )
                statuses.append(response.status_code)
        return statuses[0], statuses[1]

    results = await asyncio.gather(*(pay_twice(order) for order in orders))
    assert results == [(201, 201)] * NEW_PAYMENTS
    assert ledger_backend.ledger()["charges"] == NEW_PAYMENTS

    async with httpx.AsyncClient(timeout=10, trust_env=False) as admin:
        text = (await admin.get(f"{proxy.admin_url}/metrics")).text
    by_outcome: dict[str, float] = defaultdict(float)
    workers: Counter[str] = Counter()
    for labels, value in _samples(text, "idempotency_proxy_requests_total"):
        by_outcome[labels["outcome"]] += value
        workers[labels["worker"]] += int(value)
    assert by_outcome == {"forwarded": NEW_PAYMENTS, "replayed": NEW_PAYMENTS}
    assert set(workers) <= {"0", "1"}
    up = _samples(text, "idempotency_proxy_worker_up")
    assert sorted((labels["worker"], value) for labels, value in up) == [("0", 1.0), ("1", 1.0)]
    builds = _samples(text, "idempotency_proxy_build_info")
    assert sorted(labels["worker"] for labels, _ in builds) == ["0", "1"]
    # Each worker's own store state, labelled: one breaker each, both closed.
    circuits = _samples(text, "idempotency_proxy_store_circuit_open")
    assert sorted((labels["worker"], value) for labels, value in circuits) == [
        ("0", 0.0),
        ("1", 0.0),
    ]


async def test_a_worker_that_dies_is_replaced_under_its_number(
    ledger_backend: BackendServer, redis_factory: RedisFactory, proxy_factory: ProxyFactory
) -> None:
    """uvicorn's supervisor starts a worker again after it dies; readiness says so meanwhile,
    and the new worker reports under the number of the one it replaces."""
    redis = redis_factory()
    proxy = proxy_factory(
        ledger_backend.url, redis.url, config=pay_config(), args=["--workers", "2"]
    )
    wait_for_http(f"{proxy.admin_url}/readyz", 20.0)
    async with httpx.AsyncClient(timeout=10, trust_env=False) as admin:

        async def build_pids() -> dict[str, float]:
            text = (await admin.get(f"{proxy.admin_url}/metrics")).text
            pids = _samples(text, "process_start_time_seconds")
            return {labels["worker"]: value for labels, value in pids}

        before = await build_pids()
        assert sorted(before) == ["0", "1"]
        workers = _children(proxy.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)

        async def replaced() -> dict[str, Any] | None:
            ready = await admin.get(f"{proxy.admin_url}/readyz")
            if ready.status_code != 200:
                return None
            now = await build_pids()
            return now if sorted(now) == ["0", "1"] and now != before else None

        after = await eventually(replaced, "the worker to be replaced", timeout=30.0)
        # One worker started again (a later start time), the other kept its own.
        assert sum(after[n] != before[n] for n in ("0", "1")) == 1
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        response = await client.post(
            proxy.url + PAY_PATH,
            content=body_of(f"ord-{uuid.uuid4().hex[:12]}"),
            headers=JSON_HEADERS,
        )
    assert response.status_code == 201


async def test_the_admin_port_of_several_workers_drains_on_sigterm(
    ledger_backend: BackendServer, redis_factory: RedisFactory, proxy_factory: ProxyFactory
) -> None:
    """SIGTERM to the supervisor: readiness drops at once, the workers finish what is in
    flight, and the process exits 0."""
    redis = redis_factory()
    proxy = proxy_factory(
        ledger_backend.url, redis.url, config=pay_config(), args=["--workers", "2"]
    )
    wait_for_http(f"{proxy.admin_url}/readyz", 20.0)
    order = f"ord-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        in_flight = asyncio.ensure_future(
            client.post(
                proxy.url + PAY_PATH,
                content=body_of(order),
                headers={**JSON_HEADERS, "X-Sample-Delay": "1.5"},
            )
        )

        async def charged() -> bool | None:
            return True if ledger_backend.ledger()["orders"].get(order) == 1 else None

        await eventually(charged, "the backend to commit the charge", timeout=15.0)
        os.kill(proxy.pid, signal.SIGTERM)

        async def draining() -> bool | None:
            ready = await client.get(f"{proxy.admin_url}/readyz")
            if ready.status_code == 503:
                assert ready.json() == {"status": "draining"}
                return True
            return None

        await eventually(draining, "readiness to drop", timeout=10.0, interval=0.02)
        response = await in_flight
        assert response.status_code == 201
    assert await asyncio.to_thread(proxy.wait, 30.0) == 0


def _children(pid: int) -> list[int]:
    """The worker processes of the supervisor `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) != pid:
            continue
        # multiprocessing's resource tracker is a child too, and no worker.
        if b"spawn_main" in command and b"resource_tracker" not in command:
            found.append(int(entry))
    return sorted(found)


def test_a_worker_that_cannot_start_stops_the_process_with_3(
    ledger_backend: BackendServer, redis_factory: RedisFactory, proxy_factory: ProxyFactory
) -> None:
    """`store.require_safe` on a Redis that may evict: one worker exits 3, and so does the
    process, with the reason in one line and no traceback, as with one worker. (uvicorn's
    supervisor stops then, and returned as if after a signal: exit 0, a clean stop.)"""
    redis = redis_factory(args=["--maxmemory-policy", "allkeys-lru"])
    proxy = proxy_factory(
        ledger_backend.url,
        redis.url,
        {**pay_config(), "store": {"require_safe": True}},
        args=["--workers", "2"],
        start=False,
    )
    code, output = run_to_exit(proxy)
    assert code == 3, output
    assert "maxmemory-policy is allkeys-lru" in output
    assert "Traceback" not in output


async def test_sighup_leaves_the_workers_and_their_numbers_as_they_are(
    ledger_backend: BackendServer, redis_factory: RedisFactory, proxy_factory: ProxyFactory
) -> None:
    """uvicorn's supervisor would start new workers beside the old ones on SIGHUP (and add
    or remove one on SIGTTIN/SIGTTOU): workers the admin port does not number or ask, and a
    readiness that stays 503. The proxy says it ignores them."""
    redis = redis_factory()
    proxy = proxy_factory(
        ledger_backend.url, redis.url, config=pay_config(), args=["--workers", "2"]
    )
    wait_for_http(f"{proxy.admin_url}/readyz", 20.0)
    workers = _children(proxy.pid)
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        os.kill(proxy.pid, sig)
    await eventually(lambda: _logged(proxy, "SIGTTOU ignored"), "the supervisor to log the signals")
    assert _children(proxy.pid) == workers
    async with httpx.AsyncClient(timeout=10, trust_env=False) as admin:
        ready = await admin.get(f"{proxy.admin_url}/readyz")
    assert ready.json() == {"status": "ready", "workers": {"0": "ready", "1": "ready"}}
    assert "SIGHUP ignored" in proxy.logs()


async def _logged(proxy: Any, text: str) -> bool | None:
    return True if text in proxy.logs() else None


async def test_liveness_fails_for_a_worker_that_stopped_answering(
    tmp_path: Any, monkeypatch: Any
) -> None:
    """uvicorn's supervisor restarts a worker that dies, but its health check is answered
    from another thread than the worker's event loop, so a stuck loop goes unseen. The
    admin port's /livez fails once a worker has not answered it for STUCK_SECONDS (here
    shortened; no worker socket exists, as for workers that never answer)."""
    monkeypatch.setattr(workers_module, "STUCK_SECONDS", 0.3)
    app = workers_module.create_workers_admin_app(str(tmp_path), 2, lambda: False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
        assert (await admin.get("/livez")).status_code == 200
        await asyncio.sleep(0.4)
        stuck = await admin.get("/livez")
    assert stuck.status_code == 503
    assert stuck.json() == {"status": "stuck", "workers": ["0", "1"]}
