"""A store answer lost on the way back: the write happened, the proxy saw an error.

These tests run the proxy in this process so a store can lose exactly one answer
at exactly one transition. The store itself is real (memory, or Redis through
the harness's server); only the answer to the caller is dropped after the write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from harness import BackendServer, body_of, pay_config, problem_name
from inprocess import serve_on_uvicorn

from proxy.app import ProxyApp
from proxy.config import Settings, StoreSettings
from proxy.store import Store, StoreUnavailable
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore

JSON = {"content-type": "application/json"}


def fail_once(store: Store, operation: str, *, applied: bool) -> list[str]:
    """Make the next `operation` fail: after writing (`applied`: its answer was lost) or
    before (the store was down). Returns a list that empties once the failure happened."""
    original = getattr(store, operation)
    armed = [operation]

    async def failing(*args: Any) -> Any:
        if armed and not applied:
            armed.clear()
            raise StoreUnavailable("store down")
        result = await original(*args)
        if armed:
            armed.clear()
            raise StoreUnavailable("answer lost")
        return result

    setattr(store, operation, failing)
    return armed


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Callable[[], Store]:
    if request.param == "memory":
        return MemoryStore
    url = request.getfixturevalue("redis_url")
    return lambda: RedisStore(StoreSettings(url=url, timeout=5.0, canary_interval=0))


async def test_a_lost_mark_sent_answer_frees_the_key_for_the_retry(
    make_store: Callable[[], Store],
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    store = make_store()
    armed = fail_once(store, "mark_sent", applied=True)
    settings = Settings.model_validate({**pay_config(), "upstream": ledger_backend.url})
    app = ProxyApp(settings, store=store)
    order = "lost-mark-sent"
    async with serve_on_uvicorn(app) as url:
        first = await client.post(url + "/v1/orders/pay", content=body_of(order), headers=JSON)
        assert first.status_code == 503
        assert problem_name(first) == "store-unavailable"
        assert not armed  # the mark was applied, its answer lost
        assert ledger_backend.ledger()["orders"].get(order) is None  # nothing was sent

        # The record was released, so the retry executes at once instead of getting 409
        # until the lease runs out and then an UNKNOWN for an operator.
        retry = await client.post(url + "/v1/orders/pay", content=body_of(order), headers=JSON)
        assert retry.status_code == 201
        assert retry.headers.get("idempotent-replayed") is None
    assert ledger_backend.ledger()["orders"][order] == 1


async def test_store_down_after_the_backend_answered_gives_the_real_answer_and_records_it_later(
    make_store: Callable[[], Store],
    ledger_backend: BackendServer,
    client: httpx.AsyncClient,
) -> None:
    store = make_store()
    armed = fail_once(store, "complete", applied=False)
    settings = Settings.model_validate({**pay_config(), "upstream": ledger_backend.url})
    app = ProxyApp(settings, store=store)
    order = "complete-later"
    async with serve_on_uvicorn(app) as url:
        first = await client.post(url + "/v1/orders/pay", content=body_of(order), headers=JSON)
        assert first.status_code == 201  # the backend's answer, not a store error
        assert not armed

        # The completion is retried in the background; the duplicate gets the replay.
        duplicate = None
        for _ in range(100):
            duplicate = await client.post(
                url + "/v1/orders/pay", content=body_of(order), headers=JSON
            )
            if duplicate.status_code != 409:
                break
            await asyncio.sleep(0.05)
        assert duplicate is not None
        assert duplicate.status_code == 201
        assert duplicate.headers["idempotent-replayed"] == "true"
        assert duplicate.content == first.content
    assert ledger_backend.ledger()["orders"][order] == 1
