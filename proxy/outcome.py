"""Late answers: an exchange that outlives the client's timeout.

When the upstream timeout fires, the client gets its 504 `outcome-unknown` at
once, but the exchange with the backend may stay open for the route's
`outcome_wait`. The record stays SENT meanwhile (the owner keeps renewing its
lease, so duplicates get 409 and `in_flight: wait` duplicates wait), and a late
answer is recorded exactly like an on-time one. Nothing here sends anything
again: it only keeps listening on the one exchange that was already sent.

The number of exchanges held this way is bounded: each holds a pooled
connection. At the bound, a timeout is handled as with `outcome_wait: 0` (the
exchange is dropped, the record turns UNKNOWN at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

from proxy.metrics import Metrics
from proxy.upstream import OutcomeUnknown, UpstreamResponse


class Held(Exception):
    """The answer did not come in time; the exchange continues in the background."""

    def __init__(self, exchange: asyncio.Future[UpstreamResponse]) -> None:
        super().__init__("timeout")
        self.exchange = exchange


class LateAnswers:
    """Decides whether a timed-out exchange is held open, and tracks those that are."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.held: set[asyncio.Future[UpstreamResponse]] = set()

    def start(self, send: Awaitable[UpstreamResponse]) -> asyncio.Future[UpstreamResponse]:
        """Run the exchange as its own task, so that the client's timeout need not end it."""
        return asyncio.ensure_future(send)

    async def answer(
        self, exchange: asyncio.Future[UpstreamResponse], timeout: float, wait: float
    ) -> UpstreamResponse:
        """The backend's answer if it comes within `timeout`.

        Otherwise raise `Held` when the exchange may go on for `wait` more seconds (the
        caller answers the client and follows the exchange in the background), or drop
        the exchange and raise OutcomeUnknown('timeout') as a proxy without a wait would.
        The exchange's own deadline (timeout + wait) is set by the caller's send.
        """
        done, _ = await asyncio.wait({exchange}, timeout=timeout)
        if done:
            return exchange.result()
        if wait > 0 and len(self.held) < self.limit:
            self.held.add(exchange)
            self.metrics.held_exchanges.inc()
            exchange.add_done_callback(self._forget)
            raise Held(exchange)
        if wait > 0:
            self.metrics.resolution("late_answer", "not_held")
        exchange.cancel()
        # Let the transport close the connection before the record turns UNKNOWN.
        await asyncio.wait({exchange})
        raise OutcomeUnknown("timeout")

    def _forget(self, exchange: asyncio.Future[UpstreamResponse]) -> None:
        if exchange in self.held:
            self.held.discard(exchange)
            self.metrics.held_exchanges.dec()

    def abandon(self) -> int:
        """Shutdown after the grace period: end every held exchange, so that each owner
        records its request as UNKNOWN (never as released: it was sent)."""
        held = list(self.held)
        for exchange in held:
            exchange.cancel()
        return len(held)


async def silence_bounded(rest: AsyncIterator[bytes], timeout: float) -> AsyncIterator[bytes]:
    """The rest of a streamed on-time answer, each chunk within `timeout`: the exchange's
    own read timeout includes the outcome wait, which must not let a backend that goes
    silent mid-body hold the client longer than the upstream timeout (TimeoutError)."""
    chunks = aiter(rest)
    while True:
        async with asyncio.timeout(timeout):
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
        yield chunk
