"""The Redis a payments team runs: TLS and authentication on every topology.

Real redis-server processes that speak only TLS (a throwaway CA made in the fixture), an
ACL user that has exactly the commands the proxy needs (docs/operations.md), Cluster over
TLS, Sentinel over TLS with its own password. Each story is a payment paid twice: one
execution in the backend's ledger, one replay.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import (
    PROXY_ACL_RULES,
    REPO_ROOT,
    BackendServer,
    ProxyFactory,
    RedisCluster,
    RedisFactory,
    RedisServer,
    SentinelServer,
    TlsFiles,
    acl_user_args,
    free_port,
    pay,
    pay_config,
    redis_binaries_missing,
)

PASSWORD = "s3cret-proxy-pass"
SENTINEL_PASSWORD = "s3cret-sentinel-pass"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "redis-password"
    path.write_text(PASSWORD + "\n")  # as `kubectl create secret --from-file` often has it
    return path


@pytest.fixture
def tls_redis(redis_factory: RedisFactory, tls: TlsFiles) -> RedisServer:
    """A TLS-only Redis with the proxy's minimal ACL user, AOF and noeviction."""
    return redis_factory(
        appendonly=True,
        tls=tls,
        args=["--maxmemory-policy", "noeviction", *acl_user_args("proxy", PASSWORD)],
    )


def _store(url: str, tls: TlsFiles, password_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "url": url,
        "username": "proxy",
        "password_file": str(password_file),
        "tls": tls.store_settings(),
        **extra,
    }


def _cli(*args: str, config: dict[str, Any] | None = None, tmp: Path | None = None) -> Any:
    argv = [sys.executable, "-m", "proxy", *args]
    if config is not None:
        assert tmp is not None
        path = tmp / "check.yaml"
        path.write_text(yaml.safe_dump(config))
        argv += ["--config", str(path)]
    return subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )


async def _paid_once(
    http: httpx.AsyncClient, proxy: Any, backend: BackendServer, order: str
) -> None:
    first = await pay(http, proxy, order)
    second = await pay(http, proxy, order)
    assert first.status == 201 and first.executed_here, first
    assert second.status == 201 and second.replayed and second.body == first.body, second
    assert backend.ledger()["orders"].get(order) == 1


# --------------------------------------------------------------------------- single node


async def test_tls_node_with_acl_user_and_password_file(
    tls_redis: RedisServer,
    tls: TlsFiles,
    password_file: Path,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    """rediss://, CA + client certificate, ACL user, password from a mounted file."""
    assert tls_redis.url.startswith("rediss://")
    proxy = proxy_factory(
        ledger_backend.url,
        config=pay_config(store=_store(tls_redis.url, tls, password_file)),
    )
    await _paid_once(client, proxy, ledger_backend, "tls-1")
    ready = await client.get(proxy.admin_url + "/readyz")
    assert ready.status_code == 200, ready.text
    proxy.stop()
    assert PASSWORD not in proxy.logs()


def test_check_store_reports_tls_auth_and_a_sufficient_acl(
    tls_redis: RedisServer, tls: TlsFiles, password_file: Path, tmp_path: Path
) -> None:
    result = _cli(
        "check-store", config={"store": _store(tls_redis.url, tls, password_file)}, tmp=tmp_path
    )
    out = result.stdout
    assert "TLS on: certificate verified against" in out, (out, result.stderr)
    assert "client certificate sent" in out
    assert "authenticated as ACL user 'proxy'" in out
    assert "ACL: every command the proxy uses is allowed" in out
    # The minimal ACL has no CONFIG GET: said, not fatal.
    assert "cannot read config" in out
    assert PASSWORD not in out + result.stderr
    assert result.returncode == 0, (out, result.stderr)
    # tls.enabled on a redis:// URL is the same as rediss://, and the CA alone will do.
    plain_scheme = {
        **_store(tls_redis.url.replace("rediss://", "redis://"), tls, password_file),
        "tls": {"enabled": True, **tls.store_settings(client_cert=False)},
    }
    again = _cli("check-store", config={"store": plain_scheme}, tmp=tmp_path)
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert "TLS on" in again.stdout and "client certificate" not in again.stdout
    # The password file beats a (stale) password in the URL.
    stale = _store(tls_redis.url.replace("://", "://proxy:stale@"), tls, password_file)
    third = _cli("check-store", config={"store": stale}, tmp=tmp_path)
    assert third.returncode == 0, (third.stdout, third.stderr)


def test_check_store_names_the_command_a_short_acl_lacks(
    redis_factory: RedisFactory, tls: TlsFiles, password_file: Path, tmp_path: Path
) -> None:
    short = PROXY_ACL_RULES.replace(" +hincrby", "")
    server = redis_factory(tls=tls, args=acl_user_args("proxy", PASSWORD, short))
    result = _cli(
        "check-store", config={"store": _store(server.url, tls, password_file)}, tmp=tmp_path
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "WARNING  ACL: take-over claim refused: the ACL denies hincrby" in result.stdout
    assert "Traceback" not in result.stderr


def test_tls_mistakes_are_one_line(
    tls_redis: RedisServer, tls: TlsFiles, password_file: Path, tmp_path: Path
) -> None:
    """No CA (the server's certificate is not trusted), a wrong password, plain text to a
    TLS port: each one line and exit 2."""
    cases = {
        "no-ca": {"url": tls_redis.url, "username": "proxy", "password_file": str(password_file)},
        "wrong-password": {
            **_store(tls_redis.url, tls, password_file),
            "password_file": None,
            "password": "wrong",
        },
        "plain-to-tls": {
            "url": tls_redis.url.replace("rediss", "redis"),
            "username": "proxy",
            "password_file": str(password_file),
            "timeout": "300ms",
        },
    }
    for name, store in cases.items():
        result = _cli("check-store", config={"store": store}, tmp=tmp_path)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "store unavailable" in lines[0], (name, result.stderr)
        assert PASSWORD not in result.stderr and "wrong" not in result.stderr.split(":", 2)[0]


# --------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[RedisCluster]:
    missing = redis_binaries_missing("redis-server", "redis-cli")
    if missing:
        pytest.fail(f"{missing} not on PATH", pytrace=False)
    with RedisCluster(
        tmp_path_factory.mktemp("tls-cluster"),
        tls=tls,
        args=[*acl_user_args("proxy", PASSWORD), "--maxmemory-policy", "noeviction"],
    ) as cluster:
        yield cluster


async def test_tls_cluster_with_acl_user(
    tls_cluster: RedisCluster,
    tls: TlsFiles,
    password_file: Path,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    """rediss+cluster:// keeps TLS to every node the client discovers."""
    assert tls_cluster.url.startswith("rediss+cluster://")
    store = _store(tls_cluster.url, tls, password_file)
    proxy = proxy_factory(ledger_backend.url, config=pay_config(store=store))
    for order in ("tls-c-1", "tls-c-2", "tls-c-3"):
        await _paid_once(client, proxy, ledger_backend, order)
    # The password file beats a (stale) password in the URL on Cluster too.
    stale = {**store, "url": store["url"].replace("://", "://proxy:stale@")}
    result = _cli("check-store", config={"store": stale}, tmp=tmp_path)
    assert "ACL: every command the proxy uses is allowed" in result.stdout, result
    # The fixture's nodes run without AOF: the only warning.
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "AOF persistence is off" in warnings[0], result.stdout


def test_cluster_down_at_start_is_one_line(tmp_path: Path) -> None:
    dead = f"redis+cluster://127.0.0.1:{free_port()}"
    for args in (
        ("check-store", "--redis-url", dead),
        ("records", "show", "--key", "k1", "--redis-url", dead),
    ):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --------------------------------------------------------------------------- sentinel


async def test_tls_sentinel_with_sentinel_password_and_acl_user(
    tls_redis: RedisServer,
    tls: TlsFiles,
    password_file: Path,
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    """rediss+sentinel://: TLS to the sentinel (which has its own password) and to the
    master it names, where the proxy logs in as the ACL user."""
    with SentinelServer(
        tmp_path / "sentinel", tls_redis.port, tls=tls, password=SENTINEL_PASSWORD
    ) as sentinel:
        secret = tmp_path / "sentinel-password"
        secret.write_text(SENTINEL_PASSWORD)
        store = _store(
            f"rediss+sentinel://{sentinel.url_part()}/{sentinel.master_name}",
            tls,
            password_file,
            sentinel={"password_file": str(secret)},
        )
        proxy = proxy_factory(ledger_backend.url, config=pay_config(store=store))
        await _paid_once(client, proxy, ledger_backend, "tls-s-1")
        result = _cli("check-store", config={"store": store}, tmp=tmp_path)
        assert "sentinels: authenticated (password)" in result.stdout, result
        assert "ACL: every command the proxy uses is allowed" in result.stdout, result
        assert SENTINEL_PASSWORD not in result.stdout + result.stderr
        # Without the sentinel's password the master cannot be found: one line, exit 2.
        no_auth = {**store, "sentinel": {}}
        failed = _cli("check-store", config={"store": no_auth}, tmp=tmp_path)
        assert failed.returncode == 2, (failed.stdout, failed.stderr)
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr


async def test_proxy_starts_and_fails_closed_when_the_cluster_is_down(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    """No node reachable at start-up: the proxy serves 503 store-unavailable (nothing is
    forwarded) and logs one line, rather than crash-looping on a traceback."""
    dead = f"redis+cluster://127.0.0.1:{free_port()}"
    proxy = proxy_factory(ledger_backend.url, dead, pay_config())
    outcome = await pay(client, proxy, "cluster-down-1")
    assert (outcome.status, outcome.problem) == (503, "store-unavailable"), outcome
    assert ledger_backend.ledger()["orders"].get("cluster-down-1") is None
    proxy.stop()
    assert "Traceback" not in proxy.logs()
    assert "store unavailable at start-up" in proxy.logs()
