"""HTTP API of the sample payment backend, deliberately NOT idempotent.

Every POST to a charge endpoint charges again, so any retry that reaches this backend shows up in
the ledger as a double charge. That is the whole point: it is the backend the idempotency proxy
has to protect, and the witness that tells whether it did.

=================================  ==============================================================
``POST /v1/orders/pay``            ``{order_id, amount, currency}``: charge, 201
``POST /v1/charges``               ``{amount, currency, order_id?, description?}``: charge, 201
``POST /soap/payments``            SOAP 1.1/1.2 ``Pay`` envelope: charge, 200 (faults: 500/400)
``GET /v1/charges/{charge_id}``    one charge, or 404
``GET /v1/orders/{order_id}``      ``{order_id, charges, times_charged}``, 200 even if none
``GET /v1/ledger``                 totals, per-order counts, double charges, ``requests_seen``
``POST /v1/ledger/reset``          empty the ledger, 204
``GET /healthz``                   ``{"ok": true}``
``POST /v1/echo``                  the request body back (``?headers=1``: the received headers)
``GET /v1/big?size=N``             N bytes of ``a``
``GET /v1/stream?chunks=N``        N chunks, streamed (``&interval=S``, ``&size=B`` optional)
=================================  ==============================================================

The faults of :mod:`sample_backend.faults` apply to the charge endpoints and to the echo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sample_backend.faults import RAW_SEND_KEY, FaultError, Faults, error_response
from sample_backend.ledger import Ledger, OrderId
from sample_backend.soap import SoapFault, fault_response, parse_pay, pay_response

JSON = "application/json"
MAX_AMOUNT = 10**12
"""Largest amount in minor units; keeps sums far from SQLite's 64-bit limit."""
MAX_ORDER_ID_LENGTH = 255
MAX_BIG_SIZE = 256 * 1024 * 1024
MAX_STREAM_CHUNKS = 100_000
MAX_ECHO_HEADER = 4096
"""``X-Echo-Headers`` is left out above this size so clients' header limits are not hit."""


class InvalidRequest(ValueError):
    """The charge request body is unusable; answered with 400 and no charge."""


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type=JSON)


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("body must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


def _order_id(data: dict[str, Any], *, required: bool) -> OrderId | None:
    value = data.get("order_id")
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidRequest("order_id must be a string or an integer")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise InvalidRequest("order_id is out of range")
    if isinstance(value, str) and not 0 < len(value) <= MAX_ORDER_ID_LENGTH:
        raise InvalidRequest(f"order_id must be 1 to {MAX_ORDER_ID_LENGTH} characters")
    return value


def _amount(data: dict[str, Any]) -> int:
    value = data.get("amount")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("amount must be an integer number of minor units")
    if not 0 < value <= MAX_AMOUNT:
        raise InvalidRequest(f"amount must be between 1 and {MAX_AMOUNT}")
    return value


def _currency(data: dict[str, Any]) -> str:
    value = data.get("currency")
    if not isinstance(value, str) or len(value) != 3 or not (value.isascii() and value.isalpha()):
        raise InvalidRequest("currency must be a 3-letter code such as EUR")
    return value.upper()


def _description(data: dict[str, Any]) -> str | None:
    value = data.get("description")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("description must be a string")
    return value


def _int_param(request: Request, name: str, default: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer") from None
    if not 0 <= value <= maximum:
        raise HTTPException(400, f"{name} must be between 0 and {maximum}")
    return value


def _float_param(request: Request, name: str) -> float:
    raw = request.query_params.get(name, "0")
    try:
        value = float(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number") from None
    if not 0 <= value <= 60:
        raise HTTPException(400, f"{name} must be between 0 and 60")
    return value


def _received_headers(scope: Scope) -> dict[str, str]:
    """Return the request headers as received, repeated names joined with ', '."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class _Api:
    """The endpoints, sharing one ledger."""

    def __init__(self, ledger: Ledger, default_delay: float) -> None:
        self.ledger = ledger
        self.default_delay = default_delay
        # Status-check requests per order (in memory: what tests count, not business data).
        self.status_checks: dict[str, int] = {}

    async def _begin(self, request: Request) -> tuple[bytes, Faults] | Response:
        """What every charging endpoint does first: count the request, read its body, and
        apply the faults asked for before any work (an early answer ends the request)."""
        self.ledger.note_request()
        body = await request.body()
        try:
            faults = Faults.from_request(request, default_delay=self.default_delay)
        except FaultError as exc:
            return error_response(400, "invalid_fault", str(exc))
        early = await faults.before_work()
        if early is not None:
            return early
        return body, faults

    async def _charge(self, request: Request, *, order_required: bool) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        body, faults = begun
        try:
            data = _load_object(body)
            order_id = _order_id(data, required=order_required)
            amount = _amount(data)
            currency = _currency(data)
            description = _description(data)
        except InvalidRequest as exc:
            return error_response(400, "invalid_request", str(exc))
        charge = self.ledger.charge(
            amount=amount, currency=currency, order_id=order_id, description=description
        )
        late = await faults.after_work()
        if late is not None:
            return late
        content = orjson.dumps(charge.to_json())
        headers = {
            "location": f"/v1/charges/{charge.charge_id}",
            "etag": f'"{hashlib.blake2b(content, digest_size=8).hexdigest()}"',
            "set-cookie": f"session={secrets.token_urlsafe(16)}; Path=/",
            "x-request-id": secrets.token_hex(16),
        }
        return faults.respond(content, 201, headers, JSON)

    async def pay_order(self, request: Request) -> Response:
        """Charge for an order: ``{order_id, amount, currency}``."""
        return await self._charge(request, order_required=True)

    async def create_charge(self, request: Request) -> Response:
        """Charge without an order: ``{amount, currency, order_id?, description?}``."""
        return await self._charge(request, order_required=False)

    async def soap_pay(self, request: Request) -> Response:
        """Charge from a SOAP ``Pay`` envelope; every call charges, like the JSON endpoint."""
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        body, faults = begun
        try:
            envelope_ns, data = parse_pay(body)
            try:
                order_id = _order_id(data, required=True)
                amount = _amount(data)
                currency = _currency(data)
            except InvalidRequest as exc:
                raise SoapFault(str(exc), envelope_ns) from None
        except SoapFault as fault:
            status, content, content_type = fault_response(fault)
            return faults.respond(content, status, {}, content_type)
        charge = self.ledger.charge(amount=amount, currency=currency, order_id=order_id)
        late = await faults.after_work()
        if late is not None:
            return late
        content, content_type = pay_response(envelope_ns, charge.to_json())
        return faults.respond(content, 200, {}, content_type)

    async def get_charge(self, request: Request) -> Response:
        charge = self.ledger.get_charge(request.path_params["charge_id"])
        if charge is None:
            return error_response(404, "not_found", "no such charge")
        return _json(charge.to_json())

    async def get_order(self, request: Request) -> Response:
        order_id: str = request.path_params["order_id"]
        charges = self.ledger.charges_for_order(order_id)
        return _json(
            {
                "order_id": order_id,
                "charges": [charge.to_json() for charge in charges],
                "times_charged": len(charges),
                "status_checks": self.status_checks.get(order_id, 0),
            }
        )

    async def order_status(self, request: Request) -> Response:
        """Was this order charged? 200 with its (first) charge, the same shape the pay
        endpoint answers, or 404 when the ledger has no charge for it: the read-only
        status check a proxy may ask about a request whose outcome it does not know.
        Faults: ``reject`` (e.g. 503, a status service that is down) and ``delay_before``."""
        order_id: str = request.path_params["order_id"]
        self.status_checks[order_id] = self.status_checks.get(order_id, 0) + 1
        try:
            faults = Faults.from_request(request, default_delay=0.0)
        except FaultError as exc:
            return error_response(400, "invalid_fault", str(exc))
        early = await faults.before_work()
        if early is not None:
            return early
        charges = self.ledger.charges_for_order(order_id)
        if not charges:
            return error_response(404, "not_found", "no charge for this order")
        return _json(charges[0].to_json())

    async def ledger_summary(self, request: Request) -> Response:
        return _json(self.ledger.summary())

    async def ledger_reset(self, request: Request) -> Response:
        self.ledger.reset()
        return Response(status_code=204)

    async def healthz(self, request: Request) -> Response:
        return _json({"ok": True})

    async def echo(self, request: Request) -> Response:
        """Answer with the request body (or, with ``?headers=1``, the received headers)."""
        body = await request.body()
        try:
            faults = Faults.from_request(request, default_delay=self.default_delay)
        except FaultError as exc:
            return error_response(400, "invalid_fault", str(exc))
        early = await faults.before_work()
        if early is not None:
            return early
        late = await faults.after_work()
        if late is not None:
            return late
        received = _received_headers(request.scope)
        headers: dict[str, str] = {}
        as_header = json.dumps(received, separators=(",", ":"), ensure_ascii=True)
        if len(as_header) <= MAX_ECHO_HEADER:
            headers["x-echo-headers"] = as_header
        if request.query_params.get("headers", "").lower() in ("1", "true", "yes"):
            return faults.respond(orjson.dumps(received), 200, headers, JSON)
        content_type = received.get("content-type", "application/octet-stream")
        return faults.respond(body, 200, headers, content_type)

    async def big(self, request: Request) -> Response:
        """Answer with ``size`` bytes of ``a``, to exercise response size caps."""
        size = _int_param(request, "size", 1024, MAX_BIG_SIZE)
        return Response(b"a" * size, media_type="text/plain")

    async def stream(self, request: Request) -> Response:
        """Stream ``chunks`` chunks, ``interval`` seconds apart, to exercise pass-through."""
        chunks = _int_param(request, "chunks", 3, MAX_STREAM_CHUNKS)
        size = _int_param(request, "size", 0, MAX_BIG_SIZE)
        interval = _float_param(request, "interval")

        async def produce() -> AsyncIterator[bytes]:
            for index in range(chunks):
                if index and interval:
                    await asyncio.sleep(interval)
                yield b"a" * size if size else f"chunk {index}\n".encode()

        return StreamingResponse(produce(), media_type="text/plain")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = error_response(exc.status_code, "http_error", exc.detail)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


class SampleBackend(Starlette):
    """Starlette app that first records the server's own ``send`` in the scope.

    Middleware wraps ``send``; only the outermost callable sees uvicorn's bound method, whose
    transport lets the ``drop`` fault close the connection without a response byte.
    """

    ledger: Ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND_KEY] = send
        await super().__call__(scope, receive, send)


def create_app(db_path: str, *, default_delay: float = 0.0) -> Starlette:
    """Build the sample backend on the SQLite ledger at ``db_path`` (``":memory:"`` allowed).

    ``default_delay`` is the post-charge delay used when a request does not ask for one.
    The ledger is reachable as ``app.state.ledger`` (and ``app.ledger``) for in-process checks.
    """
    ledger = Ledger(db_path)
    api = _Api(ledger, default_delay)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        ledger.close()

    routes = [
        Route("/v1/orders/pay", api.pay_order, methods=["POST"]),
        Route("/v1/charges", api.create_charge, methods=["POST"]),
        Route("/soap/payments", api.soap_pay, methods=["POST"]),
        Route("/v1/charges/{charge_id}", api.get_charge, methods=["GET"]),
        Route("/v1/orders/{order_id}", api.get_order, methods=["GET"]),
        Route("/v1/orders/{order_id}/status", api.order_status, methods=["GET"]),
        Route("/v1/ledger", api.ledger_summary, methods=["GET"]),
        Route("/v1/ledger/reset", api.ledger_reset, methods=["POST"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/v1/echo", api.echo, methods=["POST", "PUT", "PATCH", "DELETE", "GET"]),
        Route("/v1/big", api.big, methods=["GET"]),
        Route("/v1/stream", api.stream, methods=["GET"]),
    ]
    app = SampleBackend(
        routes=routes,
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.ledger = ledger
    app.state.ledger = ledger
    return app
