"""The operator's interface: config file, environment and flags (docs/configuration.md).

A mistake must stop start-up with one line naming the key and the reason: a
crash-looping pod whose log is a traceback is how a typo'd `lease` stays in
production. The CLI cases run the real `python -m proxy` in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import (
    ConfigError,
    Settings,
    load_settings,
    parse_duration,
    parse_size,
)
from proxy.routes import RouteTable

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "IDEMPOTENCY_PROXY_"

PAY_ROUTE: dict[str, Any] = {
    "name": "pay",
    "methods": ["POST"],
    "path": "/v1/orders/pay",
    "key": {"from": "json", "field": "order_id"},
}


def _write(tmp_path: Path, tree: Any, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return str(path)


def _load(tmp_path: Path, tree: Any, **kwargs: Any) -> Settings:
    kwargs.setdefault("environ", {})
    return load_settings(_write(tmp_path, tree), **kwargs)


def _error(tmp_path: Path, tree: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, tree)
    message = str(exc.value)
    assert "\n" not in message, message
    assert "Traceback" not in message
    return message


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


def _cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=REPO_ROOT,
        env=_clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _cli_config_error(*args: str, env: Mapping[str, str] | None = None) -> str:
    """Run `proxy run` that must refuse to start; return its single stderr line."""
    done = _cli("run", "--upstream", "http://127.0.0.1:1", *args, env=env)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    return lines[0]


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("30", 30.0),
        (30, 30.0),
        (0.5, 0.5),
        (" 10s ", 10.0),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "10x", "s", "-5s", "", True, "10 minutes"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 64 * 1024),
        ("1MiB", 1024 * 1024),
        ("1GiB", 1024**3),
        ("10KB", 10_000),
        ("512B", 512),
        ("4096", 4096),
        (4096, 4096),
    ],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5MiB", "lots", "1XB", "-1", True, ""])
def test_bad_sizes(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_units_in_the_file_reach_the_settings(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        {
            "defaults": {
                "retention": "24h",
                "lease": "250ms",
                "upstream_timeout": "5m",
                "wait_timeout": 3,
                "max_request_body": "64KiB",
                "max_stored_response": "1MiB",
            },
            "routes": [{**PAY_ROUTE, "lease": "10s", "max_request_body": 2048}],
        },
    )
    defaults = settings.defaults
    assert defaults.retention == 86400.0
    assert defaults.lease == pytest.approx(0.25)
    assert defaults.upstream_timeout == 300.0
    assert defaults.wait_timeout == 3.0
    assert defaults.max_request_body == 65536
    assert defaults.max_stored_response == 1048576
    route = settings.routes[0]
    assert route.lease == 10.0
    assert route.max_request_body == 2048


def test_defaults_without_a_file() -> None:
    settings = load_settings(None, {}, environ={})
    assert settings.store.url == "memory://"
    assert settings.listen.port == 8080
    assert settings.admin.port == 9090
    assert settings.defaults.retention == 86400.0
    assert settings.defaults.lease == 10.0
    assert settings.defaults.release_statuses == (408, 425, 429)
    assert settings.defaults.in_flight == "reject"
    assert settings.routes == ()


def test_the_documented_example_loads(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        {
            "upstream": "http://127.0.0.1:9000",
            "listen": {"host": "0.0.0.0", "port": 8080},
            "admin": {"host": "0.0.0.0", "port": 9090},
            "store": {"url": "redis://127.0.0.1:6379/0", "failure_mode": "closed"},
            "tenant": {"header": "X-Tenant-Id"},
            "defaults": {"in_flight": "wait", "wait_timeout": "5s"},
            "routes": [
                {**PAY_ROUTE, "required": True, "release_statuses": [402, 408, 425, 429]},
                {
                    "name": "charges",
                    "methods": ["POST"],
                    "path": "/v1/charges",
                    "key": {"from": "header", "name": "Idempotency-Key"},
                },
            ],
        },
    )
    assert settings.upstream == "http://127.0.0.1:9000"
    assert settings.tenant.header == "X-Tenant-Id"
    assert [r.name for r in settings.routes] == ["pay", "charges"]
    assert settings.routes[0].release_statuses == (402, 408, 425, 429)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("tree", "where"),
    [
        pytest.param({"bogus": 1}, "bogus", id="top-level"),
        pytest.param({"defaults": {"leese": "5s"}}, "defaults.leese", id="defaults"),
        pytest.param({"store": {"uri": "redis://x"}}, "store.uri", id="store"),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "retention2": "5s"}]},
            "routes['pay'].retention2",
            id="route",
        ),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "key": {"frm": "json", "field": "order_id"}}]},
            "routes['pay'].key.frm",
            id="route-key-typo",
        ),
        pytest.param(
            {"routes": [{"name": "pay", "path": "/x"}, {"name": "b", "path": "/y", "x": 1}]},
            "routes['b'].x",
            id="second-route",
        ),
    ],
)
def test_unknown_key_names_the_dotted_key(tmp_path: Path, tree: Any, where: str) -> None:
    assert _error(tmp_path, tree) == f"{where}: unknown key"


@pytest.mark.parametrize(
    ("tree", "where", "reason"),
    [
        pytest.param({"defaults": {"lease": "abc"}}, "defaults.lease", "duration", id="lease"),
        pytest.param({"defaults": {"lease": 0}}, "defaults.lease", "greater than zero", id="zero"),
        pytest.param({"listen": {"port": "x"}}, "listen.port", "integer", id="port"),
        pytest.param({"listen": {"port": 70000}}, "listen.port", "65535", id="port-range"),
        pytest.param(
            {"defaults": {"in_flight": "maybe"}}, "defaults.in_flight", "'reject'", id="in_flight"
        ),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "in_flight": "maybe"}]},
            "routes['pay'].in_flight",
            "'wait'",
            id="route-in_flight",
        ),
        pytest.param(
            {"defaults": {"max_request_body": "huge"}},
            "defaults.max_request_body",
            "size",
            id="size",
        ),
        pytest.param(
            {"defaults": {"release_statuses": [429, 999]}},
            "defaults.release_statuses[1]",
            "599",
            id="status",
        ),
        pytest.param({"store": {"url": "http://x"}}, "store.url", "redis://", id="store-url"),
        pytest.param(
            {"store": {"failure_mode": "sometimes"}}, "store.failure_mode", "'open'", id="mode"
        ),
        pytest.param({"upstream": "ftp://x"}, "upstream", "http", id="upstream"),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "key": {"from": "cookie", "field": "x"}}]},
            "routes['pay'].key.from",
            "'json'",
            id="key-source",
        ),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "key": {"from": "json"}}]},
            "routes['pay'].key",
            "field",
            id="key-without-field",
        ),
        pytest.param({"routes": [{"path": "/x"}]}, "routes[0].name", "missing", id="no-name"),
        pytest.param(
            {"routes": [{"name": "pay", "path": "x"}]}, "routes['pay'].path", "'/'", id="path"
        ),
        pytest.param(
            {"routes": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]},
            "routes",
            "twice",
            id="duplicate-route",
        ),
        pytest.param({"workers": 2}, "workers", "memory store", id="workers-with-memory"),
        pytest.param({"log_level": "loud"}, "log_level", "'debug'", id="log-level"),
    ],
)
def test_ill_typed_values_name_key_and_reason(
    tmp_path: Path, tree: Any, where: str, reason: str
) -> None:
    message = _error(tmp_path, tree)
    # Whole-model checks have no single field; their message starts "config: <key>: ...".
    assert message.removeprefix("config: ").startswith(f"{where}:"), message
    assert reason in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("listen: [unclosed\n", "line", id="yaml-syntax"),
        pytest.param("- a\n- b\n", "mapping", id="top-level-list"),
    ],
)
def test_unreadable_files_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    message = _error(tmp_path, text)
    assert "config.yaml" in message
    assert expected in message


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(str(tmp_path / "absent.yaml"), environ={})
    assert "absent.yaml" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path, "") == Settings()


def test_path_key_not_in_template_is_one_line() -> None:
    settings = Settings.model_validate(
        {
            "routes": [
                {
                    "name": "pay",
                    "path": "/v1/orders/{id}/pay",
                    "key": {"from": "path", "field": "order_id"},
                }
            ]
        }
    )
    with pytest.raises(ConfigError) as exc:
        RouteTable(settings)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("routes['pay'].key")
    assert "order_id" in message
    assert "/v1/orders/{id}/pay" in message


@pytest.mark.parametrize(
    ("tree", "where"),
    [
        ({"routes": [{**PAY_ROUTE, "retention": "2s", "upstream_timeout": "3s"}]}, "routes['pay']"),
        # Just under twice lease + upstream_timeout is too close.
        (
            {
                "routes": [
                    {**PAY_ROUTE, "retention": "39s", "lease": "10s", "upstream_timeout": "10s"}
                ]
            },
            "routes['pay']",
        ),
        ({"defaults": {"retention": "1m", "upstream_timeout": "30s"}}, "defaults"),
        ({"defaults": {"retention": "1m"}, "routes": [PAY_ROUTE]}, "routes['pay']"),
        # The wait for a late answer counts: 2 x (10 s + 10 s + 1 s) > 41 s.
        (
            {
                "routes": [
                    {
                        **PAY_ROUTE,
                        "retention": "41s",
                        "lease": "10s",
                        "upstream_timeout": "10s",
                        "outcome_wait": "1s",
                    }
                ]
            },
            "routes['pay']",
        ),
    ],
)
def test_retention_must_comfortably_outlast_a_request(tree: dict[str, Any], where: str) -> None:
    """A record that expires while its request runs lets a duplicate execute again."""
    settings = Settings.model_validate({"upstream": "http://127.0.0.1:1", **tree})
    with pytest.raises(ConfigError) as exc:
        RouteTable(settings)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{where}.retention:"), message
    assert "lease + upstream_timeout" in message


def test_retention_twice_a_request_and_more_is_accepted() -> None:
    tree = {
        "routes": [
            {
                **PAY_ROUTE,
                "retention": "41s",
                "lease": "10s",
                "upstream_timeout": "10s",
                "outcome_wait": "0",
            }
        ]
    }
    RouteTable(Settings.model_validate({"upstream": "http://127.0.0.1:1", **tree}))
    RouteTable(Settings())  # the defaults: 24 h against 10 s + 30 s


# --------------------------------------------------------------------------- precedence


FILE_TREE: dict[str, Any] = {
    "upstream": "http://file:1",
    "listen": {"host": "10.0.0.1", "port": 1111},
    "admin": {"port": 1112},
    "store": {"url": "redis://file:6379/0", "failure_mode": "open"},
    "log_level": "warning",
}


def test_file_values_apply_when_nothing_overrides(tmp_path: Path) -> None:
    settings = _load(tmp_path, FILE_TREE)
    assert settings.upstream == "http://file:1"
    assert settings.listen.host == "10.0.0.1"
    assert settings.listen.port == 1111
    assert settings.admin.port == 1112
    assert settings.store.url == "redis://file:6379/0"
    assert settings.log_level == "warning"


def test_env_beats_file_and_flags_beat_env(tmp_path: Path) -> None:
    environ = {
        ENV_PREFIX + "UPSTREAM": "http://env:2",
        ENV_PREFIX + "HOST": "127.0.0.2",
        ENV_PREFIX + "PORT": "2222",
        ENV_PREFIX + "ADMIN_PORT": "2223",
        ENV_PREFIX + "REDIS_URL": "redis://env:6379/1",
        ENV_PREFIX + "LOG_LEVEL": "ERROR",
    }
    flags = {
        "upstream": None,  # not given on the command line: the environment stands
        "port": 3333,
        "redis_url": "redis://flag:6379/2",
        "host": None,
    }
    settings = _load(tmp_path, FILE_TREE, flags=flags, environ=environ)
    assert settings.upstream == "http://env:2"
    assert settings.listen.host == "127.0.0.2"
    assert settings.listen.port == 3333
    assert settings.admin.port == 2223
    assert settings.store.url == "redis://flag:6379/2"
    assert settings.log_level == "error"
    # The rest of the file's sections survive a flag that lands inside them.
    assert settings.store.failure_mode == "open"


def test_empty_env_values_do_not_override(tmp_path: Path) -> None:
    settings = _load(tmp_path, FILE_TREE, environ={ENV_PREFIX + "REDIS_URL": ""})
    assert settings.store.url == "redis://file:6379/0"


def test_config_file_from_env(tmp_path: Path) -> None:
    path = _write(tmp_path, FILE_TREE)
    settings = load_settings(None, {}, environ={ENV_PREFIX + "CONFIG": path})
    assert settings.store.url == "redis://file:6379/0"
    # An explicit --config beats the environment's file.
    other = _write(tmp_path, {"listen": {"port": 4444}}, name="other.yaml")
    settings = load_settings(other, {}, environ={ENV_PREFIX + "CONFIG": path})
    assert settings.listen.port == 4444
    assert settings.store.url == "memory://"


def test_bad_env_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, {}, environ={ENV_PREFIX + "PORT": "eighty"})
    assert str(exc.value).startswith("listen.port:")


# --------------------------------------------------------------------------- the CLI


def test_cli_run_with_unknown_key_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = _write(tmp_path, {"routes": [{**PAY_ROUTE, "key": {"frm": "json"}}]}, name="bad.yaml")
    line = _cli_config_error("--config", bad)
    assert "routes['pay'].key.frm: unknown key" in line


def test_cli_run_with_ill_typed_value_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = _write(tmp_path, {"defaults": {"lease": "abc"}}, name="bad.yaml")
    line = _cli_config_error("--config", bad)
    assert "defaults.lease:" in line
    assert "duration" in line


def test_cli_run_with_broken_yaml_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = _write(tmp_path, "routes: [\n  {name: pay\n", name="bad.yaml")
    line = _cli_config_error("--config", bad)
    assert "bad.yaml" in line


def test_cli_run_path_key_not_in_template_exits_2(tmp_path: Path) -> None:
    route = {
        "name": "pay",
        "path": "/v1/orders/{id}/pay",
        "key": {"from": "path", "name": "order_id"},
    }
    bad = _write(tmp_path, {"routes": [route]}, name="bad.yaml")
    line = _cli_config_error("--config", bad)
    assert "routes['pay'].key" in line
    assert "order_id" in line


def test_cli_flag_beats_env_beats_file(tmp_path: Path) -> None:
    # The file has a bad lease; a bad store URL from the environment is reported
    # first (store comes before defaults), unless a flag replaces it.
    bad = _write(tmp_path, {"defaults": {"lease": "abc"}}, name="bad.yaml")
    env = {ENV_PREFIX + "REDIS_URL": "http://not-redis"}
    line = _cli_config_error("--config", bad, env=env)
    assert "store.url:" in line
    line = _cli_config_error("--config", bad, "--redis-url", "memory://", env=env)
    assert "defaults.lease:" in line
    env_config = {ENV_PREFIX + "CONFIG": bad}
    line = _cli_config_error(env=env_config)
    assert "defaults.lease:" in line


def test_cli_run_without_upstream_is_one_line() -> None:
    done = _cli("run")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "upstream" in lines[0]


def test_cli_run_help_mentions_every_flag_and_env_var() -> None:
    done = _cli("run", "--help")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for flag, env in (
        ("--upstream", "UPSTREAM"),
        ("--host", "HOST"),
        ("--port", "PORT"),
        ("--admin-port", "ADMIN_PORT"),
        ("--redis-url", "REDIS_URL"),
        ("--config", "CONFIG"),
        ("--workers", "WORKERS"),
        ("--log-level", "LOG_LEVEL"),
    ):
        assert flag in text, flag
        assert ENV_PREFIX + env in text, env
    assert "default" in text
    assert "memory" in text


def test_mode_from_defaults_route_env_and_flag(tmp_path: Path) -> None:
    """`mode` is a policy: the defaults' value (file, env or flag) unless a route sets its own."""
    from proxy.routes import RouteTable

    tree = {
        "upstream": "http://file:1",
        "routes": [
            {"name": "a", "path": "/a"},
            {"name": "b", "path": "/b", "mode": "enforce"},
        ],
    }
    observing = {route.name: route.observe for route in RouteTable(_load(tmp_path, tree)).routes}
    assert observing == {"a": False, "b": False}
    for settings in (
        _load(tmp_path, {**tree, "defaults": {"mode": "observe"}}),
        _load(tmp_path, tree, environ={ENV_PREFIX + "MODE": "observe"}),
        _load(tmp_path, tree, flags={"mode": "observe"}),
    ):
        observing = {route.name: route.observe for route in RouteTable(settings).routes}
        assert observing == {"a": True, "b": False}


def test_cli_run_with_a_bad_mode_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text("routes:\n  - {name: pay, path: /pay, mode: watch}\n")
    line = _cli_config_error("--config", str(config))
    assert "routes['pay'].mode" in line, line
    done = _cli("run", "--upstream", "http://127.0.0.1:1", "--mode", "watch")
    assert done.returncode == 2 and "--mode" in done.stderr
    assert "IDEMPOTENCY_PROXY_MODE" in _cli("run", "--help").stdout


@pytest.mark.parametrize(
    ("tree", "where", "reason"),
    [
        pytest.param(
            {"defaults": {"retention": float("inf")}}, "defaults.retention", "finite", id="inf"
        ),
        pytest.param({"defaults": {"lease": float("nan")}}, "defaults.lease", "finite", id="nan"),
        pytest.param(
            {"store": {"timeout": float("nan")}}, "store.timeout", "finite", id="store-nan"
        ),
        pytest.param(
            {"defaults": {"upstream_timeout": 0}},
            "defaults.upstream_timeout",
            "greater than zero",
            id="upstream-timeout-zero",
        ),
        pytest.param(
            {"store": {"timeout": "0ms"}}, "store.timeout", "greater than zero", id="store-zero"
        ),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "lease": 0}]},
            "routes['pay'].lease",
            "greater than zero",
            id="route-lease-zero",
        ),
        pytest.param(
            {"routes": [{**PAY_ROUTE, "upstream_timeout": "0s"}]},
            "routes['pay'].upstream_timeout",
            "greater than zero",
            id="route-upstream-timeout-zero",
        ),
    ],
)
def test_durations_that_cannot_work_are_one_line(
    tmp_path: Path, tree: Any, where: str, reason: str
) -> None:
    """`.inf` as "keep forever" or 0 as "no timeout" is a careless operator's guess: an
    infinite retention was a traceback at start-up, and a zero upstream timeout marked
    every payment UNKNOWN (504) without a chance to answer; a zero store timeout fails
    every claim; a route's own zero lease passed where the default's was refused."""
    message = _error(tmp_path, tree)
    assert message.removeprefix("config: ").startswith(f"{where}:"), message
    assert reason in message, message


def test_outcome_wait_and_status_check_are_read_and_checked(tmp_path: Path) -> None:
    check = {"path": "/v1/orders/{order_id}/status", "after": "30s", "max_checks": 4}
    route = {
        "name": "pay",
        "path": "/v1/orders/pay",
        "key": {"from": "json", "field": "order_id"},
        "outcome_wait": "45s",
        "status_check": check,
    }
    settings = _load(tmp_path, {"routes": [route]})
    assert settings.defaults.outcome_wait == 120.0  # 2m by default
    assert settings.upstream_pool.max_held_exchanges == 64
    (compiled,) = RouteTable(settings).routes
    assert compiled.policy.outcome_wait == 45.0
    assert compiled.status_check is not None and compiled.status_check.after == 30.0
    assert compiled.status_check.executed == (200,)

    both = {**check, "executed": [200], "not_executed": [200]}
    message = _error(tmp_path, {"routes": [{**route, "status_check": both}]})
    assert message.startswith("routes['pay'].status_check") and "200" in message
    assert _error(tmp_path, {"routes": [{**route, "outcome_wait": "soon"}]}).startswith(
        "routes['pay'].outcome_wait"
    )
    header_keyed = {
        **route,
        "key": {"from": "header"},
        "status_check": {"path": "/v1/orders/{order_id}"},
    }
    with pytest.raises(ConfigError) as exc:
        RouteTable(_load(tmp_path, {"routes": [header_keyed]}))
    assert str(exc.value).startswith("routes['pay'].status_check.path: {order_id}")
