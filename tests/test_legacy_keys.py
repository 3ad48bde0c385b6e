"""Legacy APIs behind real proxy replicas: SOAP/XML keys and composite keys.

Real Redis, the real sample backend (its SOAP endpoint charges on every call, like the
JSON one) and two proxy processes sharing one Redis. The ledger is the witness: one
charge per operation however many replicas the duplicates land on, none for a refused
request, and a stored SOAP fault replayed without calling the backend again.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
from harness import (
    BackendServer,
    ProxyServer,
    RedisServer,
    print_logs,
    problem_name,
    records_cli,
)

from sample_backend.soap import PAYMENTS_NS, SOAP11_NS, SOAP12_NS, pay_envelope

pytestmark = pytest.mark.replicas

SOAP_PATH = "/soap/payments"
ORDER_PATH = "/soap:Envelope/soap:Body/p:Pay/p:OrderId"
SOAP11 = {"content-type": "text/xml; charset=utf-8", "soapaction": '"urn:Pay"'}
SOAP12 = {"content-type": "application/soap+xml; charset=utf-8"}
CONFIG: dict[str, Any] = {
    "routes": [
        {
            "name": "soap-pay",
            "methods": ["POST"],
            "path": SOAP_PATH,
            "key": {
                "from": "xml",
                "path": ORDER_PATH,
                "namespaces": {"soap": [SOAP11_NS, SOAP12_NS], "p": PAYMENTS_NS},
            },
            "required": True,
        },
        {
            "name": "merchant-charges",
            "methods": ["POST"],
            "path": "/v1/charges",
            "key": [
                {"from": "header", "name": "X-Merchant-Id"},
                {"from": "json", "field": "order_id"},
            ],
            "required": True,
        },
    ]
}

BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY a "aaaaaaaaaa">'
    + b"".join(
        f'<!ENTITY {c} "{("&" + p + ";") * 10}">'.encode()
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + f'] ><s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><p:Pay xmlns:p="{PAYMENTS_NS}">'.encode()
    + b"<p:OrderId>&i;</p:OrderId><p:Amount>1</p:Amount><p:Currency>EUR</p:Currency>"
    + b"</p:Pay></s:Body></s:Envelope>"
)
XXE = (
    b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    + f'<s:Envelope xmlns:s="{SOAP11_NS}"><s:Body><p:Pay xmlns:p="{PAYMENTS_NS}">'.encode()
    + b"<p:OrderId>&x;</p:OrderId><p:Amount>1</p:Amount><p:Currency>EUR</p:Currency>"
    + b"</p:Pay></s:Body></s:Envelope>"
)
HOSTILE = {
    "billion-laughs": BILLION_LAUGHS,
    "external-entity": XXE,
    "too-deep": pay_envelope("deep", 1).replace(
        b"<p:Amount>", b"<p:X>" * 80 + b"</p:X>" * 80 + b"<p:Amount>"
    ),
    "malformed": pay_envelope("broken", 1)[:-20],
    # 320 kB: one element whose 9,000 attributes each sit in a namespace of their own.
    "many-namespaces": pay_envelope("spread", 1).replace(
        b"<p:Pay>",
        b"<p:Pay "
        + b" ".join(b'xmlns:n%d="urn:n%d" n%d:a="1"' % (i, i, i) for i in range(9_000))
        + b">",
    ),
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[BackendServer, list[ProxyServer]]]:
    """A private backend (its ledger counts only this module's requests) and two replicas."""
    redis_server.revive()
    backend = BackendServer(tmp_path_factory.mktemp("legacy-backend"))
    replicas = [
        ProxyServer(
            tmp_path_factory.mktemp("legacy-replica"),
            upstream=backend.url,
            redis_url=redis_server.url,
            config=CONFIG,
        )
        for _ in range(2)
    ]
    with backend:
        try:
            with ThreadPoolExecutor(2) as pool:
                for future in [pool.submit(server.start) for server in replicas]:
                    future.result()
            yield backend, replicas
        finally:
            for server in replicas:
                server.stop()


@pytest.fixture
def backend(
    stack: tuple[BackendServer, list[ProxyServer]], request: pytest.FixtureRequest
) -> Iterator[BackendServer]:
    failed_before = request.session.testsfailed
    yield stack[0]
    if request.session.testsfailed > failed_before:
        print_logs([stack[0], *stack[1]], 6000)


@pytest.fixture
def replicas(stack: tuple[BackendServer, list[ProxyServer]]) -> list[ProxyServer]:
    return stack[1]


def _order() -> str:
    return f"ord-{uuid.uuid4().hex[:12]}"


def _times_charged(backend: BackendServer, order: str) -> int:
    return int(backend.ledger()["orders"].get(order, 0))


def _requests_seen(backend: BackendServer) -> int:
    return int(backend.ledger()["requests_seen"])


def _replayed(response: httpx.Response) -> bool:
    return response.headers.get("idempotent-replayed") == "true"


# --------------------------------------------------------------------------- SOAP


async def test_the_soap_endpoint_charges_every_call_direct(
    client: httpx.AsyncClient, backend: BackendServer
) -> None:
    order = _order()
    for _ in range(2):
        response = await client.post(
            backend.url + SOAP_PATH, content=pay_envelope(order, 1250), headers=SOAP11
        )
        assert response.status_code == 200
        assert b"<p:ChargeId>ch_" in response.content
    assert _times_charged(backend, order) == 2  # the double submit the proxy must stop


@pytest.mark.parametrize("soap12", [False, True], ids=["soap11", "soap12"])
async def test_soap_double_submit_across_replicas_charges_once(
    client: httpx.AsyncClient,
    backend: BackendServer,
    replicas: list[ProxyServer],
    soap12: bool,
) -> None:
    order = _order()
    headers = SOAP12 if soap12 else SOAP11
    first = await client.post(
        replicas[0].url + SOAP_PATH,
        content=pay_envelope(order, 1250, soap12=soap12),
        headers=headers,
    )
    # The retry is pretty-printed by another client library: still the same request.
    again = await client.post(
        replicas[1].url + SOAP_PATH,
        content=pay_envelope(order, 1250, soap12=soap12, pretty=True),
        headers=headers,
    )
    assert first.status_code == 200, first.text
    assert not _replayed(first)
    assert again.status_code == 200, again.text
    assert _replayed(again)
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert _times_charged(backend, order) == 1


async def test_concurrent_soap_submits_charge_once(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    order = _order()
    responses = await asyncio.gather(
        *(
            client.post(
                replicas[i % 2].url + SOAP_PATH,
                content=pay_envelope(order, 700),
                headers={**SOAP11, "X-Sample-Delay": "0.3"},
            )
            for i in range(6)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 409}, statuses
    assert sum(1 for r in responses if r.status_code == 200 and not _replayed(r)) == 1
    assert _times_charged(backend, order) == 1


async def test_soap_changed_amount_is_422_and_not_charged(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    order = _order()
    first = await client.post(
        replicas[0].url + SOAP_PATH, content=pay_envelope(order, 1250), headers=SOAP11
    )
    assert first.status_code == 200
    tampered = await client.post(
        replicas[1].url + SOAP_PATH, content=pay_envelope(order, 1251), headers=SOAP11
    )
    assert tampered.status_code == 422
    assert problem_name(tampered) == "key-reused"
    assert tampered.headers["cache-control"] == "no-store"
    assert _times_charged(backend, order) == 1


async def test_a_soap_fault_is_stored_and_replayed(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    order = _order()
    bad = pay_envelope(order, 1250, currency="EURO")  # the backend answers a Client fault
    seen = _requests_seen(backend)
    first = await client.post(replicas[0].url + SOAP_PATH, content=bad, headers=SOAP11)
    again = await client.post(replicas[1].url + SOAP_PATH, content=bad, headers=SOAP11)
    assert first.status_code == 500
    assert b"<faultcode>soap:Client</faultcode>" in first.content
    assert not _replayed(first)
    assert again.status_code == 500
    assert _replayed(again)
    assert again.content == first.content
    assert _requests_seen(backend) == seen + 1  # the duplicate never reached the backend
    assert _times_charged(backend, order) == 0


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_xml_is_a_problem_with_no_side_effects(
    client: httpx.AsyncClient,
    backend: BackendServer,
    replicas: list[ProxyServer],
    redis_server: RedisServer,
    name: str,
) -> None:
    seen = _requests_seen(backend)
    records = len(list(redis_server.client().scan_iter("idem:*", count=1000)))
    started = time.monotonic()
    response = await client.post(replicas[0].url + SOAP_PATH, content=HOSTILE[name], headers=SOAP11)
    assert time.monotonic() - started < 5.0  # never a hang
    assert response.status_code == 400, response.text
    assert problem_name(response) == "body-invalid"
    assert response.headers["content-type"] == "application/problem+json"
    assert b"root:" not in response.content  # no file was read into the answer
    assert _requests_seen(backend) == seen  # nothing forwarded
    assert len(list(redis_server.client().scan_iter("idem:*", count=1000))) == records


async def test_soap_route_without_the_order_id_is_key_missing(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    seen = _requests_seen(backend)
    body = pay_envelope("x", 1).replace(b"<p:OrderId>x</p:OrderId>", b"")
    response = await client.post(replicas[0].url + SOAP_PATH, content=body, headers=SOAP11)
    assert response.status_code == 400
    assert problem_name(response) == "key-missing"
    assert ORDER_PATH in response.json()["detail"]
    assert _requests_seen(backend) == seen


# --------------------------------------------------------------------------- composite


def _charge(order: str, amount: int = 990) -> bytes:
    return orjson.dumps({"order_id": order, "amount": amount, "currency": "EUR"})


async def _post_charge(
    client: httpx.AsyncClient, proxy: ProxyServer, merchant: str | None, body: bytes
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if merchant is not None:
        headers["x-merchant-id"] = merchant
    return await client.post(proxy.url + "/v1/charges", content=body, headers=headers)


async def test_composite_key_replays_across_replicas(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    order = _order()
    first = await _post_charge(client, replicas[0], "m-1", _charge(order))
    again = await _post_charge(client, replicas[1], "m-1", _charge(order))
    assert first.status_code == 201, first.text
    assert again.status_code == 201
    assert _replayed(again) and not _replayed(first)
    assert again.content == first.content
    assert _times_charged(backend, order) == 1
    # Another merchant's order with the same number is another operation.
    other = await _post_charge(client, replicas[1], "m-2", _charge(order))
    assert other.status_code == 201 and not _replayed(other)
    assert _times_charged(backend, order) == 2


async def test_composite_parts_never_run_together(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    suffix = uuid.uuid4().hex[:8]
    # Joined naively, ("a", "b|c...") and ("a|b", "c...") would be the same key.
    first = await _post_charge(client, replicas[0], "a", _charge(f"b{suffix}"))
    second = await _post_charge(client, replicas[1], "ab", _charge(suffix))
    assert first.status_code == second.status_code == 201
    assert not _replayed(first) and not _replayed(second)
    assert _times_charged(backend, f"b{suffix}") == 1
    assert _times_charged(backend, suffix) == 1


async def test_composite_changed_amount_is_422(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    order = _order()
    assert (await _post_charge(client, replicas[0], "m-1", _charge(order))).status_code == 201
    tampered = await _post_charge(client, replicas[1], "m-1", _charge(order, 991))
    assert tampered.status_code == 422
    assert problem_name(tampered) == "key-reused"
    assert _times_charged(backend, order) == 1


@pytest.mark.parametrize("missing", ["header", "json"])
async def test_composite_missing_part_is_400_naming_the_part(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer], missing: str
) -> None:
    seen = _requests_seen(backend)
    if missing == "header":
        response = await _post_charge(client, replicas[0], None, _charge("ord-secret-1"))
        named = "X-Merchant-Id"
    else:
        body = orjson.dumps({"amount": 5, "currency": "EUR"})
        response = await _post_charge(client, replicas[0], "merchant-secret", body)
        named = "order_id"
    assert response.status_code == 400
    assert problem_name(response) == "key-missing"
    detail = response.json()["detail"]
    assert named in detail and "part" in detail
    assert b"secret" not in response.content  # the part that was sent is never echoed
    assert _requests_seen(backend) == seen


async def test_records_cli_names_a_composite_key_by_its_parts(
    client: httpx.AsyncClient,
    backend: BackendServer,
    replicas: list[ProxyServer],
    redis_server: RedisServer,
) -> None:
    order = _order()
    assert (await _post_charge(client, replicas[0], "m-7", _charge(order))).status_code == 201
    config = str(replicas[0].config_path)
    common = ("--redis-url", redis_server.url, "--config", config, "--route", "merchant-charges")
    code, out, err = await records_cli("show", *common, "--key", "m-7", "--key", order)
    assert code == 0, (out, err)
    assert '"state": "COMPLETED"' in out
    # One value for a two-part key names no record: a one-line error, not a wrong lookup.
    code, out, err = await records_cli("show", *common, "--key", order)
    assert code == 2, (out, err)
    assert "2 part(s)" in err and len(err.strip().splitlines()) == 1
    # A part no key can be (empty, a tab, non-ASCII) is a one-line error, not a traceback.
    for bad in ("", "m\t7", "m-\u00e9"):
        code, out, err = await records_cli("show", *common, "--key", bad, "--key", order)
        assert code == 2, (out, err)
        assert "--key" in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------- odd bytes


def _odd_requests(order: str) -> list[tuple[bytes, dict[str, str] | list[tuple[str, str]]]]:
    """SOAP bodies and headers a careless or hostile client may send; none is a 5xx."""
    envelope = pay_envelope(order, 5)
    text = envelope.decode()
    utf16 = ('<?xml version="1.0" encoding="UTF-16"?>' + text).encode("utf-16")
    return [
        (utf16, {"content-type": "text/xml"}),  # BOM and declaration agree
        (utf16, {"content-type": "text/xml; charset=utf-8"}),  # the charset lies
        (b"\xef\xbb\xbf" + envelope, {"content-type": "text/xml"}),
        (envelope, {"content-type": "text/xml; charset=x-nope"}),
        (envelope, {"content-type": 'text/xml; CHARSET="UTF-8"; action="urn:Pay"'}),
        (envelope, {"content-type": "text/xml; charset=utf-32"}),
        (envelope, {"content-type": "application/soap+xml; charset=rot13"}),
        (envelope.replace(order.encode(), order.encode() + b"&#x1e;x"), {}),
        (envelope.replace(order.encode(), b"<![CDATA[" + order.encode() + b"]]>"), {}),
        (envelope.replace(b"<p:Pay>", b"<?pi data?><!--c--><p:Pay>"), {}),
        (envelope.replace(b"<p:Pay>", b'<p:Pay a="' + b"x" * 200_000 + b'">'), {}),
        (envelope, [("content-type", "text/xml"), ("x-request-id", "a\x7fb")]),
        (envelope, [("content-type", "text/xml"), ("x-request-id", '"}{\\')]),
    ]


async def test_odd_bytes_on_the_soap_route_are_never_a_5xx_nor_echoed(
    client: httpx.AsyncClient, backend: BackendServer, replicas: list[ProxyServer]
) -> None:
    order = _order()
    for body, headers in _odd_requests(order):
        sent = httpx.Headers(headers)
        if "content-type" not in sent:
            sent["content-type"] = "text/xml; charset=utf-8"
        response = await client.post(replicas[0].url + SOAP_PATH, content=body, headers=sent)
        assert response.status_code < 500, (body[:80], headers, response.text)
        if problem_name(response) is not None:  # the backend's own answer is untouched
            assert response.headers["x-request-id"]
            assert order.encode() not in response.content
    assert _times_charged(backend, order) <= 1
    assert "Traceback" not in replicas[0].logs()
    assert order not in replicas[0].logs()
