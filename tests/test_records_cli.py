"""The operator's `records` commands against a real Redis and a real proxy.

An UNKNOWN record is the proxy refusing to guess whether a payment happened. The runbook
(docs/operations.md) is: look at it (`show`), check the payment system's ledger, then
either `resolve` it to the response the client should get or `release` it so the
client's retry executes. These tests walk that runbook end to end.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from harness import BackendServer, ProxyFactory, pay_route, records_cli, wait_for_http

ROUTE = "pay"
TENANT = "acme"
CONFIG: dict[str, Any] = {
    "tenant": {"header": "X-Tenant-Id"},
    "routes": [
        pay_route(
            name=ROUTE,
            # Shorter than the backend's delay below: the proxy stops waiting after the
            # charge was committed, which is exactly the ambiguous case.
            upstream_timeout="300ms",
            # Give up at once: these tests need an UNKNOWN record to resolve.
            outcome_wait="0",
        )
    ],
}
CLI_TIMEOUT = 60.0


async def _records(
    action: str, redis_url: str, config: Path, key: str, *extra: str
) -> tuple[int, str, str]:
    """`python -m proxy records ACTION ...` as an operator would type it."""
    return await records_cli(
        action,
        "--redis-url",
        redis_url,
        "--config",
        str(config),
        "--route",
        ROUTE,
        "--tenant",
        TENANT,
        "--key",
        key,
        *extra,
        timeout=CLI_TIMEOUT,
    )


async def test_resolve_and_release_an_unknown_record(
    ledger_backend: BackendServer, redis_url: str, proxy_factory: ProxyFactory
) -> None:
    proxy = proxy_factory(ledger_backend.url, redis_url, config=CONFIG)
    assert proxy.config_path is not None
    config = proxy.config_path  # the CLI reads the same file, so route names match
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    order_id = "ord-unknown-1"
    order = {"order_id": order_id, "amount": 990, "currency": "EUR"}
    headers = {"X-Tenant-Id": TENANT}

    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
        # 1. The backend charges, then answers too late: the outcome is unknown.
        first = await client.post(
            f"{proxy.url}/v1/orders/pay", json=order, headers={**headers, "X-Sample-Delay": "1.5"}
        )
        assert first.status_code == 504
        assert first.json()["type"].endswith("/outcome-unknown")
        assert ledger_backend.ledger()["orders"] == {order_id: 1}
        # Until an operator acts, retries are told the same, and nothing is sent again.
        retry = await client.post(f"{proxy.url}/v1/orders/pay", json=order, headers=headers)
        assert retry.status_code == 504
        assert retry.headers["idempotent-replayed"] == "true"

        # 2. show: the record is UNKNOWN, and says why.
        code, out, err = await _records("show", redis_url, config, order_id)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["state"] == "UNKNOWN"
        assert shown["reason"] == "timeout"
        assert "response" not in shown or shown["response"]["status"] == 504

        # 3. The ledger says the charge happened: resolve to the response the client
        #    should have had.
        body = {"charge_id": "ch_manual_1", "order_id": order_id, "status": "succeeded"}
        code, out, err = await _records(
            "resolve", redis_url, config, order_id, "--status", "201", "--body", json.dumps(body)
        )
        assert code == 0, err
        assert out.strip() == "resolved"

        # COMPLETED now: the duplicate is a replay of the operator's response.
        replay = await client.post(f"{proxy.url}/v1/orders/pay", json=order, headers=headers)
        assert replay.status_code == 201
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["content-type"] == "application/json"
        assert replay.json() == body
        assert ledger_backend.ledger()["orders"] == {order_id: 1}

        # 4. release refuses a COMPLETED record: deleting it would let a retry charge again.
        code, out, err = await _records("release", redis_url, config, order_id)
        assert code == 1
        assert "refused" in err

        # 5. --force deletes it (the operator has decided the client must pay again); that
        #    it finds a record to delete shows the refused release left it alone.
        code, out, err = await _records("release", redis_url, config, order_id, "--force")
        assert code == 0, err
        assert out.strip() == "released"
        code, out, err = await _records("show", redis_url, config, order_id)
        assert code == 1
        assert "no record" in out

    assert ledger_backend.ledger()["orders"] == {order_id: 1}


async def test_records_without_tenant_find_the_anonymous_scope(
    ledger_backend: BackendServer, redis_url: str, proxy_factory: ProxyFactory
) -> None:
    """A request sent without the tenant header is its own scope: `records` without
    `--tenant` finds it, and `--tenant default` finds the tenant called `default`."""
    proxy = proxy_factory(ledger_backend.url, redis_url, config=CONFIG)
    assert proxy.config_path is not None
    config = str(proxy.config_path)
    order_id = f"ord-anonymous-{uuid.uuid4().hex[:8]}"
    order = {"order_id": order_id, "amount": 990, "currency": "EUR"}
    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
        anonymous = await client.post(f"{proxy.url}/v1/orders/pay", json=order)
        named = await client.post(
            f"{proxy.url}/v1/orders/pay", json=order, headers={"X-Tenant-Id": "default"}
        )
    assert anonymous.status_code == 201 and named.status_code == 201
    assert anonymous.json()["charge_id"] != named.json()["charge_id"]

    async def show(*tenant: str) -> dict[str, Any]:
        code, out, err = await records_cli(
            "show", "--redis-url", redis_url, "--config", config, "--route", ROUTE,
            *tenant, "--key", order_id, timeout=CLI_TIMEOUT,
        )  # fmt: skip
        assert code == 0, err
        document: dict[str, Any] = json.loads(out)
        return document

    mine, theirs = await show(), await show("--tenant", "default")
    assert base64.b64decode(mine["response"]["body_base64"]) == anonymous.content
    assert base64.b64decode(theirs["response"]["body_base64"]) == named.content


async def test_records_find_a_tenant_whose_name_is_not_ascii(
    ledger_backend: BackendServer, redis_url: str, proxy_factory: ProxyFactory
) -> None:
    """The proxy takes the tenant header's bytes as they came (`café` in UTF-8 from the
    gateway); the operator types the same name in a UTF-8 terminal, and finds the record."""
    proxy = proxy_factory(ledger_backend.url, redis_url, config=CONFIG)
    assert proxy.config_path is not None
    order_id = f"ord-cafe-{uuid.uuid4().hex[:8]}"
    order = {"order_id": order_id, "amount": 990, "currency": "EUR"}
    async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
        paid = await client.post(
            f"{proxy.url}/v1/orders/pay", json=order, headers={"X-Tenant-Id": "café".encode()}
        )
    assert paid.status_code == 201
    code, out, err = await records_cli(
        "show", "--redis-url", redis_url, "--config", str(proxy.config_path), "--route", ROUTE,
        "--tenant", "café", "--key", order_id, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    assert code == 0, (out, err)
    assert base64.b64decode(json.loads(out)["response"]["body_base64"]) == paid.content


RAW_FF = os.fsdecode(b"\xff")  # a byte the terminal sent that is not UTF-8


@pytest.mark.parametrize(
    "argv",
    [
        ["show", "--key", "a\tb"],
        ["show", "--key", "a\nb"],
        ["show", "--key", "x" * 300],
        ["show", "--key", ""],
        ["show", "--key", RAW_FF],
        ["resolve", "--key", "ok", "--status", "99999"],
        ["resolve", "--key", "ok", "--status", "100"],
        ["resolve", "--key", "ok", "--status", "201", "--content-type", "a/b\r\nSet-Cookie: x=1"],
        ["resolve", "--key", "ok", "--status", "201", "--content-type", "caf\u00e9/json"],
    ],
    ids=[
        "tab",
        "newline",
        "too-long",
        "empty",
        "key-not-utf8",
        "status-not-http",
        "status-informational",
        "content-type-crlf",
        "content-type-non-ascii",
    ],
)
async def test_hostile_arguments_are_one_line_and_touch_nothing(
    redis_url: str, tmp_path: Path, argv: list[str]
) -> None:
    """An operator's typo or a pasted log fragment: one line naming the flag, exit 2 (like
    any config error), never a traceback, and nothing written (a stored status 99999 or a
    header with a line break would break every later replay of the record)."""
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(CONFIG))
    action, *rest = argv
    code, out, err = await records_cli(
        action, "--redis-url", redis_url, "--config", str(config), "--route", ROUTE, *rest
    )
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("idempotency-proxy: config error: --"), err
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


async def test_a_body_of_raw_bytes_is_stored_as_given(redis_url: str, tmp_path: Path) -> None:
    """`--body` is bytes as the shell passed them; bytes that are not UTF-8 are not a
    traceback (there is no record here, so: `no record`)."""
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(CONFIG))
    code, _out, err = await records_cli(
        "resolve",
        "--redis-url",
        redis_url,
        "--config",
        str(config),
        "--route",
        ROUTE,
        "--key",
        "ok",
        "--status",
        "201",
        "--body",
        RAW_FF,
    )
    assert (code, "Traceback" in err) == (1, False), err
    assert "no record" in err
    # A tenant of such bytes is a name like any other: looked up, not a traceback.
    code, out, err = await records_cli(
        "show", "--redis-url", redis_url, "--config", str(config), "--route", ROUTE,
        "--key", "ok", "--tenant", RAW_FF,
    )  # fmt: skip
    assert (code, "Traceback" in err) == (1, False), err
    assert "no record" in out
