"""The proxy's logs: JSON lines, one `request` line per request, and no secrets.

A proxy in front of a payment API sees card numbers, bearer tokens, tenant ids and
idempotency keys (which clients often build from order numbers or emails). None of that
may reach a log: a request is named by its request id and a short hash of its scoped
key. This suite sends requests full of such values through every kind of outcome
(forwarded, replayed, 422, 400, 409, 413, upstream failures, pass-through) and then
reads everything the proxy process wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import Any

import httpx
import pytest
from harness import (
    BackendServer,
    ProxyFactory,
    ProxyServer,
    RedisFactory,
    charges_route,
    eventually,
    pay_route,
)

from proxy.logs import JSONFormatter

CARD = "4111111111111111"
TOKEN = "tok-SECRET-bearer"
TENANT = "tenant-SECRET-7"
# Every value a client sends that must never be logged shares this marker.
MARKER = "SECRET"

CONFIG: dict[str, Any] = {
    "tenant": {"header": "X-Tenant-Id"},
    "routes": [
        pay_route(max_request_body="1KiB"),
        charges_route(upstream_timeout="500ms"),
    ],
}
REQUEST_FIELDS = ("route", "outcome", "status", "key_hash", "request_id", "upstream_ms", "store_ms")


class Sender:
    """Sends requests with secret-laden headers and remembers what each one got."""

    def __init__(self, client: httpx.AsyncClient, proxy: ProxyServer) -> None:
        self.client = client
        self.proxy = proxy
        self.sent: dict[str, int] = {}
        self._count = 0

    async def send(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[str, httpx.Response]:
        self._count += 1  # before the first await: concurrent sends get distinct ids
        request_id = f"rid-{self._count:03d}"
        all_headers = {
            "X-Request-Id": request_id,
            "Authorization": f"Bearer {TOKEN}",
            "X-Tenant-Id": TENANT,
            "Content-Type": "application/json",
            **(headers or {}),
        }
        response = await self.client.request(
            method, self.proxy.url + path, content=body, headers=all_headers
        )
        self.sent[request_id] = response.status_code
        return request_id, response


def _pay_body(order_id: str, amount: int = 1000, **extra: Any) -> bytes:
    document = {"order_id": order_id, "amount": amount, "currency": "EUR", "card": CARD, **extra}
    return json.dumps(document).encode()


def _read_lines(proxy: ProxyServer) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for raw in proxy.logs().splitlines():
        if not raw.strip() or raw.startswith("=== start "):  # the harness's own marker
            continue
        document = json.loads(raw)  # every line the proxy writes is one JSON object
        assert isinstance(document, dict), raw
        for field in ("ts", "level", "logger", "msg"):
            assert field in document, raw
        lines.append(document)
    return lines


@pytest.mark.parametrize("upstream_client", ["aiohttp", "httpx"])
async def test_logs_are_json_lines_with_one_request_line_each_and_no_secrets(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    redis_url: str,
    client: httpx.AsyncClient,
    upstream_client: str,
) -> None:
    # Each upstream client library may log on its own (httpx logs every URL at INFO).
    config = {**CONFIG, "upstream_pool": {"client": upstream_client}}
    proxy = proxy_factory(ledger_backend.url, redis_url, config, log_level="info")
    sender = Sender(client, proxy)
    pay_key = f"key-{MARKER}-123"
    expected: dict[str, tuple[str, str, int]] = {}

    async def send(route: str, outcome: str, status: int, *args: Any, **kwargs: Any) -> str:
        request_id, _ = await sender.send(*args, **kwargs)
        expected[request_id] = (route, outcome, status)
        return request_id

    pay = "/v1/orders/pay"
    first_pay = await send("pay", "forwarded", 201, "POST", pay, body=_pay_body(pay_key))
    replay = await send("pay", "replayed", 201, "POST", pay, body=_pay_body(pay_key))
    reused = await send("pay", "key_reused", 422, "POST", pay, body=_pay_body(pay_key, amount=999))
    await send("pay", "key_missing", 400, "POST", pay, body=json.dumps({"card": CARD}).encode())
    broken = f'{{"order_id": "{pay_key}", {CARD}'.encode()
    await send("pay", "body_invalid", 400, "POST", pay, body=broken)
    too_big = _pay_body(pay_key, pad="p" * 2000)
    await send("pay", "body_too_large", 413, "POST", pay, body=too_big)

    charges = "/v1/charges"
    charge = json.dumps({"amount": 500, "currency": "EUR", "description": CARD}).encode()
    bad_key = {"Idempotency-Key": f'"key-{MARKER}-open'}
    await send("charges", "key_invalid", 400, "POST", charges, body=charge, headers=bad_key)
    drop = {"Idempotency-Key": f"key-{MARKER}-drop", "X-Sample-Drop": "after"}
    await send("charges", "outcome_unknown", 502, "POST", charges, body=charge, headers=drop)
    slow = {"Idempotency-Key": f"key-{MARKER}-slow", "X-Sample-Delay-Before": "2"}
    await send("charges", "outcome_unknown", 504, "POST", charges, body=charge, headers=slow)
    failing = {"Idempotency-Key": f"key-{MARKER}-500", "X-Sample-Status": "500"}
    await send("charges", "forwarded", 500, "POST", charges, body=charge, headers=failing)

    # A duplicate while the first is still at the backend: 409.
    in_flight_order = f"order-{MARKER}-409"
    in_flight_body = _pay_body(in_flight_order)
    in_flight = {"X-Sample-Delay": "1.5"}
    first = asyncio.ensure_future(
        send("pay", "forwarded", 201, "POST", pay, body=in_flight_body, headers=in_flight)
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ledger = (await client.get(f"{ledger_backend.url}/v1/ledger")).json()
        if ledger["orders"].get(in_flight_order):
            break
        await asyncio.sleep(0.05)
    await send("pay", "in_flight", 409, "POST", pay, body=in_flight_body, headers=in_flight)
    await first

    await send("-", "passthrough", 200, "GET", f"/v1/orders/{pay_key}?token={TOKEN}")

    for request_id, status in sender.sent.items():
        assert expected[request_id][2] == status, (request_id, status, expected[request_id])

    # The request line is written after the answer: poll until every one is there.
    deadline = time.monotonic() + 15
    while True:
        lines = _read_lines(proxy)
        requests = [line for line in lines if line["logger"] == "idempotency_proxy.requests"]
        if len(requests) >= len(sender.sent) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)

    by_id: dict[str, list[dict[str, Any]]] = {}
    for line in requests:
        assert line["msg"] == "request"
        by_id.setdefault(line["request_id"], []).append(line)
    assert sorted(by_id) == sorted(sender.sent), (sorted(by_id), sorted(sender.sent))
    hashes: dict[str, str | None] = {}
    for request_id, (route, outcome, status) in expected.items():
        (line,) = by_id[request_id]
        for field in REQUEST_FIELDS:
            assert field in line, (field, line)
        assert (line["route"], line["outcome"], line["status"]) == (route, outcome, status), line
        assert line["method"] in ("GET", "POST")
        assert isinstance(line["total_ms"], int | float)
        key_hash = line["key_hash"]
        assert key_hash is None or re.fullmatch(r"[0-9a-f]{32}", key_hash), line
        hashes[request_id] = key_hash
        if outcome in ("forwarded", "outcome_unknown", "passthrough"):
            assert isinstance(line["upstream_ms"], int | float), line
        if outcome in ("forwarded", "outcome_unknown", "in_flight"):
            assert isinstance(line["store_ms"], int | float), line
        if outcome in ("key_missing", "key_invalid", "body_invalid", "body_too_large"):
            assert key_hash is None, line
        if outcome == "passthrough":
            assert key_hash is None and line["route"] == "-"

    # One key, one hash: the three pay requests that carried the key name the same record.
    assert hashes[first_pay] == hashes[replay] == hashes[reused] is not None
    # Two keys on pay (one used by the in-flight pair), three on charges.
    assert len({h for h in hashes.values() if h is not None}) == 5

    everything = proxy.logs()
    for secret in (MARKER, CARD, TOKEN, TENANT, "Bearer"):
        assert secret not in everything, f"{secret!r} leaked into the log"


ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_iso_timestamps_outcome_unknown_at_warning_and_store_errors_with_their_message(
    proxy_factory: ProxyFactory,
    ledger_backend: BackendServer,
    redis_factory: RedisFactory,
    client: httpx.AsyncClient,
) -> None:
    redis = redis_factory()
    config = {"store": {"timeout": "200ms", "retries": 0}, "routes": [charges_route()]}
    proxy = proxy_factory(ledger_backend.url, redis.url, config)
    charges = f"{proxy.url}/v1/charges"
    dropped = await client.post(
        charges,
        json={"amount": 1, "currency": "EUR"},
        headers={"Idempotency-Key": "k-drop", "X-Sample-Drop": "after"},
    )
    assert dropped.status_code == 502
    # The store freezes while the backend works: the completion fails and goes on in the
    # background, and the warning says why.
    slow = asyncio.ensure_future(
        client.post(
            charges,
            json={"amount": 2, "currency": "EUR"},
            headers={"Idempotency-Key": "k-slow", "X-Sample-Delay": "1"},
        )
    )
    await asyncio.sleep(0.5)
    redis.pause()
    try:
        assert (await slow).status_code == 201
        await asyncio.sleep(0.3)
    finally:
        redis.resume()

    async def background_warning() -> dict[str, Any] | None:
        for line in _read_lines(proxy):
            if line["msg"].startswith("store unavailable; recording the outcome"):
                return line
        return None

    warning = await eventually(background_warning, "the background completion warning")
    assert warning["level"] == "warning"
    # The class and its message (here: what timed out), not the class alone.
    assert re.fullmatch(r"StoreUnavailable: \w+.*", warning["reason"]), warning

    lines = _read_lines(proxy)
    for line in lines:
        assert ISO_UTC.fullmatch(line["ts"]), line["ts"]
    (unknown,) = [line for line in lines if line.get("outcome") == "outcome_unknown"]
    assert unknown["level"] == "warning"
    forwarded = [line for line in lines if line.get("outcome") == "forwarded"]
    assert forwarded and all(line["level"] == "info" for line in forwarded)


def test_logged_errors_carry_their_message_with_credentials_masked() -> None:
    try:
        try:
            raise ConnectionError("AUTH failed for redis://admin:hunter2@10.0.0.7:6379/0")
        except ConnectionError as cause:
            raise RuntimeError("store call failed: password=hunter2 token: tok-9") from cause
    except RuntimeError:
        record = logging.LogRecord(
            "idempotency_proxy", logging.ERROR, __file__, 1, "boom", None, sys.exc_info()
        )
    record.reason = "cannot reach rediss://:hunter2@host:6380 (Authorization: Bearer abc.def)"
    document = json.loads(JSONFormatter().format(record))
    assert document["error"] == "RuntimeError"
    assert document["error_message"].startswith("RuntimeError: store call failed")
    assert (
        "caused by ConnectionError: AUTH failed for redis://admin:***@10.0.0.7"
        in (document["error_message"])
    )
    text = json.dumps(document)
    for secret in ("hunter2", "tok-9", "abc.def"):
        assert secret not in text, secret
