"""The `key_hash` in the logs: keyed by a deployment secret, and usable to find the record.

An unsalted, truncated sha256 of a guessable key (`ord-73519`) gave the key back from one
log line in a fraction of a second. The hash is now keyed (HMAC rounds under
`key_hash_secret`), so a log reader without the secret cannot test guesses; the
operator's `records` commands, which have the secret, find a record by that hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import BackendServer, ProxyFactory, eventually, pay_route, records_cli, wait_for_http

from proxy.config import ConfigError, load_settings
from proxy.keys import KeyHasher, scope

SECRET = "k3y-hash-secret-for-tests-0123456789abcdef"
TENANT = "acme"


def _old_log_hash(tenant: str, namespace: str, key: str) -> str:
    """What the logs carried before: the first 12 hex digits of an unkeyed sha256."""
    material = f"{len(tenant)}:{tenant}|{len(namespace)}:{namespace}|{key}".encode()
    return hashlib.sha256(material).hexdigest()[:12]


def test_a_guessable_key_is_not_recovered_from_its_log_hash_without_the_secret() -> None:
    logged = KeyHasher(SECRET).scope(TENANT, "pay", "ord-73519").log_hash
    assert re.fullmatch(r"[0-9a-f]{32}", logged)
    # The attack: hash every plausible order id the way the proxy does, look for the line.
    # Neither the old recipe nor the proxy's own code without the secret finds it.
    unkeyed = KeyHasher()
    for n in range(73000, 74000):
        guess = f"ord-{n}"
        assert not logged.startswith(_old_log_hash(TENANT, "pay", guess))
        assert unkeyed.scope(TENANT, "pay", guess).log_hash != logged
        assert KeyHasher("another-secret").scope(TENANT, "pay", guess).log_hash != logged
    # The storage key does not depend on the secret: records survive a change of secret.
    assert KeyHasher(SECRET).scope(TENANT, "pay", "ord-73519") == scope(TENANT, "pay", "ord-73519")


def test_the_log_hash_names_its_record_under_the_same_secret_only() -> None:
    hasher = KeyHasher(SECRET)
    for key in ("ord-1", "k" * 255, "}{evil*?[x]"):
        scoped = hasher.scope(TENANT, "pay", key)
        assert hasher.storage_key(scoped.log_hash) == scoped.storage_key
        assert hasher.log_hash(scoped.storage_key) == scoped.log_hash
        assert KeyHasher("other").storage_key(scoped.log_hash) != scoped.storage_key
    for bad in ("", "abc", "g" * 32, "A" * 32, "0" * 31, "0" * 33):
        with pytest.raises(ValueError):
            hasher.storage_key(bad)


def test_key_hash_secret_from_the_environment_or_a_file(tmp_path: Path) -> None:
    env = {"IDEMPOTENCY_PROXY_KEY_HASH_SECRET": SECRET}
    settings = load_settings(None, {}, environ=env)
    assert settings.key_hash_secret == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings)

    secret_file = tmp_path / "key-hash-secret"
    secret_file.write_text(SECRET + "\n")  # `echo` into a file, or a Kubernetes Secret
    config = tmp_path / "config.yaml"
    config.write_text(f"key_hash_secret_file: {secret_file}\n")
    assert load_settings(str(config), {}, environ={}).key_hash_secret == SECRET
    env_file = {"IDEMPOTENCY_PROXY_KEY_HASH_SECRET_FILE": str(secret_file)}
    assert load_settings(None, {}, environ=env_file).key_hash_secret == SECRET


@pytest.mark.parametrize(
    ("config", "environ", "named"),
    [
        ("key_hash_secret_file: /nonexistent/secret\n", {}, "key_hash_secret_file"),
        ("key_hash_secret_file: {empty}\n", {}, "key_hash_secret_file"),
        (
            "key_hash_secret_file: {full}\n",
            {"IDEMPOTENCY_PROXY_KEY_HASH_SECRET": SECRET},
            "key_hash_secret",
        ),
    ],
    ids=["missing-file", "empty-file", "both"],
)
def test_a_bad_key_hash_secret_is_one_line_that_names_the_key(
    tmp_path: Path, config: str, environ: dict[str, str], named: str
) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    full = tmp_path / "full"
    full.write_text(SECRET)
    path = tmp_path / "config.yaml"
    path.write_text(config.format(empty=empty, full=full))
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), {}, environ=environ)
    message = str(caught.value)
    assert message.startswith(named), message
    assert "\n" not in message and SECRET not in message


CONFIG: dict[str, Any] = {
    "tenant": {"header": "X-Tenant-Id"},
    "routes": [pay_route(name="pay")],
}


def _key_hashes(logs: str) -> list[str]:
    hashes = []
    for line in logs.splitlines():
        if line.startswith("{"):
            document = json.loads(line)
            if document.get("key_hash"):
                hashes.append(document["key_hash"])
    return hashes


async def test_records_commands_find_a_record_by_the_key_hash_of_its_log_line(
    ledger_backend: BackendServer, redis_url: str, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    proxy = proxy_factory(
        ledger_backend.url,
        redis_url,
        config={**CONFIG, "key_hash_secret_file": str(secret_file)},
    )
    assert proxy.config_path is not None
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    order_id = "ord-73519"
    order = {"order_id": order_id, "amount": 1250, "currency": "EUR"}
    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
        first = await client.post(
            f"{proxy.url}/v1/orders/pay", json=order, headers={"X-Tenant-Id": TENANT}
        )
    assert first.status_code == 201, first.text

    async def one_line() -> list[str] | None:
        # The request's line is written just after its answer went out.
        return _key_hashes(proxy.logs()) or None

    (logged,) = await eventually(one_line, "the request's log line")
    logs = proxy.logs()
    assert logged == KeyHasher(SECRET).scope(TENANT, "pay", order_id).log_hash
    assert not logged.startswith(_old_log_hash(TENANT, "pay", order_id))
    assert SECRET not in logs
    assert "key_hash_secret is not set" not in logs

    config = str(proxy.config_path)  # the operator passes the proxy's config: same secret
    code, out, err = await records_cli(
        "show", "--redis-url", redis_url, "--config", config, "--hash", logged
    )
    assert code == 0, err
    shown = json.loads(out)
    assert shown["state"] == "COMPLETED"
    assert shown["key_hash"] == logged
    assert SECRET not in out + err
    # The raw key still works, and names the same record.
    code, out, err = await records_cli(
        "show", "--redis-url", redis_url, "--config", config,
        "--route", "pay", "--tenant", TENANT, "--key", order_id,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["key_hash"] == logged, err
    # Without the secret the hash names nothing (and certainly not this record).
    code, out, _ = await records_cli("show", "--redis-url", redis_url, "--hash", logged)
    assert code == 1 and "no record" in out
    code, _, err = await records_cli(
        "release", "--redis-url", redis_url, "--config", config, "--hash", logged, "--force"
    )
    assert code == 0, err
    code, out, _ = await records_cli(
        "show", "--redis-url", redis_url, "--config", config, "--hash", logged
    )
    assert code == 1 and "no record" in out


async def test_an_unset_secret_is_a_start_up_warning(
    ledger_backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(ledger_backend.url, config=CONFIG)
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    warnings = [
        json.loads(line)
        for line in proxy.logs().splitlines()
        if line.startswith("{") and "key_hash_secret is not set" in line
    ]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
