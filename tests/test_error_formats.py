"""The proxy's own answers in each error format, and the request id on every one of them.

Each problem type the proxy can answer is provoked for real (sample backend faults,
tiny limits, a dead store or upstream) through an in-process proxy, once per format:
RFC 9457 problems, the Stripe preset and a legacy `{code, message}` template.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from harness import BackendServer, free_port
from inprocess import serve_on_uvicorn

from proxy.app import ProxyApp
from proxy.config import ConfigError, Settings
from proxy.routes import RouteTable

JSON = {"content-type": "application/json"}
SECRET_KEY = "secret-key-7f3a"

LEGACY = {
    "content_type": "application/vnd.legacy+json",
    "body": {
        "code": "{code}",
        "message": "{detail}",
        "status": "{status}",
        "retry": "{retry_after}",
        "id": "{request_id}",
    },
    "status": {"key-reused": 400},
    "code": {"key-reused": "DUPLICATE_KEY", "*": "PROXY_ERROR"},
}


def _config(upstream: str, error_format: str, **top: Any) -> dict[str, Any]:
    return {
        "upstream": upstream,
        "admin": {"enabled": False},
        "tenant": {"header": "X-Tenant-Id"},
        "max_header_bytes": "8KiB",
        "error_formats": {"legacy": LEGACY},
        "defaults": {"error_format": error_format, "max_body_read_time": "300ms"},
        "routes": [
            {
                "name": "pay",
                "path": "/v1/orders/pay",
                "key": {"from": "json", "field": "order_id"},
                "max_request_body": "1KiB",
            },
            {"name": "charges", "path": "/v1/charges"},
            {"name": "echo", "path": "/v1/echo", "max_stored_response": 4},
        ],
        **top,
    }


@asynccontextmanager
async def _proxy(config: dict[str, Any]) -> AsyncIterator[tuple[str, ProxyApp]]:
    app = ProxyApp(Settings.model_validate(config))
    async with serve_on_uvicorn(app) as url:
        yield url, app


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _key() -> dict[str, str]:
    return {"idempotency-key": f"{SECRET_KEY}-{uuid.uuid4().hex}"}


def _charge(amount: int = 100) -> bytes:
    return orjson.dumps({"amount": amount, "currency": "EUR"})


Scenario = Callable[[httpx.AsyncClient, str], Any]


async def _key_missing(http: httpx.AsyncClient, url: str) -> httpx.Response:
    return await http.post(url + "/v1/charges", content=_charge(), headers=JSON)


async def _key_invalid(http: httpx.AsyncClient, url: str) -> httpx.Response:
    headers = [("content-type", "application/json")]
    headers += [("idempotency-key", SECRET_KEY), ("idempotency-key", SECRET_KEY + "2")]
    return await http.post(url + "/v1/charges", content=_charge(), headers=headers)


async def _key_reused(http: httpx.AsyncClient, url: str) -> httpx.Response:
    key = _key()
    first = await http.post(url + "/v1/charges", content=_charge(100), headers={**JSON, **key})
    assert first.status_code == 201
    return await http.post(url + "/v1/charges", content=_charge(200), headers={**JSON, **key})


async def _in_progress(http: httpx.AsyncClient, url: str) -> httpx.Response:
    headers = {**JSON, **_key(), "x-sample-delay": "1"}
    first = asyncio.create_task(http.post(url + "/v1/charges", content=_charge(), headers=headers))
    await asyncio.sleep(0.3)
    duplicate = await http.post(url + "/v1/charges", content=_charge(), headers=headers)
    assert (await first).status_code == 201
    return duplicate


async def _body_too_large(http: httpx.AsyncClient, url: str) -> httpx.Response:
    body = orjson.dumps({"order_id": SECRET_KEY, "pad": "x" * 2000})
    return await http.post(url + "/v1/orders/pay", content=body, headers=JSON)


async def _body_invalid(http: httpx.AsyncClient, url: str) -> httpx.Response:
    return await http.post(url + "/v1/orders/pay", content=b'{"order_id": "x', headers=JSON)


async def _unsupported_media_type(http: httpx.AsyncClient, url: str) -> httpx.Response:
    headers = {"content-type": "text/plain"}
    return await http.post(url + "/v1/orders/pay", content=SECRET_KEY.encode(), headers=headers)


async def _tenant_invalid(http: httpx.AsyncClient, url: str) -> httpx.Response:
    headers = [("content-type", "application/json"), ("x-tenant-id", "a"), ("x-tenant-id", "b")]
    headers += list(_key().items())
    return await http.post(url + "/v1/charges", content=_charge(), headers=headers)


async def _headers_too_large(http: httpx.AsyncClient, url: str) -> httpx.Response:
    return await http.post(url + "/v1/charges", content=_charge(), headers={"x-pad": "p" * 9000})


async def _outcome_unknown(http: httpx.AsyncClient, url: str) -> httpx.Response:
    headers = {**JSON, **_key(), "x-sample-drop": "after"}
    return await http.post(url + "/v1/charges", content=_charge(), headers=headers)


async def _replay_unavailable(http: httpx.AsyncClient, url: str) -> httpx.Response:
    headers = {**_key(), "content-type": "text/plain"}
    first = await http.post(url + "/v1/echo", content=b"longer than four bytes", headers=headers)
    assert first.status_code == 200
    return await http.post(url + "/v1/echo", content=b"longer than four bytes", headers=headers)


async def _upstream_failed(http: httpx.AsyncClient, url: str) -> httpx.Response:
    # PUT is on no route: pass-through traffic whose backend drops the connection.
    return await http.put(url + "/v1/echo", content=b"x", headers={"x-sample-drop": "before"})


async def _target_invalid(http: httpx.AsyncClient, url: str) -> httpx.Response:
    return await _raw(url, b"POST * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n")


async def _raw(url: str, head: bytes) -> httpx.Response:
    # Asterisk-form: only a raw socket sends it as written.
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"Connection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


# name -> (scenario, the problem's own status)
BACKEND_SCENARIOS: dict[str, tuple[Scenario, int]] = {
    "key-missing": (_key_missing, 400),
    "key-invalid": (_key_invalid, 400),
    "key-reused": (_key_reused, 422),
    "request-in-progress": (_in_progress, 409),
    "body-too-large": (_body_too_large, 413),
    "body-invalid": (_body_invalid, 400),
    "unsupported-media-type": (_unsupported_media_type, 415),
    "tenant-invalid": (_tenant_invalid, 400),
    "headers-too-large": (_headers_too_large, 431),
    "outcome-unknown": (_outcome_unknown, 502),
    "replay-unavailable": (_replay_unavailable, 409),
    "upstream-failed": (_upstream_failed, 502),
    "target-invalid": (_target_invalid, 400),
}
RETRY_AFTER = {"request-in-progress", "store-unavailable"}
STRIPE_400 = {"key-reused", "body-too-large", "headers-too-large", "unsupported-media-type"}
STRIPE_IDEMPOTENCY = {"key-reused", "request-in-progress"}
STRIPE_INVALID_REQUEST = {
    "key-missing",
    "key-invalid",
    "tenant-invalid",
    "body-too-large",
    "body-invalid",
    "body-timeout",
    "unsupported-media-type",
    "headers-too-large",
    "target-invalid",
}


def _check(fmt: str, name: str, own_status: int, response: httpx.Response) -> None:
    """What every format promises, then the format's own shape."""
    assert response.headers["cache-control"] == "no-store"
    request_id = response.headers["x-request-id"]
    assert request_id
    assert int(response.headers["content-length"]) == len(response.content)
    assert SECRET_KEY.encode() not in response.content
    if name in RETRY_AFTER:
        assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    if fmt == "problem":
        assert response.status_code == own_status
        assert response.headers["content-type"] == "application/problem+json"
        assert body["type"].endswith("/" + name)
        assert body["status"] == own_status
    elif fmt == "stripe":
        status = 400 if name in STRIPE_400 else own_status
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        error = body["error"]
        assert error["code"] == name
        assert error["request_id"] == request_id
        assert response.headers["request-id"] == request_id  # where the SDK reads it
        assert error["message"]
        if name in STRIPE_IDEMPOTENCY:
            assert error["type"] == "idempotency_error"
        elif name in STRIPE_INVALID_REQUEST:
            assert error["type"] == "invalid_request_error"
        else:
            assert error["type"] == "api_error"
        if name in ("outcome-unknown", "replay-unavailable"):
            assert response.headers["stripe-should-retry"] == "false"
    elif fmt == "gocardless":
        status = 409 if name == "key-reused" else own_status
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        error = body["error"]
        assert error["code"] == status
        assert error["errors"][0]["reason"] == name
        assert error["request_id"] == request_id
        assert error["documentation_url"].endswith("/" + name)
        if name in ("key-reused", "request-in-progress", "replay-unavailable"):
            assert error["type"] == "invalid_state"
        elif name in STRIPE_INVALID_REQUEST:
            assert error["type"] == "invalid_api_usage"
        else:
            assert error["type"] == "gocardless"
    else:
        status = 400 if name == "key-reused" else own_status
        assert response.status_code == status
        assert response.headers["content-type"] == "application/vnd.legacy+json"
        assert body["code"] == ("DUPLICATE_KEY" if name == "key-reused" else "PROXY_ERROR")
        assert body["status"] == status
        assert body["id"] == request_id
        assert body["retry"] == (
            int(response.headers["retry-after"]) if name in RETRY_AFTER else None
        )
        assert isinstance(body["message"], str) and body["message"]


@pytest.mark.parametrize("fmt", ["problem", "stripe", "gocardless", "legacy"])
async def test_every_problem_type_in_each_format(
    fmt: str, backend: BackendServer, client: httpx.AsyncClient
) -> None:
    async with _proxy(_config(backend.url, fmt)) as (url, _):
        for name, (scenario, own_status) in BACKEND_SCENARIOS.items():
            response = await scenario(client, url)
            try:
                _check(fmt, name, own_status, response)
            except (AssertionError, KeyError) as exc:
                raise AssertionError(
                    f"{fmt}/{name}: {response.status_code} {response.headers} {response.text}"
                ) from exc

    async with _proxy(_config(_dead_url(), fmt)) as (url, _):
        response = await client.post(url + "/v1/charges", content=_charge(), headers=_key())
        _check(fmt, "upstream-unreachable", 502, response)

    dead_store = {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "200ms", "retries": 0}
    async with _proxy(_config(backend.url, fmt, store=dead_store)) as (url, _):
        response = await client.post(url + "/v1/charges", content=_charge(), headers=_key())
        _check(fmt, "store-unavailable", 503, response)


async def test_a_template_keeps_the_replay_marker_on_an_unknown_outcome(
    backend: BackendServer, client: httpx.AsyncClient
) -> None:
    async with _proxy(_config(backend.url, "stripe")) as (url, _):
        key = _key()
        headers = {**JSON, **key, "x-sample-drop": "after"}
        first = await client.post(url + "/v1/charges", content=_charge(), headers=headers)
        duplicate = await client.post(url + "/v1/charges", content=_charge(), headers=headers)
    assert first.status_code == duplicate.status_code == 502
    assert duplicate.headers["idempotent-replayed"] == "true"
    assert duplicate.json()["error"]["code"] == "outcome-unknown"


async def test_detail_is_json_escaped_and_a_route_may_differ_from_the_default(
    backend: BackendServer, client: httpx.AsyncClient
) -> None:
    config = _config(backend.url, "problem")
    config["error_formats"]["text"] = {"body": '{"msg": "say \\"{title}\\" ({type})"}'}
    config["routes"][1]["error_format"] = "text"
    async with _proxy(config) as (url, _):
        on_route = await client.post(url + "/v1/charges", content=_charge(), headers=JSON)
        other = await client.post(url + "/v1/orders/pay", content=b"{", headers=JSON)
    assert on_route.status_code == 400
    assert on_route.json() == {
        "msg": 'say "This endpoint requires an idempotency key" (key-missing)'
    }
    assert other.headers["content-type"] == "application/problem+json"


# --------------------------------------------------------------------------- request ids


async def test_request_id_is_kept_when_valid_replaced_when_not_and_forwarded(
    backend: BackendServer, client: httpx.AsyncClient
) -> None:
    async with _proxy(_config(backend.url, "problem")) as (url, _):
        # A proxy-made answer carries the client's id.
        mine = await client.post(
            url + "/v1/charges", content=b"{}", headers={"x-request-id": "r-1"}
        )
        assert mine.headers["x-request-id"] == "r-1"
        # Invalid ids (control bytes, too long) are replaced by a generated one.
        for bad in ("a\tb", "x" * 129):
            other = await client.post(
                url + "/v1/charges", content=b"{}", headers={"x-request-id": bad}
            )
            assert other.headers["x-request-id"] not in ("", bad)
        # Forwarded: the backend sees the client's id, or a generated one.
        for sent, expected in ((["r-2"], "r-2"), ([], None), (["bad\tid"], None)):
            headers = [("x-request-id", v) for v in sent] + list(_key().items())
            echoed = await client.post(url + "/v1/echo?headers=1", content=b"", headers=headers)
            received = echoed.json()["x-request-id"]
            assert received == expected if expected else received not in ("", "bad\tid")
            # Pass-through traffic too.
            passed = await client.get(url + "/v1/echo?headers=1", headers=headers[:-1])
            received = passed.json()["x-request-id"]
            assert received == expected if expected else received not in ("", "bad\tid")


async def test_the_answer_to_options_asterisk_carries_the_request_id(
    backend: BackendServer,
) -> None:
    async with _proxy(_config(backend.url, "problem")) as (url, _):
        mine = await _raw(url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nX-Request-Id: r-9\r\n")
        generated = await _raw(url, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n")
    assert mine.status_code == generated.status_code == 204
    assert mine.headers.get_list("x-request-id") == ["r-9"]
    assert generated.headers["x-request-id"]


async def test_a_replay_carries_the_current_request_id_never_the_original(
    backend: BackendServer, client: httpx.AsyncClient
) -> None:
    async with _proxy(_config(backend.url, "problem")) as (url, _):
        key = _key()
        headers = {**JSON, **key}
        first = await client.post(
            url + "/v1/charges", content=_charge(), headers={**headers, "x-request-id": "orig"}
        )
        replay = await client.post(
            url + "/v1/charges", content=_charge(), headers={**headers, "x-request-id": "again"}
        )
    assert first.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers.get_list("x-request-id") == ["again"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("template", "route_format", "message"),
    [
        (
            {"body": {"m": "{detial}"}},
            "bad",
            "routes['charges'].error_format: error_formats['bad']",
        ),
        ({"body": "{not json"}, "bad", "routes['charges'].error_format: error_formats['bad']"),
        (
            {"body": {"m": "x"}, "status": {"key-reuse": 400}},
            "bad",
            "routes['charges'].error_format: error_formats['bad']: status: 'key-reuse'",
        ),
        (
            {"body": {"m": "x"}, "headers": {"*": {"Content-Length": "1"}}},
            "bad",
            "routes['charges'].error_format",
        ),
        ({"body": {"m": "x"}}, "nope", "routes['charges'].error_format: unknown format 'nope'"),
        (
            {"body": {"m": 2**64}},
            "bad",
            "routes['charges'].error_format: error_formats['bad']: integers",
        ),
        (
            {"body": {"m": "x"}, "status": {"key-missing": 204}},
            "bad",
            "routes['charges'].error_format: error_formats['bad']: status: 204",
        ),
        (
            {"body": {"m": "x"}, "status": {"*": 304}},
            "bad",
            "routes['charges'].error_format: error_formats['bad']: status: 304",
        ),
    ],
)
def test_a_bad_format_is_one_line_naming_the_route(
    template: dict[str, Any], route_format: str, message: str
) -> None:
    config = _config("http://127.0.0.1:1", "problem")
    config["error_formats"]["bad"] = template
    config["routes"][1]["error_format"] = route_format
    with pytest.raises(ConfigError) as caught:
        RouteTable(Settings.model_validate(config))
    text = str(caught.value)
    assert text.startswith(message), text
    assert "\n" not in text


async def test_template_header_values_never_carry_control_bytes_or_none(
    backend: BackendServer, client: httpx.AsyncClient
) -> None:
    # A careless `code` (a pasted CR LF) must not split the header nor drop the answer,
    # and a placeholder without a value is an empty header, not Python's "None".
    config = _config(backend.url, "bad")
    config["error_formats"]["bad"] = {
        "body": {"c": "{code}"},
        "code": {"*": "E1\r\nSet-Cookie: s=1"},
        "headers": {"*": {"X-Code": "{code}", "X-Retry": "{retry_after}"}},
    }
    async with _proxy(config) as (url, _):
        answer = await client.post(url + "/v1/charges", content=_charge(), headers=JSON)
    assert answer.status_code == 400
    assert "set-cookie" not in answer.headers
    assert answer.headers["x-code"] == "E1??Set-Cookie: s=1"
    assert answer.headers["x-retry"] == ""
    assert answer.json() == {"c": "E1\r\nSet-Cookie: s=1"}


def test_a_bad_default_format_names_the_defaults() -> None:
    config = _config("http://127.0.0.1:1", "strpe")
    with pytest.raises(ConfigError, match=r"^defaults\.error_format: unknown format 'strpe'"):
        RouteTable(Settings.model_validate(config))


def test_an_unused_bad_template_still_stops_start_up() -> None:
    config = _config("http://127.0.0.1:1", "problem")
    config["error_formats"]["bad"] = {"body": {"m": "{nope}"}}
    with pytest.raises(ConfigError, match=r"^error_formats\['bad'\]: unknown placeholder"):
        RouteTable(Settings.model_validate(config))


async def test_a_generated_request_id_leads_to_the_one_log_line(
    backend: BackendServer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="idempotency_proxy.requests")
    async with _proxy(_config(backend.url, "stripe")) as (url, _):
        response = await _key_reused(client, url)
    assert response.status_code == 400
    request_id = response.headers["x-request-id"]
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    assert len(lines) == 1
    assert getattr(lines[0], "outcome", None) == "key_reused"
    assert getattr(lines[0], "status", None) == 400


@pytest.mark.parametrize(
    ("preset", "client_error"),
    [("stripe", "invalid_request_error"), ("gocardless", "invalid_api_usage")],
)
@pytest.mark.parametrize("name", ["target-invalid", "request-invalid", "tenant-invalid"])
def test_presets_class_a_bad_request_as_the_clients_error(
    preset: str, client_error: str, name: str
) -> None:
    """A 400 the client caused must not read as the API's own failure (`api_error`), which
    SDKs treat as retryable server trouble."""
    from proxy.errorformat import PRESETS
    from proxy.problems import Problem

    _, _, body = PRESETS[preset]().render(Problem(name, 400, "x"), [], b"rid")
    assert body is not None
    assert orjson.loads(body)["error"]["type"] == client_error
