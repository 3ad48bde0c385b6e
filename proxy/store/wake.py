"""Waking waiting duplicates when their record settles, instead of having them poll.

A duplicate on an `in_flight: wait` route waits on `Waiters.wait(key, timeout)`
between its claims. The memory store wakes it directly; the Redis store's scripts
PUBLISH the record's key on `idem:settled` when a record that has waiters settles
(claim.lua marks them), and one subscription per process wakes the local waiters.
Polling stays the fallback: a lost message, a broken subscription or a store
without notifications only means the waiter claims again after its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

CHANNEL = "idem:settled"
logger = logging.getLogger("idempotency_proxy")


class Waiters:
    """The keys this process's duplicates wait on, each with their events."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    async def wait(self, key: str, timeout: float) -> bool:
        """Until `key` is notified (True) or `timeout` passes (False)."""
        event = asyncio.Event()
        events = self._events.setdefault(key, set())
        events.add(event)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            events.discard(event)
            if not events:
                self._events.pop(key, None)

    def notify(self, key: str) -> None:
        for event in self._events.get(key, ()):
            event.set()

    @property
    def idle(self) -> bool:
        return not self._events


class Subscription:
    """One pub/sub connection per process on CHANNEL; reconnects after a failure."""

    def __init__(self, connect: Any, waiters: Waiters, *, owned: bool = True) -> None:
        self._connect = connect  # () -> a redis-py asyncio client to subscribe with
        self._owned = owned  # close the client with the subscription
        self._waiters = waiters
        self._task: asyncio.Task[None] | None = None
        self.live = False

    def ensure(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            client: Any = None
            pubsub: Any = None
            try:
                client = self._connect()
                pubsub = client.pubsub()
                await pubsub.subscribe(CHANNEL)
                self.live = True
                while True:
                    # Short reads: below the store's socket timeout on shared clients.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        key = data.decode() if isinstance(data, bytes) else str(data)
                        self._waiters.notify(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: poll meanwhile, subscribe again
                if self.live:
                    logger.warning(
                        "wake-up subscription lost; waiters poll until it is back",
                        extra={"reason": type(exc).__name__},
                    )
                self.live = False
                await asyncio.sleep(1.0)
            finally:
                self.live = False
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                if client is not None and self._owned:
                    with contextlib.suppress(Exception):
                        await client.aclose()
