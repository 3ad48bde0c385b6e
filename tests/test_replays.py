"""What a replay carries: the first answer's status, headers and body, framed for this
response, and never what belongs to the first exchange alone (cookies, its request id, a
second Date); answers the proxy cannot replay get 409 `replay-unavailable`.

A raw upstream (tests/rawhttp.py) sends the exact bytes these rows need: a 204 without
Content-Length, a chunked answer, a 64 KiB answer.
"""

from __future__ import annotations

import uuid

import httpx
from harness import HOST, BackendServer, ProxyFactory, charges_route
from rawhttp import raw_request, values


def new_key() -> str:
    return f"replay-{uuid.uuid4().hex[:16]}"


async def test_replay_never_carries_set_cookie_request_id_or_a_second_date(
    proxy_factory: ProxyFactory, ledger_backend: BackendServer, client: httpx.AsyncClient
) -> None:
    # An operator lists headers the contract forbids in replays; the replay must still
    # carry none of them, exactly one Date and a Content-Length equal to the body.
    route = charges_route(
        replay_headers=["Set-Cookie", "X-Request-Id", "Date", "Content-Length", "Connection"]
    )
    proxy = proxy_factory(ledger_backend.url, config={"admin": {"host": HOST}, "routes": [route]})
    headers = {"Idempotency-Key": new_key(), "Content-Type": "application/json"}
    body = b'{"amount": 100, "currency": "EUR"}'
    first = await client.post(proxy.url + "/v1/charges", content=body, headers=headers)
    assert first.status_code == 201, first.text
    assert "set-cookie" in first.headers  # the first client gets the backend's answer
    replay = await client.post(
        proxy.url + "/v1/charges", content=body, headers={**headers, "X-Request-Id": "retry-2"}
    )
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert "set-cookie" not in replay.headers
    # Only the current request's id, never the stored (original) one.
    assert replay.headers.get_list("x-request-id") == ["retry-2"]
    assert len(replay.headers.get_list("date")) == 1
    assert replay.headers.get_list("content-length") == [str(len(replay.content))]
    assert replay.headers["location"] == first.headers["location"]
    assert ledger_backend.ledger()["charges"] == 1


async def test_replay_of_204_carries_no_content_length(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    # RFC 9110 §8.6: a server must not send Content-Length in a 204.
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}})
    headers = [(b"idempotency-key", new_key().encode()), (b"content-type", b"text/plain")]
    first = await raw_request(proxy.url, "POST", b"/no-content", headers, b"x")
    replay = await raw_request(proxy.url, "POST", b"/no-content", headers, b"x")
    assert first[0] == replay[0] == 204
    assert values(replay[1], b"idempotent-replayed") == [b"true"]
    assert values(replay[1], b"etag") == [b'"n"']
    assert not values(first[1], b"content-length")
    assert not values(replay[1], b"content-length")
    assert len(values(replay[1], b"date")) == 1


async def test_chunked_backend_answer_is_replayed_with_its_length(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}})
    headers = [(b"idempotency-key", new_key().encode()), (b"content-type", b"text/plain")]
    first = await raw_request(proxy.url, "POST", b"/chunked", headers, b"x")
    replay = await raw_request(proxy.url, "POST", b"/chunked", headers, b"x")
    assert first[0] == replay[0] == 201
    assert first[2] == replay[2] == b"0123456789" * 10
    assert values(replay[1], b"content-length") == [b"100"]
    assert not values(replay[1], b"transfer-encoding")


# ---------------------------------------------------- release statuses and the stored cap


async def test_release_status_with_a_response_over_the_stored_cap(
    proxy_factory: ProxyFactory, raw_upstream: str
) -> None:
    route = {
        "name": "big",
        "path": "/big-{status}",
        "max_stored_response": "1KiB",
        "release_statuses": [429],
    }
    proxy = proxy_factory(raw_upstream, config={"admin": {"host": HOST}, "routes": [route]})
    headers = [(b"idempotency-key", new_key().encode())]
    for _ in range(2):  # released: each try executes and gets the whole answer
        status, got, body = await raw_request(proxy.url, "POST", b"/big-429", headers)
        assert (status, len(body)) == (429, 65536)
        assert not values(got, b"idempotent-replayed")
    # Not released and over the cap: the first gets it all, a duplicate 409.
    headers = [(b"idempotency-key", new_key().encode())]
    status, _, body = await raw_request(proxy.url, "POST", b"/big-201", headers)
    assert (status, len(body)) == (201, 65536)
    status, got, body = await raw_request(proxy.url, "POST", b"/big-201", headers)
    assert status == 409
    assert b"/problems/replay-unavailable" in body
