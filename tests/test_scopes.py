"""Where "one execution per scoped key" used to break silently: whose key it is (tenant),
which endpoints share it (namespace), when two requests count as the same one
(fingerprint), and how long the record outlives its request (retention).

Real processes: the sample backend's ledger counts executions, the proxy runs as
`python -m proxy run`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import orjson
import pytest
from harness import BackendServer, ProxyFactory, ProxyServer, charges_route, pay_route

JSON_HEADERS = {"Content-Type": "application/json"}
TENANT = "X-Tenant-Id"
CONFIG: dict[str, Any] = {
    "admin": {"host": "127.0.0.1"},
    "tenant": {"header": TENANT},
    "routes": [
        charges_route(),
        # A second header-keyed endpoint that charges: no namespace given.
        charges_route(name="pay-by-header", path="/v1/orders/pay"),
    ],
}
NATURAL_CONFIG: dict[str, Any] = {
    "admin": {"host": "127.0.0.1"},
    "routes": [
        pay_route(),
        # Another operation on the same order, keyed by the same natural key.
        {**charges_route(name="charge-order"), "key": {"from": "json", "field": "order_id"}},
    ],
}


def new_order() -> str:
    return f"scope-{uuid.uuid4().hex[:12]}"


def body(order: str, amount: int = 1250) -> bytes:
    return orjson.dumps({"order_id": order, "amount": amount, "currency": "EUR"})


async def times_charged(client: httpx.AsyncClient, backend: BackendServer, order: str) -> int:
    answer = await client.get(f"{backend.url}/v1/orders/{order}")
    return int(answer.json()["times_charged"])


def problem(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return str(response.json()["type"]).rsplit("/", 1)[-1]


@pytest.fixture
def proxy(backend: BackendServer, proxy_factory: ProxyFactory) -> ProxyServer:
    return proxy_factory(backend.url, config=CONFIG)


# --------------------------------------------------------------------------- tenants


async def test_absent_default_and_empty_tenant_never_share_a_scope(
    proxy: ProxyServer, backend: BackendServer, client: httpx.AsyncClient
) -> None:
    order = new_order()
    key = {"Idempotency-Key": f"k-{order}", **JSON_HEADERS}
    anonymous = await client.post(f"{proxy.url}/v1/charges", content=body(order), headers=key)
    assert anonymous.status_code == 201 and "idempotent-replayed" not in anonymous.headers
    # A client naming the tenant `default` is not the anonymous caller: its own request.
    named = await client.post(
        f"{proxy.url}/v1/charges", content=body(order), headers={**key, TENANT: "default"}
    )
    assert named.status_code == 201, named.text
    assert "idempotent-replayed" not in named.headers
    assert named.json()["charge_id"] != anonymous.json()["charge_id"]
    # An empty tenant is a mistake of the auth layer, never a scope.
    empty = await client.post(
        f"{proxy.url}/v1/charges", content=body(order), headers={**key, TENANT: ""}
    )
    assert empty.status_code == 400 and problem(empty) == "tenant-invalid"
    # The anonymous caller still gets its own replay.
    again = await client.post(f"{proxy.url}/v1/charges", content=body(order), headers=key)
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["charge_id"] == anonymous.json()["charge_id"]
    assert await times_charged(client, backend, order) == 2


# --------------------------------------------------------------------------- namespaces


async def test_a_header_key_sent_to_another_endpoint_is_key_reused(
    proxy: ProxyServer, backend: BackendServer, client: httpx.AsyncClient
) -> None:
    order = new_order()
    key = {"Idempotency-Key": f"k-{order}", **JSON_HEADERS, TENANT: "acme"}
    first = await client.post(f"{proxy.url}/v1/charges", content=body(order), headers=key)
    assert first.status_code == 201
    other = await client.post(f"{proxy.url}/v1/orders/pay", content=body(order), headers=key)
    assert other.status_code == 422 and problem(other) == "key-reused"
    # Another tenant's identical key on the other endpoint is its own request.
    theirs = await client.post(
        f"{proxy.url}/v1/orders/pay", content=body(order), headers={**key, TENANT: "globex"}
    )
    assert theirs.status_code == 201
    assert await times_charged(client, backend, order) == 2


async def test_a_natural_key_stays_per_route(
    backend: BackendServer, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(backend.url, config=NATURAL_CONFIG)
    order = new_order()
    paid = await client.post(
        f"{proxy.url}/v1/orders/pay", content=body(order), headers=JSON_HEADERS
    )
    charged = await client.post(
        f"{proxy.url}/v1/charges", content=body(order), headers=JSON_HEADERS
    )
    assert paid.status_code == 201 and charged.status_code == 201
    assert "idempotent-replayed" not in charged.headers
    assert await times_charged(client, backend, order) == 2


# --------------------------------------------------------------------------- fingerprints


async def test_repeated_query_parameters_in_another_order_are_another_request(
    proxy: ProxyServer, backend: BackendServer, client: httpx.AsyncClient
) -> None:
    order = new_order()
    key = {"Idempotency-Key": f"k-{order}", **JSON_HEADERS}
    first = await client.post(
        f"{proxy.url}/v1/charges?amount=100&amount=1", content=body(order), headers=key
    )
    assert first.status_code == 201
    swapped = await client.post(
        f"{proxy.url}/v1/charges?amount=1&amount=100", content=body(order), headers=key
    )
    # A last-wins backend reads another amount: never the first one's replay.
    assert swapped.status_code == 422 and problem(swapped) == "key-reused", swapped.text
    assert "idempotent-replayed" not in swapped.headers
    assert await times_charged(client, backend, order) == 1


@pytest.mark.parametrize(
    ("one", "other"),
    [(b"NaN", b"Infinity"), (b"1e400", b"-1e400"), (b"Infinity", b"null")],
)
async def test_non_finite_numbers_never_replay_each_other(
    proxy: ProxyServer, client: httpx.AsyncClient, one: bytes, other: bytes
) -> None:
    order = new_order()
    key = {"Idempotency-Key": f"k-{order}", **JSON_HEADERS}

    def doc(value: bytes) -> bytes:
        return b'{"order_id": "%s", "amount": 100, "fee": %s}' % (order.encode(), value)

    first = await client.post(f"{proxy.url}/v1/charges", content=doc(one), headers=key)
    # Whatever the backend made of it (the sample backend refuses non-finite numbers).
    assert "idempotent-replayed" not in first.headers
    second = await client.post(f"{proxy.url}/v1/charges", content=doc(other), headers=key)
    assert second.status_code == 422 and problem(second) == "key-reused", second.text


async def test_non_finite_numbers_are_refused_where_the_key_is_in_the_body(
    backend: BackendServer, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    proxy = proxy_factory(backend.url, config=NATURAL_CONFIG)
    order = new_order()
    seen = (await client.get(f"{backend.url}/v1/ledger")).json()["requests_seen"]
    for value in (b"NaN", b"-Infinity", b"1e400"):
        doc = b'{"order_id": "%s", "amount": %s}' % (order.encode(), value)
        answer = await client.post(f"{proxy.url}/v1/orders/pay", content=doc, headers=JSON_HEADERS)
        assert answer.status_code == 400 and problem(answer) == "body-invalid", answer.text
    assert (await client.get(f"{backend.url}/v1/ledger")).json()["requests_seen"] == seen


# --------------------------------------------------------------------------- retention


async def test_retention_below_lease_and_upstream_timeout_refuses_to_start(
    backend: BackendServer, proxy_factory: ProxyFactory
) -> None:
    config = {
        "admin": {"host": "127.0.0.1"},
        "routes": [pay_route(retention="2s", upstream_timeout="3s")],
    }
    proxy = proxy_factory(backend.url, config=config, start=False)
    process = await asyncio.create_subprocess_exec(
        *proxy.command(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the proxy started with a retention shorter than a request")
    assert process.returncode == 2, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err
    assert "routes['pay'].retention" in lines[0]
    assert "lease + upstream_timeout" in lines[0]


# --------------------------------------------------------------------------- trailers


def _chunked_with_trailer(
    method: str, target: str, headers: dict[str, str], payload: bytes, trailer: bytes
) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: proxy", "Transfer-Encoding: chunked"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head.append("Connection: close")
    chunk = b"%x\r\n%s\r\n" % (len(payload), payload)
    return "\r\n".join(head).encode() + b"\r\n\r\n" + chunk + b"0\r\n" + trailer + b"\r\n\r\n"


async def _exchange(proxy: ProxyServer, raw: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(20):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    return head.lower(), rest


async def test_a_trailer_never_names_the_tenant_or_becomes_a_header(
    proxy: ProxyServer, backend: BackendServer, client: httpx.AsyncClient
) -> None:
    """Trailer fields come after the body, where the gateway that sets the tenant header
    (and strips the client's) does not look. Taken as headers, a client sending none could
    name another tenant in a trailer and read its replays, or hand the backend any header.
    They are not headers: the request stays in its own (anonymous) scope."""
    order = new_order()
    key = f"trailer-{order}"
    victim = await client.post(
        f"{proxy.url}/v1/charges",
        content=body(order),
        headers={**JSON_HEADERS, TENANT: "victim", "Idempotency-Key": key},
    )
    assert victim.status_code == 201
    raw = _chunked_with_trailer(
        "POST",
        "/v1/charges",
        {**JSON_HEADERS, "Idempotency-Key": key},
        body(order),
        f"{TENANT}: victim".encode(),
    )
    head, answer = await _exchange(proxy, raw)
    assert head.startswith(b"http/1.1 201"), head
    assert b"idempotent-replayed" not in head
    assert answer != victim.content  # its own charge, not the victim's
    assert await times_charged(client, backend, order) == 2

    # Pass-through: the backend's echo lists the headers it received.
    raw = _chunked_with_trailer(
        "PUT", "/v1/echo?headers=1", {}, b"x", b"X-Smuggled: 1\r\nAuthorization: Bearer x"
    )
    head, answer = await _exchange(proxy, raw)
    assert head.startswith(b"http/1.1 200"), head
    assert b"x-smuggled" not in head + answer.lower()
    assert b"bearer x" not in head + answer.lower()
