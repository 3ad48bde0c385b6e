"""Protections around a store that may black-hole or forget.

`CircuitBreaker`: after a run of failures, fail fast for a moment instead of
letting every request wait out the Redis timeouts, so a black-holed Redis costs
milliseconds per request, not seconds.

`DataLossWatch`: a canary key that only disappears when the store lost data (a
restart without persistence, a flush, a failover to an empty replica). Records
may have vanished with it, and with them the claims of requests still in
flight, so claims fail closed until every such request has finished or timed
out (lease + upstream timeout).
"""

from __future__ import annotations

import logging
import secrets
import time

from proxy.store.base import StoreUnavailable

logger = logging.getLogger("idempotency_proxy")


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown: float = 1.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0
        self.opened = 0  # times the circuit opened, for the metrics

    @property
    def is_open(self) -> bool:
        return self._failures >= self.threshold and time.monotonic() < self._open_until

    def before(self) -> None:
        """Raise at once while open; after the cooldown let calls probe the store."""
        if self._failures >= self.threshold and time.monotonic() < self._open_until:
            raise StoreUnavailable("circuit-open")

    def success(self) -> None:
        if self._failures >= self.threshold:
            logger.info("store reachable again; circuit closed")
        self._failures = 0

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self.threshold:
            if self._failures == self.threshold:
                self.opened += 1
                logger.warning(
                    "store failing; answering 503 at once for a while",
                    extra={"cooldown_s": self.cooldown},
                )
            self._open_until = time.monotonic() + self.cooldown


class DataLossWatch:
    """Tracks the canary's value; decides when claims must fail closed."""

    KEY = "idem:{canary}"

    def __init__(self, safe_mode_seconds: float) -> None:
        self.safe_mode_seconds = safe_mode_seconds
        self.seen: bytes | None = None
        self.safe_until = 0.0
        self.losses = 0

    def new_value(self) -> bytes:
        return secrets.token_hex(16).encode()

    def observe(self, current: bytes | None) -> bool:
        """Feed the canary as read now. True when the caller must (re)write `self.seen`."""
        if current is not None:
            if self.seen is not None and current != self.seen:
                # Another replica rewrote it after a loss it saw first.
                self._enter_safe_mode()
            self.seen = current
            return False
        if self.seen is not None:
            self._enter_safe_mode()
        self.seen = self.new_value()
        return True

    def _enter_safe_mode(self) -> None:
        self.losses += 1
        self.safe_until = time.monotonic() + self.safe_mode_seconds
        logger.error(
            "the store lost data (canary gone): refusing new claims until requests in flight "
            "have finished or timed out",
            extra={"safe_mode_s": self.safe_mode_seconds},
        )

    @property
    def active(self) -> bool:
        return time.monotonic() < self.safe_until
