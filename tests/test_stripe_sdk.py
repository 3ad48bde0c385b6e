"""The official Stripe SDK through the proxy with the `stripe` error format.

A small Stripe-shaped backend on 127.0.0.1 (form-encoded `POST /v1/charges`, a charge
object back, a call counter) stands behind an in-process proxy. The SDK talks only to
the proxy. With the preset, a reused key raises the SDK's `IdempotencyError`, and an
in-flight duplicate is retried by the SDK itself until it gets the stored charge;
with RFC 9457 problems the SDK cannot read the answer (the defect the preset fixes).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from inprocess import serve_on_uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.app import ProxyApp
from proxy.config import Settings

stripe = pytest.importorskip("stripe")

SLOW_SECONDS = 1.5


class StripeShaped:
    """`POST /v1/charges`: counts calls; `description=slow` takes SLOW_SECONDS."""

    def __init__(self) -> None:
        self.calls = 0
        self._ids = itertools.count(1)

    async def charges(self, request: Request) -> Response:
        self.calls += 1
        form = await request.form()
        if form.get("description") == "slow":
            await asyncio.sleep(SLOW_SECONDS)
        charge = {
            "id": f"ch_{next(self._ids)}",
            "object": "charge",
            "amount": int(str(form.get("amount", "0"))),
            "currency": form.get("currency"),
        }
        return Response(orjson.dumps(charge), media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/charges", self.charges, methods=["POST"])])


@asynccontextmanager
async def _stack(error_format: str) -> AsyncIterator[tuple[StripeShaped, Any]]:
    backend = StripeShaped()
    async with serve_on_uvicorn(backend.app()) as upstream:
        settings = Settings.model_validate(
            {
                "upstream": upstream,
                "admin": {"enabled": False},
                "defaults": {"error_format": error_format},
                "routes": [{"name": "charges", "path": "/v1/charges"}],
            }
        )
        async with serve_on_uvicorn(ProxyApp(settings)) as url:
            client = stripe.StripeClient(
                "sk_test_proxy",
                base_addresses={"api": url},
                max_network_retries=4,
                http_client=stripe.RequestsClient(proxy=None),
            )
            yield backend, client


def _create(client: Any, key: str, amount: int, description: str = "") -> Any:
    params: dict[str, Any] = {"amount": amount, "currency": "eur"}
    if description:
        params["description"] = description
    return client.v1.charges.create(params=params, options={"idempotency_key": key})


async def test_a_reused_key_raises_the_sdks_idempotency_error() -> None:
    async with _stack("stripe") as (backend, client):
        key = f"order-{uuid.uuid4().hex}"
        charge = await asyncio.to_thread(_create, client, key, 100)
        assert charge.id == "ch_1"
        with pytest.raises(stripe.IdempotencyError) as caught:
            await asyncio.to_thread(_create, client, key, 200)
    assert caught.value.http_status == 400
    assert caught.value.error.type == "idempotency_error"
    assert caught.value.error.code == "key-reused"
    assert caught.value.request_id  # X-Request-Id: the proxy's log line for this answer
    assert backend.calls == 1


async def test_problem_documents_are_unreadable_for_the_sdk() -> None:
    # Why the preset exists: the default format reaches the SDK as a bare APIError.
    async with _stack("problem") as (backend, client):
        key = f"order-{uuid.uuid4().hex}"
        await asyncio.to_thread(_create, client, key, 100)
        with pytest.raises(stripe.APIError) as caught:
            await asyncio.to_thread(_create, client, key, 200)
    assert not isinstance(caught.value, stripe.IdempotencyError)
    assert backend.calls == 1


async def test_the_sdk_retries_an_in_flight_duplicate_and_gets_the_stored_charge() -> None:
    async with _stack("stripe") as (backend, client):
        key = f"order-{uuid.uuid4().hex}"
        first = asyncio.create_task(asyncio.to_thread(_create, client, key, 300, "slow"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        duplicate = await asyncio.to_thread(_create, client, key, 300, "slow")
        waited = time.monotonic() - started
        original = await first
    # The duplicate met the first in flight (409, retried by the SDK), then got its replay.
    assert duplicate.id == original.id == "ch_1"
    assert waited >= SLOW_SECONDS - 0.3 - 0.1
    assert backend.calls == 1
