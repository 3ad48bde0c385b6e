"""Test harness: the pytest factories and what several suites send and read back.

The processes themselves (Redis single, Cluster and Sentinel, the sample backend, the
proxy; free ports, readiness, stop by process group) come from `devstack`, re-exported
here so the suites import one module. The last section holds what several suites send
and read back: the `pay` route, its bodies, record keys and fingerprints, and what a
client saw for each payment.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import orjson

from devstack.processes import (
    CODE_ROOT,
    HOST,
    ManagedProcess,
    child_env,
    free_port,
    free_port_pair,
    iter_live,
    stop_all,
    wait_for_http,
    wait_for_port,
)
from devstack.processes import StackError as HarnessError
from devstack.servers import (
    PROXY_ACL_RULES,
    BackendServer,
    ProxyServer,
    RedisCluster,
    RedisServer,
    SentinelServer,
    TlsFiles,
    acl_user_args,
    redis_binaries_missing,
)
from proxy import keys
from proxy.fingerprint import fingerprint
from proxy.request import ProxyRequest

REPO_ROOT = CODE_ROOT

__all__ = [
    "HOST",
    "JSON_HEADERS",
    "PAY_PATH",
    "PROXY_ACL_RULES",
    "REPO_ROOT",
    "BackendFactory",
    "BackendServer",
    "HarnessError",
    "ManagedProcess",
    "Outcome",
    "ProxyFactory",
    "ProxyServer",
    "RedisCluster",
    "RedisFactory",
    "RedisServer",
    "SentinelServer",
    "ServerFactory",
    "TlsFiles",
    "acl_user_args",
    "body_of",
    "charges_route",
    "child_env",
    "eventually",
    "fingerprint_of",
    "free_port",
    "free_port_pair",
    "iter_live",
    "pay",
    "pay_config",
    "pay_route",
    "pay_until",
    "print_logs",
    "problem_name",
    "proxy_request",
    "records_cli",
    "redis_binaries_missing",
    "run_to_exit",
    "stop_all",
    "storage_key",
    "tally",
    "wait_for_http",
    "wait_for_port",
]

T = TypeVar("T")


def print_logs(procs: Iterable[ManagedProcess], limit: int = 20000) -> None:
    """Print the end of each process's log: pytest shows what a failed test printed."""
    for proc in procs:
        print(f"\n===== {proc.name} log =====\n{proc.log_tail(limit)}")


# --------------------------------------------------------------------------- factories

S = TypeVar("S", bound=ManagedProcess)


class ServerFactory(Generic[S]):
    """Makes servers of one kind, each in a fresh temporary dir, and remembers them so the
    fixture can stop them (and show their logs) at teardown."""

    def __init__(self, mktemp: Callable[[str], Path]) -> None:
        self._mktemp = mktemp
        self.created: list[S] = []

    def _add(self, server: S, start: bool) -> S:
        self.created.append(server)
        if start:
            server.start()
        return server


class RedisFactory(ServerFactory[RedisServer]):
    """The ``redis_factory`` fixture: extra Redis servers with their own options."""

    def __call__(
        self,
        *,
        appendonly: bool = False,
        args: Sequence[str] = (),
        port: int | None = None,
        start: bool = True,
        tls: TlsFiles | None = None,
    ) -> RedisServer:
        server = RedisServer(
            self._mktemp("redis-extra"), port=port, appendonly=appendonly, args=args, tls=tls
        )
        return self._add(server, start)


class BackendFactory(ServerFactory[BackendServer]):
    """The ``backend_factory`` fixture: private backends with options."""

    def __call__(
        self,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        db: Path | None = None,
        start: bool = True,
    ) -> BackendServer:
        server = BackendServer(self._mktemp("backend-extra"), port=port, db=db, args=args, env=env)
        return self._add(server, start)


class ProxyFactory(ServerFactory[ProxyServer]):
    """The ``proxy_factory`` fixture: proxy processes (replicas share a redis_url)."""

    def __call__(
        self,
        upstream: str,
        redis_url: str | None = None,
        config: Mapping[str, Any] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        admin_port: int | None = None,
        log_level: str = "info",
        start: bool = True,
    ) -> ProxyServer:
        proxy = ProxyServer(
            self._mktemp("proxy"),
            upstream=upstream,
            redis_url=redis_url,
            config=config,
            args=args,
            env=env,
            port=port,
            admin_port=admin_port,
            log_level=log_level,
        )
        return self._add(proxy, start)


# --------------------------------------------------------------------------- payments
# The `pay` route and its traffic, as several suites send it.

PAY_PATH = "/v1/orders/pay"
JSON_HEADERS = {"content-type": "application/json"}


def pay_route(**overrides: Any) -> dict[str, Any]:
    """`POST /v1/orders/pay` keyed by the order id, so that a double click is one payment."""
    return {
        "name": "pay",
        "methods": ["POST"],
        "path": PAY_PATH,
        "key": {"from": "json", "field": "order_id"},
        **overrides,
    }


def charges_route(**overrides: Any) -> dict[str, Any]:
    """`POST /v1/charges` keyed by the Idempotency-Key header."""
    return {
        "name": "charges",
        "methods": ["POST"],
        "path": "/v1/charges",
        "key": {"from": "header", "name": "Idempotency-Key"},
        **overrides,
    }


def pay_config(**sections: Any) -> dict[str, Any]:
    """A proxy config with the `pay` route alone (key required) and admin on 127.0.0.1."""
    return {"admin": {"host": HOST}, **sections, "routes": [pay_route(required=True)]}


def body_of(order: str, amount: int = 1250) -> bytes:
    return orjson.dumps({"order_id": order, "amount": amount, "currency": "EUR"})


def storage_key(order: str) -> str:
    """The Redis key of `order`'s record on the `pay` route (default tenant)."""
    return keys.scope(keys.DEFAULT_TENANT, "pay", order).storage_key


def proxy_request(
    *,
    body: bytes = b"",
    content_type: str | None = None,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "POST",
    path: str = PAY_PATH,
) -> ProxyRequest:
    """A request as the proxy parsed it (the content type goes after ``headers``)."""
    raw_headers = list(headers or [])
    if content_type is not None:
        raw_headers.append((b"content-type", content_type.encode("latin-1")))
    return ProxyRequest(
        method=method,
        path=path,
        raw_path=path.encode(),
        query_string=query,
        headers=raw_headers,
        body=body,
    )


def fingerprint_of(body: bytes) -> str:
    """The fingerprint the proxy computes for a JSON `body` paid on the `pay` route, to
    plant or forge a record as another owner would have written it."""
    return fingerprint(proxy_request(body=body, content_type="application/json"))


def problem_name(response: httpx.Response) -> str | None:
    """`store-unavailable`, `key-reused`...: the proxy's problem type, or None if not one."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    return str(response.json()["type"]).rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one client saw."""

    order: str
    status: int | None  # None: the connection broke without a response
    problem: str | None
    replayed: bool
    body: bytes = b""

    @property
    def label(self) -> str:
        if self.status is None:
            return "connection-error"
        label = str(self.status)
        if self.problem:
            label += f" {self.problem}"
        if self.replayed:
            label += " (replayed)"
        return label

    @property
    def executed_here(self) -> bool:
        """A fresh backend answer (not a replay, not a proxy problem)."""
        return self.status is not None and self.problem is None and not self.replayed


async def pay(
    http: httpx.AsyncClient,
    proxy: ProxyServer,
    order: str,
    faults: dict[str, str] | None = None,
) -> Outcome:
    """Pay `order` through `proxy` (`faults`: the backend's X-Sample-* headers)."""
    try:
        response = await http.post(
            proxy.url + PAY_PATH, content=body_of(order), headers={**JSON_HEADERS, **(faults or {})}
        )
    except httpx.TransportError:
        return Outcome(order, None, None, False)
    replayed = response.headers.get("idempotent-replayed") == "true"
    return Outcome(order, response.status_code, problem_name(response), replayed, response.content)


async def pay_until(
    http: httpx.AsyncClient,
    proxy: ProxyServer,
    order: str,
    *,
    retry_on: Sequence[str] = ("request-in-progress",),
    timeout: float = 20.0,
    interval: float = 0.2,
) -> list[Outcome]:
    """Send, and send again while the answer is one of `retry_on` (bounded): every try."""
    seen: list[Outcome] = []
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        outcome = await pay(http, proxy, order)
        seen.append(outcome)
        if outcome.problem not in retry_on or time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    return seen


def tally(title: str, outcomes: Iterable[Outcome]) -> Counter[str]:
    """Print how many clients saw each answer (run with ``-s``) and return the counts."""
    counts = Counter(outcome.label for outcome in outcomes)
    print(f"\n[{title}] " + ", ".join(f"{label}: {n}" for label, n in sorted(counts.items())))
    return counts


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = 20.0,
    interval: float = 0.1,
) -> T:
    """Poll until `probe` returns something other than None (bounded in tries and time)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_to_exit(proxy: ProxyServer, timeout: float = 60.0) -> tuple[int, str]:
    """Run a proxy that is expected to stop on its own (a refused start): its exit code and
    everything it printed."""
    result = subprocess.run(
        proxy.command(),
        cwd=REPO_ROOT,
        env=proxy.environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


async def records_cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """`idempotency-proxy records ...`, as an operator would run it: (exit code, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "records",
        *args,
        cwd=REPO_ROOT,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
