"""Shared fixtures: real Redis, Redis Cluster, sample backend and proxy processes.

Session-scoped servers are started lazily (only when a test asks) and every process
is stopped at teardown, even when the test fails; ``harness`` adds an atexit sweep.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from harness import (
    BackendFactory,
    BackendServer,
    ManagedProcess,
    ProxyFactory,
    ProxyServer,
    RedisCluster,
    RedisFactory,
    RedisServer,
    redis_binaries_missing,
)

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


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


def _dump_logs(request: pytest.FixtureRequest, procs: Sequence[ManagedProcess]) -> None:
    """Print process logs in teardown of a failed test (pytest shows captured teardown output)."""
    if not _test_failed(request):
        return
    for proc in procs:
        text = proc.logs()
        if len(text) > 20000:
            text = "...\n" + text[-20000:]
        print(f"\n===== {proc.name} log ({proc.log_path}) =====\n{text}")


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
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session Redis after FLUSHALL (revived if an earlier test broke it)."""
    if redis_server.paused:
        redis_server.resume()
    if not redis_server.running:
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[RedisFactory]:
    """Extra Redis servers with their own options (AOF, maxmemory...), stopped at teardown."""
    _require_redis("redis-server")
    created: list[RedisServer] = []

    def factory(
        *,
        appendonly: bool = False,
        args: Sequence[str] = (),
        port: int | None = None,
        start: bool = True,
    ) -> RedisServer:
        server = RedisServer(
            tmp_path_factory.mktemp("redis-extra"), port=port, appendonly=appendonly, args=args
        )
        created.append(server)
        if start:
            server.start()
        return server

    try:
        yield factory
    finally:
        _dump_logs(request, created)
        for server in created:
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster, started only if some test of the session asks for it."""
    _require_redis("redis-server", "redis-cli")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# --------------------------------------------------------------------------- backend


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """The sample payment backend shared by the session."""
    server = BackendServer(tmp_path_factory.mktemp("backend"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ledger_backend(backend: BackendServer) -> BackendServer:
    """The session backend with an empty ledger (revived if an earlier test broke it)."""
    if backend.paused:
        backend.resume()
    if not backend.running:
        backend.start()
    backend.reset()
    return backend


@pytest.fixture
def backend_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[BackendFactory]:
    """Private backends with options (e.g. ``args=["--delay", "0.5"]``), stopped at teardown."""
    created: list[BackendServer] = []

    def factory(
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        db: Path | None = None,
        start: bool = True,
    ) -> BackendServer:
        server = BackendServer(
            tmp_path_factory.mktemp("backend-extra"), port=port, db=db, args=args, env=env
        )
        created.append(server)
        if start:
            server.start()
        return server

    try:
        yield factory
    finally:
        _dump_logs(request, created)
        for server in created:
            server.stop()


# --------------------------------------------------------------------------- proxy


@pytest.fixture
def proxy_factory(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ProxyFactory]:
    """Proxy processes (replicas share a redis_url), stopped at teardown; logs shown on failure."""
    created: list[ProxyServer] = []

    def factory(
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
            tmp_path_factory.mktemp("proxy"),
            upstream=upstream,
            redis_url=redis_url,
            config=config,
            args=args,
            env=env,
            port=port,
            admin_port=admin_port,
            log_level=log_level,
        )
        created.append(proxy)
        if start:
            proxy.start()
        return proxy

    try:
        yield factory
    finally:
        _dump_logs(request, created)
        for proxy in created:
            proxy.stop()
