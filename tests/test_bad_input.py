"""Input the proxy must refuse itself, cleanly, without bothering the backend.

Every refusal is a 4xx problem+json naming what was wrong (never the client's
bytes), and the backend's ledger shows it never saw the request. A broken config
stops `run` with one line naming the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import (
    REPO_ROOT,
    BackendServer,
    ProxyFactory,
    ProxyServer,
    charges_route,
    pay_config,
    pay_route,
)
from rawhttp import raw_request, values

PROBLEM_BASE = "https://idempotency-proxy.dev/problems/"
CONFIG: dict[str, Any] = {
    "routes": [
        pay_route(),
        {
            "name": "charges",
            "methods": ["POST"],
            "path": "/v1/charges",
            "key": {"from": "json", "field": "meta.ref"},
        },
        {
            "name": "form",
            "methods": ["POST"],
            "path": "/v1/echo",
            "key": {"from": "form", "field": "ref"},
        },
    ]
}


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, backend: BackendServer
) -> Iterator[ProxyServer]:
    server = ProxyServer(tmp_path_factory.mktemp("bad-input"), upstream=backend.url, config=CONFIG)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _backend_alive(backend: BackendServer) -> None:
    """Revive the backend if an earlier suite broke it (tests compare request counts, so
    the ledger needs no reset)."""
    backend.revive()


async def requests_seen(client: httpx.AsyncClient, backend: BackendServer) -> int:
    """Requests that reached a charge endpoint of the backend, charged or not."""
    response = await client.get(f"{backend.url}/v1/ledger")
    response.raise_for_status()
    return int(response.json()["requests_seen"])


def assert_problem(response: httpx.Response, status: int, name: str) -> str:
    """The contract's problem+json; returns the detail for checks on its wording."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    document = response.json()
    assert document["type"] == PROBLEM_BASE + name
    assert document["title"]
    assert document["status"] == status
    return str(document.get("detail", ""))


@pytest.mark.parametrize(
    ("path", "body", "name", "field"),
    [
        ("/v1/orders/pay", b'{"order_id": "o-1", "amount": ', "body-invalid", "order_id"),
        ("/v1/orders/pay", b"order_id=o-1", "body-invalid", "order_id"),
        ("/v1/orders/pay", b"", "body-invalid", "order_id"),
        ("/v1/orders/pay", b'{"amount": 1000, "currency": "EUR"}', "key-missing", "order_id"),
        ("/v1/orders/pay", b'[{"order_id": "o-1"}]', "key-missing", "order_id"),
        ("/v1/charges", b'{"meta": {"re": 1}, "amount": 1}', "key-missing", "meta.ref"),
        ("/v1/charges", b'{"meta": "ref", "amount": 1}', "key-missing", "meta.ref"),
        ("/v1/charges", b'{"meta": {"ref": ', "body-invalid", "meta.ref"),
    ],
    ids=[
        "truncated",
        "not-json",
        "empty",
        "field-missing",
        "not-an-object",
        "nested-missing",
        "nested-not-an-object",
        "nested-truncated",
    ],
)
async def test_bad_json_is_400_naming_the_key_field(
    proxy: ProxyServer,
    backend: BackendServer,
    client: httpx.AsyncClient,
    path: str,
    body: bytes,
    name: str,
    field: str,
) -> None:
    seen = await requests_seen(client, backend)
    response = await client.post(
        proxy.url + path, content=body, headers={"Content-Type": "application/json"}
    )
    detail = assert_problem(response, 400, name)
    assert f"'{field}'" in detail
    assert await requests_seen(client, backend) == seen


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        ("/v1/orders/pay", "text/plain", b'{"order_id": "o-1", "amount": 1, "currency": "EUR"}'),
        ("/v1/orders/pay", None, b'{"order_id": "o-1", "amount": 1, "currency": "EUR"}'),
        ("/v1/orders/pay", "application/x-www-form-urlencoded", b"order_id=o-1"),
        ("/v1/echo", "application/json", b'{"ref": "r-1"}'),
    ],
    ids=["text-plain", "no-content-type", "form-on-json-route", "json-on-form-route"],
)
async def test_wrong_content_type_is_415(
    proxy: ProxyServer,
    backend: BackendServer,
    client: httpx.AsyncClient,
    path: str,
    content_type: str | None,
    body: bytes,
) -> None:
    seen = await requests_seen(client, backend)
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post(proxy.url + path, content=body, headers=headers)
    assert_problem(response, 415, "unsupported-media-type")
    assert await requests_seen(client, backend) == seen


async def test_invalid_utf8_is_400(
    proxy: ProxyServer, backend: BackendServer, client: httpx.AsyncClient
) -> None:
    seen = await requests_seen(client, backend)
    as_json = await client.post(
        proxy.url + "/v1/orders/pay",
        content=b'{"order_id": "o-\xff\xfe", "amount": 1000, "currency": "EUR"}',
        headers={"Content-Type": "application/json"},
    )
    assert "order_id" in assert_problem(as_json, 400, "body-invalid")
    as_form = await client.post(
        proxy.url + "/v1/echo",
        content=b"ref=r-\xff\xfe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_problem(as_form, 400, "body-invalid")
    assert await requests_seen(client, backend) == seen
    # The same form route does accept a well-formed form (and the echo shows it arrived).
    good = await client.post(
        proxy.url + "/v1/echo",
        content=b"ref=r-1&x=%C3%A9",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert good.status_code == 200
    assert good.content == b"ref=r-1&x=%C3%A9"


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Big", "a" * (33 * 1024))],
        [(f"X-Part-{i}", "b" * 1024) for i in range(40)],
    ],
    ids=["one-big-header", "many-headers"],
)
async def test_oversized_headers_are_431_and_not_forwarded(
    proxy: ProxyServer,
    backend: BackendServer,
    client: httpx.AsyncClient,
    headers: list[tuple[str, str]],
) -> None:
    order = f"ord-{uuid.uuid4().hex[:16]}"
    body = json.dumps({"order_id": order, "amount": 1000, "currency": "EUR"}).encode()
    seen = await requests_seen(client, backend)
    response = await client.post(
        proxy.url + "/v1/orders/pay",
        content=body,
        headers=[("Content-Type", "application/json"), *headers],
    )
    assert_problem(response, 431, "headers-too-large")
    # Far over the limit, the server itself may refuse first; either way a clean 4xx.
    huge = await client.get(proxy.url + f"/v1/orders/{order}", headers={"X-Huge": "c" * 2**20})
    assert 400 <= huge.status_code < 500
    assert await requests_seen(client, backend) == seen
    assert (await client.get(f"{backend.url}/v1/orders/{order}")).json()["times_charged"] == 0


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        (b"POST /v1/orders/pay HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"c" * 2**20 + b"\r\n\r\n", 431),
        (
            b"POST /v1/orders/pay HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n"
            b"Content-Length: 1048576\r\n\r\n" + b"x" * 2**20,
            400,
        ),
    ],
    ids=["head-over-the-cap", "bytes-the-parser-refuses"],
)
async def test_a_refusal_made_while_the_client_still_sends_reaches_the_client(
    proxy: ProxyServer, sent: bytes, status: int
) -> None:
    """The traffic port refuses some requests before their client has finished sending
    (a head over the cap, bytes the parser cannot read). Closing with those bytes unread
    makes the kernel reset the connection, and a client still writing loses the answer it
    was sent. Ten clients at once, each 1 MiB past the point of refusal: every one reads
    its problem, then the end of the connection."""
    host, port = proxy.url.removeprefix("http://").split(":")

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(sent)
            with contextlib.suppress(ConnectionError):
                await writer.drain()  # a client that cannot finish sending still reads
            async with asyncio.timeout(30):
                return await reader.read()
        finally:
            writer.close()

    for answer in await asyncio.gather(*(one() for _ in range(10))):
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
        assert b"application/problem+json" in answer


# --------------------------------------------------------------------------- config


def _run_with_config(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--upstream",
            "http://127.0.0.1:9",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--config",
            str(path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"defaults": {"leese": "10s"}}, "defaults.leese"),
        (
            {"routes": [{"name": "pay", "path": "/v1/orders/pay", "lease": "soon"}]},
            "lease",
        ),
    ],
    ids=["unknown-key", "ill-typed-duration"],
)
def test_bad_config_stops_run_with_one_line_naming_the_key(
    tmp_path: Path, config: dict[str, Any], names: str
) -> None:
    result = _run_with_config(tmp_path, config)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert names in lines[0]
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- deeply nested JSON


@pytest.mark.parametrize(
    ("depth", "keyed_status"),
    [(1000, 201), (50_000, 400)],
    ids=["parses-but-too-deep-to-re-encode", "too-deep-to-parse"],
)
async def test_deeply_nested_json_is_forwarded_or_a_problem_never_a_500(
    proxy_factory: ProxyFactory, raw_upstream: str, depth: int, keyed_status: int
) -> None:
    config = pay_config()
    config["routes"] = [*config["routes"], charges_route()]
    proxy = proxy_factory(raw_upstream, config=config)
    nested = b'{"order_id":"%s","n":' % _new_key().encode() + b"[" * depth + b"]" * depth + b"}"
    json_headers = [(b"content-type", b"application/json")]
    status, headers, body = await raw_request(
        proxy.url, "POST", b"/v1/orders/pay", json_headers, nested
    )
    assert status == keyed_status, body
    if status == 400:
        assert values(headers, b"content-type") == [b"application/problem+json"]
        assert b"/problems/body-invalid" in body
        assert values(headers, b"cache-control") == [b"no-store"]
    # Keyed by header: the body is only fingerprinted (as raw bytes when it cannot be
    # canonicalised); the backend decides about it.
    keyed = [*json_headers, (b"idempotency-key", _new_key().encode())]
    status, _, body = await raw_request(proxy.url, "POST", b"/v1/charges", keyed, nested)
    assert (status, body) == (201, b"/v1/charges")
    status, replayed, _ = await raw_request(proxy.url, "POST", b"/v1/charges", keyed, nested)
    assert status == 201
    assert values(replayed, b"idempotent-replayed") == [b"true"]


def _new_key() -> str:
    return f"nested-{uuid.uuid4().hex[:16]}"
