"""Shared fixtures: real Redis, Redis Cluster, sample backend and proxy processes.

Session-scoped servers are started lazily (only when a test asks) and every process
is stopped at teardown, even when the test fails; ``harness`` adds an atexit sweep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from harness import (
    BackendFactory,
    BackendServer,
    ProxyFactory,
    RedisCluster,
    RedisFactory,
    RedisServer,
    ServerFactory,
    print_logs,
    redis_binaries_missing,
)
from rawhttp import raw_upstream_server

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()

F = TypeVar("F", bound=ServerFactory[Any])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report so teardown can dump logs of a failed test."""
    report: pytest.TestReport = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


def _owned(request: pytest.FixtureRequest, factory: F) -> Iterator[F]:
    """Yield `factory`; at teardown print its servers' logs if the test failed (pytest
    shows captured teardown output), then stop every server it made."""
    try:
        yield factory
    finally:
        if _test_failed(request):
            print_logs(factory.created)
        for server in factory.created:
            server.stop()


def _require_redis(*binaries: str) -> None:
    """Fail loudly (never skip) when Redis binaries are missing: these tests must run."""
    missing = redis_binaries_missing(*binaries)
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found on PATH: install Redis >= 7 "
            "(e.g. `apt-get install redis-server`) to run the Redis-backed tests",
            pytrace=False,
        )


# --------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One standalone Redis for the session; tests get a clean DB via ``redis_url``."""
    _require_redis("redis-server")
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis after FLUSHALL (revived if an earlier test broke it)."""
    redis_server.revive().flushall()
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str | None:
    """The proxy's store, once the embedded memory store (None) and once a real Redis."""
    if request.param == "memory":
        return None
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.revive().url


@pytest.fixture
def redis_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RedisFactory]:
    """Extra Redis servers with their own options (AOF, maxmemory...), stopped at teardown."""
    _require_redis("redis-server")
    yield from _owned(request, RedisFactory(tmp_path_factory.mktemp))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster, started only if some test of the session asks for it."""
    _require_redis("redis-server", "redis-cli")
    with RedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


# --------------------------------------------------------------------------- backend


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """The sample payment backend shared by the session."""
    with BackendServer(tmp_path_factory.mktemp("backend")) as server:
        yield server


@pytest.fixture
def ledger_backend(backend: BackendServer) -> BackendServer:
    """The session backend with an empty ledger (revived if an earlier test broke it)."""
    backend.revive().reset()
    return backend


@pytest.fixture
def backend_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[BackendFactory]:
    """Private backends with options (e.g. ``args=["--delay", "0.5"]``), stopped at teardown."""
    yield from _owned(request, BackendFactory(tmp_path_factory.mktemp))


# --------------------------------------------------------------------------- proxy


@pytest.fixture
def proxy_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ProxyFactory]:
    """Proxy processes (replicas share a redis_url), stopped at teardown; logs shown on failure."""
    yield from _owned(request, ProxyFactory(tmp_path_factory.mktemp))


# --------------------------------------------------------------------------- clients


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the servers on 127.0.0.1.

    ``trust_env=False`` keeps a developer's HTTP(S)_PROXY away from 127.0.0.1;
    ``verify=False`` skips loading a CA bundle per client (plain HTTP only).
    """
    async with httpx.AsyncClient(timeout=30.0, trust_env=False, verify=False) as http:
        yield http


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[str]:
    """A raw HTTP upstream whose bytes the test controls (tests/rawhttp.py)."""
    with raw_upstream_server() as url:
        yield url
