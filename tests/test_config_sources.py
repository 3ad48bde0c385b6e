"""Where settings come from: nested environment variables, secrets in files, and the
operator commands that read them (`check-config`, `--version`) without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import REPO_ROOT, BackendServer, ProxyFactory, free_port, pay_config

from proxy import __version__
from proxy.config import ConfigError, load_settings, masked

P = "IDEMPOTENCY_PROXY_"


def _load(tmp_path: Path, tree: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    path = None
    if tree is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
    kwargs.setdefault("environ", {})
    return load_settings(str(path) if path else None, **kwargs)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(P)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **(env or {})},
    )


# --------------------------------------------------------------------------- environment


def test_every_setting_has_a_nested_variable(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        {"store": {"url": "redis://file:6379/0", "timeout": "1s"}},
        environ={
            P + "STORE__TIMEOUT": "250ms",
            P + "STORE__TLS__CHECK_HOSTNAME": "false",
            P + "STORE__TLS__ENABLED": "true",
            P + "DEFAULTS__LEASE": "20s",
            P + "DEFAULTS__RELEASE_STATUSES": "[408, 429]",
            P + "UPSTREAM_POOL__CLIENT": "httpx",
            P + "MAX_HEADER_BYTES": "16KiB",
            P + "ADMIN__ENABLED": "false",
            P + "ROUTES": '[{"name": "pay", "path": "/pay", "key": {"from": "header"}}]',
        },
    )
    assert settings.store.url == "redis://file:6379/0"  # the file, where nothing overrides
    assert settings.store.timeout == 0.25
    assert settings.store.tls.enabled and not settings.store.tls.check_hostname
    assert settings.defaults.lease == 20.0
    assert settings.defaults.release_statuses == (408, 429)
    assert settings.upstream_pool.client == "httpx"
    assert settings.max_header_bytes == 16 * 1024
    assert settings.admin.enabled is False
    assert [r.name for r in settings.routes] == ["pay"]


def test_precedence_flag_then_flag_variable_then_nested_then_file(tmp_path: Path) -> None:
    tree = {"store": {"url": "redis://file:1/0"}}
    nested = {P + "STORE__URL": "redis://nested:1/0"}
    flat = {**nested, P + "REDIS_URL": "redis://flat:1/0"}
    assert _load(tmp_path, tree, environ=nested).store.url == "redis://nested:1/0"
    assert _load(tmp_path, tree, environ=flat).store.url == "redis://flat:1/0"
    flagged = _load(tmp_path, tree, environ=flat, flags={"redis_url": "redis://flag:1/0"})
    assert flagged.store.url == "redis://flag:1/0"


def test_a_mistyped_variable_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^store\.urll: unknown key$"):
        _load(tmp_path, environ={P + "STORE__URLL": "redis://x:1/0"})
    # Variables that are not settings are left alone.
    _load(tmp_path, environ={P + "_SETTINGS_JSON": "{}", P + "SOMETHING_ELSE": "1"})


def test_a_password_that_yaml_would_turn_into_a_boolean_stays_text(tmp_path: Path) -> None:
    settings = _load(tmp_path, environ={P + "STORE__PASSWORD": "no"})
    assert settings.store.password == "no"


# --------------------------------------------------------------------------- secrets


def test_secrets_from_files_anywhere_in_the_tree(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("redis-pass\n")
    (tmp_path / "spw").write_text("sentinel-pass")
    settings = _load(
        tmp_path,
        {
            "store": {
                "url": "redis+sentinel://h:26379/m",
                "sentinel": {"password_file": str(tmp_path / "spw")},
            }
        },
        environ={P + "STORE__PASSWORD_FILE": str(tmp_path / "pw")},
    )
    assert settings.store.password == "redis-pass"  # the file's newline is not the secret
    assert settings.store.sentinel.password == "sentinel-pass"
    assert settings.store.sentinel_options()["password"] == "sentinel-pass"
    assert "redis-pass" not in repr(settings) and "sentinel-pass" not in repr(settings)
    shown = yaml.safe_dump(masked(settings))
    assert "redis-pass" not in shown and "sentinel-pass" not in shown and "***" in shown


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"password": "a", "password_file": "PW"}, "store.password_file: give either"),
        ({"password_file": "/nonexistent/pw"}, "store.password_file: cannot read"),
        ({"password_file": "EMPTY"}, "store.password_file: .* is empty"),
        ({"tls": {"cert_file": "PW"}}, "cert_file and key_file go together"),
        ({"tls": {"ca_file": "/nonexistent/ca"}}, "ca_file: /nonexistent/ca is not a readable"),
        ({"tls": {"verify": False}}, "check_hostname needs verify: true"),
        ({"url": "redis+clusterr://h:1"}, "store.url: .* must start with one of"),
        ({"url": "rediss+sentinel://h:26379"}, "store.url: rediss\\+sentinel:// needs the master"),
    ],
)
def test_store_secret_and_tls_mistakes_are_one_line(
    tmp_path: Path, store: dict[str, Any], message: str
) -> None:
    (tmp_path / "PW").write_text("x")
    (tmp_path / "EMPTY").write_text("\n")
    fixed = {
        k: (
            {kk: str(tmp_path / vv) if vv in ("PW",) else vv for kk, vv in v.items()}
            if isinstance(v, dict)
            else str(tmp_path / v)
            if v in ("PW", "EMPTY")
            else v
        )
        for k, v in store.items()
    }
    with pytest.raises(ConfigError, match=message) as caught:
        _load(tmp_path, {"store": fixed})
    assert "\n" not in str(caught.value)


def test_url_passwords_are_masked(tmp_path: Path) -> None:
    settings = _load(tmp_path, {"store": {"url": "rediss://user:hunter2@h:6380/0"}})
    assert masked(settings)["store"]["url"] == "rediss://user:***@h:6380/0"


# --------------------------------------------------------------------------- commands


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    config = tmp_path / "proxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstream": "http://127.0.0.1:9000",
                "store": {
                    "url": "redis://:urlpass@h:6379/0",
                    "password_file": str(tmp_path / "pw"),
                },
            }
        )
    )
    result = _cli("check-config", "--config", str(config), env={P + "STORE__TIMEOUT": "2s"})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["store"]["password"] == "***"
    assert shown["store"]["timeout"] == 2.0
    assert shown["store"]["url"] == "redis://:***@h:6379/0"
    assert "hunter2" not in result.stdout + result.stderr
    assert "urlpass" not in result.stdout + result.stderr

    config.write_text("defaults:\n  lease: 10x\n")
    bad = _cli("check-config", "--config", str(config))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "idempotency-proxy: config error: defaults.lease: "
        "'10x' is not a duration (use 250ms, 10s, 5m, 24h or seconds)"
    ]
    assert bad.stdout == ""


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"idempotency-proxy {__version__}"


def test_records_with_an_unusable_key_is_one_line() -> None:
    result = _cli(
        "records", "show", "--key", "a\tb", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"
    )
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [
        "idempotency-proxy: config error: --key: the key must be printable ASCII"
    ]


async def test_build_info_metric(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(ledger_backend.url, config=pay_config())
    metrics = (await client.get(proxy.admin_url + "/metrics")).text
    lines = [
        line for line in metrics.splitlines() if line.startswith("idempotency_proxy_build_info")
    ]
    assert len(lines) == 1 and f'version="{__version__}"' in lines[0], lines
    assert lines[0].endswith(" 1.0")
