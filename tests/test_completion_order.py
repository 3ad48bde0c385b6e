"""The client's answer does not wait for the completion write, and yet the store gets the
write first.

On a new key the owner stores the backend's answer (or releases the record) and answers
its client. The write is issued before the reply and awaited after it went out: Redis
executes commands in the order they arrive, so a duplicate the client sends after reading
its answer finds the record settled, on any replica. Real parts throughout: proxy
processes, a real Redis (its writes held back with `CLIENT PAUSE ... WRITE`, which still
reads and answers reads, and queues the writes in arrival order) and real backends.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import orjson
from harness import (
    HOST,
    JSON_HEADERS,
    PAY_PATH,
    BackendServer,
    ProxyFactory,
    RedisFactory,
    RedisServer,
    body_of,
    eventually,
    pay_config,
    problem_name,
    storage_key,
)
from inprocess import ThreadedUpstream

# Long enough that the proxy never gives up on a held-back write during a test: the old
# order (answer after the write) would keep the client waiting, not turn into a retry.
PATIENT_STORE: dict[str, Any] = {"timeout": "60s", "retries": 0}
ANSWER_SECONDS = 20.0


class HeldUpstream(ThreadedUpstream):
    """A real HTTP server (uvicorn, own thread) that holds each request until the test lets
    it answer, counts what it executed and keeps the exact bodies it answered with."""

    def __init__(self) -> None:
        super().__init__(HOST)
        self.arrived = threading.Event()
        self.go = threading.Event()
        self.executions = 0
        self.answers: list[bytes] = []

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        self.executions += 1
        execution = self.executions
        self.arrived.set()
        await asyncio.to_thread(self.go.wait, 30)
        order = orjson.loads(body)["order_id"]
        payload = orjson.dumps({"order_id": order, "charge": f"ch-{execution}", "ok": True})
        self.answers.append(payload)
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def record_state(redis: RedisServer, order: str) -> bytes | None:
    with redis.client() as store:
        state: bytes | None = store.hget(storage_key(order), "state")
    return state


def held_writes(redis: RedisServer) -> int:
    """Scripts Redis has read and holds back while writes are paused."""
    with redis.client() as store:
        clients = store.client_list()
    return sum(1 for c in clients if "b" in c["flags"] and c["cmd"] == "evalsha")


async def test_the_answer_goes_out_before_the_completion_write_is_done(
    redis_factory: RedisFactory, proxy_factory: ProxyFactory, client: httpx.AsyncClient
) -> None:
    redis = redis_factory()
    backend = HeldUpstream()
    backend.start()
    try:
        config = pay_config(store=PATIENT_STORE)
        owner = proxy_factory(backend.url, redis.url, config)
        other = proxy_factory(backend.url, redis.url, config)
        order = "reply-first-1"
        duplicate: asyncio.Future[httpx.Response] | None = None
        first = asyncio.ensure_future(
            client.post(owner.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS)
        )
        # The backend has the request, so the record is SENT; from now on Redis queues every
        # write (the completion) and still answers reads.
        assert await asyncio.to_thread(backend.arrived.wait, 30)
        assert record_state(redis, order) == b"SENT"
        with redis.client() as store:
            store.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        try:
            backend.go.set()
            answer = await asyncio.wait_for(first, ANSWER_SECONDS)
            # The backend's exact answer, while the completion is not done yet.
            assert answer.status_code == 201
            assert answer.content == backend.answers[0]
            assert "idempotent-replayed" not in answer.headers
            assert record_state(redis, order) == b"SENT"
            await eventually(
                lambda: _some(held_writes(redis) == 1), "the completion queued in Redis"
            )

            # A duplicate on another replica, sent after the answer: its claim reaches Redis
            # after the completion, so it is queued behind it.
            duplicate = asyncio.ensure_future(
                client.post(other.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS)
            )
            await eventually(lambda: _some(held_writes(redis) == 2), "the duplicate's claim queued")
        finally:
            with redis.client() as store:
                store.execute_command("CLIENT", "UNPAUSE")
        assert duplicate is not None
        replay = await asyncio.wait_for(duplicate, ANSWER_SECONDS)
        assert replay.status_code == 201, replay.text
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.content == answer.content
        assert record_state(redis, order) == b"COMPLETED"
        # The write landed: the owner replays too (from the store or its own cache).
        again = await client.post(
            owner.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
        )
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == answer.content
        assert backend.executions == 1
    finally:
        backend.go.set()
        backend.stop()


async def _some(condition: bool) -> bool | None:
    return True if condition else None


async def test_a_duplicate_right_after_the_answer_on_another_replica_is_a_replay(
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    owner = proxy_factory(ledger_backend.url, redis_url, pay_config())
    other = proxy_factory(ledger_backend.url, redis_url, pay_config())
    orders = [f"reply-first-burst-{i}" for i in range(50)]
    for order in orders:
        first = await client.post(
            owner.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
        )
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        duplicate = await client.post(
            other.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
        )
        assert (duplicate.status_code, problem_name(duplicate)) == (201, None), duplicate.text
        assert duplicate.headers["idempotent-replayed"] == "true"
        assert duplicate.content == first.content
    charged = ledger_backend.ledger()["orders"]
    assert {order: charged.get(order) for order in orders} == dict.fromkeys(orders, 1)


async def test_a_release_status_frees_the_key_before_the_client_can_retry(
    redis_url: str,
    ledger_backend: BackendServer,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    """A 429 releases the record: a retry sent right after it, on another replica,
    executes (never 409 in progress)."""
    owner = proxy_factory(ledger_backend.url, redis_url, pay_config())
    other = proxy_factory(ledger_backend.url, redis_url, pay_config())
    orders = [f"reply-first-release-{i}" for i in range(20)]
    refused = {**JSON_HEADERS, "X-Sample-Reject": "429"}
    for order in orders:
        first = await client.post(owner.url + PAY_PATH, content=body_of(order), headers=refused)
        assert first.status_code == 429
        retry = await client.post(
            other.url + PAY_PATH, content=body_of(order), headers=JSON_HEADERS
        )
        assert (retry.status_code, problem_name(retry)) == (201, None), retry.text
        assert "idempotent-replayed" not in retry.headers
    charged = ledger_backend.ledger()["orders"]
    assert {order: charged.get(order) for order in orders} == dict.fromkeys(orders, 1)
