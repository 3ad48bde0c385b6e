"""The sample base_url, run as a real subprocess: it must double charge, and fail on request."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from harness import BackendServer


class _CleanBackend(BackendServer):
    """The sample backend with none of a developer's SAMPLE_BACKEND_* settings."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        return {k: v for k, v in env.items() if not k.startswith("SAMPLE_BACKEND_")}

    def output(self) -> list[str]:
        """What the backend wrote (stdout and stderr), without the harness's start line."""
        return [line for line in self.logs().splitlines() if line and not line.startswith("===")]


@pytest.fixture(scope="module")
def sample_backend_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_CleanBackend]:
    tmp = tmp_path_factory.mktemp("sample_backend")
    with _CleanBackend(tmp, db=tmp / "ledger.sqlite3", ready_timeout=10.0) as server:
        yield server


@pytest.fixture
async def base_url(sample_backend_server: _CleanBackend) -> str:
    """The backend's base URL, with an empty ledger."""
    async with httpx.AsyncClient() as client:
        reset = await client.post(f"{sample_backend_server.url}/v1/ledger/reset")
        assert reset.status_code == 204
    return sample_backend_server.url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        yield client


async def _ledger(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with session.get(f"{base_url}/v1/ledger") as response:
        assert response.status == 200
        data: dict[str, Any] = await response.json()
        return data


PAYMENT = {"order_id": "order-1", "amount": 1250, "currency": "EUR"}


async def test_identical_payments_charge_twice(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    answers = []
    for _ in range(2):
        async with session.post(f"{base_url}/v1/orders/pay", json=PAYMENT) as response:
            assert response.status == 201
            body = await response.json()
            assert response.headers["Location"] == f"/v1/charges/{body['charge_id']}"
            assert response.headers["ETag"].startswith('"')
            assert response.headers["Set-Cookie"].startswith("session=")
            assert response.headers["X-Request-Id"]
            answers.append(body)
    first, second = answers
    assert first["charge_id"] != second["charge_id"]
    assert first["status"] == "succeeded"
    assert {k: first[k] for k in PAYMENT} == PAYMENT

    ledger = await _ledger(session, base_url)
    assert ledger["charges"] == 2
    assert ledger["amount_total"] == 2500
    assert ledger["orders"] == {"order-1": 2}
    assert ledger["orders_charged_more_than_once"] == ["order-1"]
    assert ledger["double_charged_count"] == 1
    assert ledger["requests_seen"] == 2
    assert ledger["balances"] == {"EUR": -2500}

    async with session.get(f"{base_url}/v1/orders/order-1") as response:
        order = await response.json()
    assert order["times_charged"] == 2
    assert [c["charge_id"] for c in order["charges"]] == [first["charge_id"], second["charge_id"]]
    async with session.get(f"{base_url}/v1/charges/{first['charge_id']}") as response:
        assert await response.json() == first


async def test_charges_endpoint_and_lookups(base_url: str, session: aiohttp.ClientSession) -> None:
    charge = {"amount": 5, "currency": "usd", "description": "tip"}
    async with session.post(f"{base_url}/v1/charges", json=charge) as response:
        assert response.status == 201
        body = await response.json()
    assert body["order_id"] is None
    assert body["currency"] == "USD"
    async with session.get(f"{base_url}/v1/charges/ch_999999") as response:
        assert response.status == 404
    async with session.get(f"{base_url}/v1/orders/never") as response:
        assert await response.json() == {
            "order_id": "never",
            "charges": [],
            "times_charged": 0,
            "status_checks": 0,
        }


async def test_reject_answers_without_charging(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    url = f"{base_url}/v1/orders/pay"
    async with session.post(url, params={"reject": "429"}, json=PAYMENT) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        assert "error" in await response.json()
    async with session.post(url, headers={"X-Sample-Reject": "402"}, json=PAYMENT) as response:
        assert response.status == 402
    ledger = await _ledger(session, base_url)
    assert ledger["charges"] == 0
    assert ledger["requests_seen"] == 2


async def test_status_fault_charges_then_fails(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{base_url}/v1/orders/pay", params={"status": "500"}, json=PAYMENT
    ) as response:
        assert response.status == 500
        assert (await response.json())["order_id"] == "order-1"
    assert (await _ledger(session, base_url))["charges"] == 1


async def test_header_wins_over_query(base_url: str, session: aiohttp.ClientSession) -> None:
    async with session.post(
        f"{base_url}/v1/orders/pay",
        params={"status": "500"},
        headers={"X-Sample-Status": "202"},
        json=PAYMENT,
    ) as response:
        assert response.status == 202


@pytest.mark.parametrize(("when", "charges"), [("before", 0), ("after", 1)])
async def test_drop_closes_the_connection(
    base_url: str, session: aiohttp.ClientSession, when: str, charges: int
) -> None:
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(
            f"{base_url}/v1/orders/pay", params={"drop": when}, json=PAYMENT
        ) as response:
            await response.read()
    ledger = await _ledger(session, base_url)
    assert ledger["charges"] == charges
    assert ledger["requests_seen"] == 1


async def test_drop_sends_no_response_byte(base_url: str, session: aiohttp.ClientSession) -> None:
    port = int(base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(PAYMENT).encode()
    writer.write(
        b"POST /v1/orders/pay HTTP/1.1\r\nHost: x\r\nX-Sample-Drop: after\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    try:
        received = await asyncio.wait_for(reader.read(), timeout=5)
    except ConnectionResetError:
        received = b""
    writer.close()
    assert received == b""
    assert (await _ledger(session, base_url))["charges"] == 1


async def test_gzip_sends_raw_compressed_json(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{base_url}/v1/orders/pay", headers={"X-Sample-Gzip": "1"}, json=PAYMENT
    ) as response:
        assert response.status == 201
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Vary"] == "Accept-Encoding"
        raw = await response.read()
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["order_id"] == "order-1"


async def test_delay_answers_late_but_charges_first(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    async with session.post(
        f"{base_url}/v1/orders/pay", params={"delay": "0.3"}, json=PAYMENT
    ) as response:
        assert response.status == 201
    assert time.monotonic() - started >= 0.3

    with pytest.raises(TimeoutError):
        async with session.post(
            f"{base_url}/v1/orders/pay",
            headers={"X-Sample-Delay": "2"},
            json=PAYMENT,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ):
            pass
    # The client gave up, but the slow base_url had already charged.
    assert (await _ledger(session, base_url))["charges"] == 2


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"amount": 100, "currency": "EUR"}',
        b'{"order_id": "o", "amount": 0, "currency": "EUR"}',
        b'{"order_id": "o", "amount": 1.5, "currency": "EUR"}',
        b'{"order_id": "o", "amount": "100", "currency": "EUR"}',
        b'{"order_id": "o", "amount": 100, "currency": "EURO"}',
        b'{"order_id": true, "amount": 100, "currency": "EUR"}',
    ],
)
async def test_bad_body_is_400_without_charge(
    base_url: str, session: aiohttp.ClientSession, body: bytes
) -> None:
    async with session.post(
        f"{base_url}/v1/orders/pay", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        assert "error" in await response.json()
    ledger = await _ledger(session, base_url)
    assert ledger["charges"] == 0
    assert ledger["requests_seen"] == 1


async def test_bad_fault_value_is_400_without_charge(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        f"{base_url}/v1/orders/pay", params={"drop": "sometimes"}, json=PAYMENT
    ) as response:
        assert response.status == 400
    assert (await _ledger(session, base_url))["charges"] == 0


async def test_reset_empties_the_ledger(base_url: str, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{base_url}/v1/orders/pay", json=PAYMENT) as response:
        before = await response.json()
    async with session.post(f"{base_url}/v1/ledger/reset") as response:
        assert response.status == 204
    ledger = await _ledger(session, base_url)
    assert ledger["charges"] == 0
    assert ledger["orders"] == {}
    assert ledger["requests_seen"] == 0
    async with session.post(f"{base_url}/v1/orders/pay", json=PAYMENT) as response:
        after = await response.json()
    # Charge ids never repeat, so a stale replay cannot pass for a fresh charge.
    assert int(after["charge_id"][3:]) > int(before["charge_id"][3:])


async def test_echo_returns_body_or_headers(base_url: str, session: aiohttp.ClientSession) -> None:
    payload = bytes(range(256))
    async with session.post(f"{base_url}/v1/echo", data=payload) as response:
        assert response.status == 200
        assert await response.read() == payload
    async with session.post(
        f"{base_url}/v1/echo", params={"headers": "1"}, headers={"X-Custom": "yes"}, data=b"x"
    ) as response:
        received = await response.json()
    assert received["x-custom"] == "yes"
    assert json.loads(response.headers["X-Echo-Headers"]) == received
    assert (await _ledger(session, base_url))["requests_seen"] == 0


async def test_big_and_stream(base_url: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{base_url}/v1/big", params={"size": "100000"}) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        assert await response.read() == b"a" * 100_000
    async with session.get(f"{base_url}/v1/stream", params={"chunks": "4"}) as response:
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert await response.read() == b"".join(b"chunk %d\n" % i for i in range(4))


def test_stderr_holds_only_the_start_message(sample_backend_server: _CleanBackend) -> None:
    # Last in the module: drops, rejects and delays above must not have logged anything
    # (stdout included: the backend writes no access log).
    lines = sample_backend_server.output()
    assert len(lines) == 1
    message = json.loads(lines[0])
    assert message["event"] == "sample_backend.started"
    assert message["port"] == sample_backend_server.port


async def test_order_status_answers_from_the_ledger(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{base_url}/v1/orders/status-1/status") as response:
        assert response.status == 404
    order = {"order_id": "status-1", "amount": 7, "currency": "EUR"}
    async with session.post(f"{base_url}/v1/orders/pay", json=order) as response:
        charged = await response.json()
    async with session.get(f"{base_url}/v1/orders/status-1/status") as response:
        assert response.status == 200
        assert await response.json() == charged
    async with session.get(f"{base_url}/v1/orders/status-1/status?reject=503") as response:
        assert response.status == 503
    async with session.get(f"{base_url}/v1/orders/status-1") as response:
        assert (await response.json())["status_checks"] == 3


# --------------------------------------------------------------------------- SOAP


@pytest.mark.parametrize(
    ("soap12", "content_type"),
    [(False, "text/xml; charset=utf-8"), (True, "application/soap+xml; charset=utf-8")],
    ids=["soap11", "soap12"],
)
async def test_soap_payments_charge_every_time_in_the_same_ledger(
    base_url: str, session: aiohttp.ClientSession, soap12: bool, content_type: str
) -> None:
    from sample_backend.soap import SOAP11_NS, SOAP12_NS, pay_envelope

    for _ in range(2):
        async with session.post(
            f"{base_url}/soap/payments",
            data=pay_envelope("soap-1", 1250, soap12=soap12),
            headers={"Content-Type": content_type},
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == content_type
            body = await response.read()
            assert (SOAP12_NS if soap12 else SOAP11_NS).encode() in body
            assert b"<p:OrderId>soap-1</p:OrderId>" in body
    ledger = await _ledger(session, base_url)
    assert ledger["orders"] == {"soap-1": 2}
    assert ledger["balances"] == {"EUR": -2500}


@pytest.mark.parametrize(
    ("body", "status", "marker"),
    [
        pytest.param(b"<not-xml", 500, b"soap:Client", id="malformed"),
        pytest.param(
            b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>',
            500,
            b"soap:Client",
            id="external-entity",
        ),
        pytest.param(None, 400, b"soap:Sender", id="soap12-bad-amount"),
    ],
)
async def test_unusable_soap_requests_are_faults_and_charge_nothing(
    base_url: str,
    session: aiohttp.ClientSession,
    body: bytes | None,
    status: int,
    marker: bytes,
) -> None:
    from sample_backend.soap import pay_envelope

    if body is None:
        body = pay_envelope("soap-2", 1, soap12=True).replace(b">1<", b">one<")
    async with session.post(
        f"{base_url}/soap/payments", data=body, headers={"Content-Type": "text/xml"}
    ) as response:
        assert response.status == status
        content = await response.read()
        assert marker in content
        assert b"root:" not in content
    assert (await _ledger(session, base_url))["charges"] == 0
