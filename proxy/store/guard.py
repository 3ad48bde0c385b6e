"""Protections around a store that may black-hole or forget.

`CircuitBreaker`: after a run of failures, fail fast for a moment instead of
letting every request wait out the Redis timeouts, so a black-holed Redis costs
milliseconds per request, not seconds.

`DataLossWatch`: canary keys that only disappear when the store lost data (a
restart without persistence, a flush, a failover to an empty replica). Records
may have vanished with them, and with them the claims of requests still in
flight, so claims fail closed until every such request has finished or timed
out (lease + upstream timeout). A Redis Cluster loses data one master at a
time, so it gets one canary per master (`canary_keys`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable

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


CANARY_KEY = "idem:{canary}"
# How far to look for a hash tag on each master's slots; with the 16384 slots spread
# over a few masters a handful of tries finds one, and a master owning one slot alone
# needs about 16384.
MAX_CANARY_CANDIDATES = 1 << 20


def canary_key(n: int) -> str:
    """The n-th candidate canary name. The first is the single node's (and the name older
    versions watched); each has its own hash tag, so the candidates spread over slots."""
    return CANARY_KEY if n == 0 else f"idem:{{canary{n}}}"


def canary_keys(masters: Collection[str], owner_of: Callable[[str], str | None]) -> dict[str, str]:
    """One canary per master of a cluster: {master name: key on one of its slots}.

    `masters` are the masters that own slots; `owner_of` names the master holding a
    key's slot. Each master gets the first candidate that lands on its slots: a
    function of the slot map alone, so every process that sees one topology watches the
    same names, and a master replaced by its replica (a failover, with the same slots)
    keeps its canary's name, which is what lets an empty replica's missing canary be
    seen as a loss. Cheap enough to run before every read: it looks at a handful of
    candidates, not at the 16384 slots.
    """
    wanted = set(masters)
    chosen: dict[str, str] = {}
    n = 0
    while len(chosen) < len(wanted) and n < MAX_CANARY_CANDIDATES:
        key = canary_key(n)
        owner = owner_of(key)
        if owner in wanted and owner not in chosen:
            chosen[owner] = key
        n += 1
    return chosen


class DataLossWatch:
    """Tracks the canaries' values; decides when claims must fail closed."""

    KEY = CANARY_KEY

    def __init__(self, safe_mode_seconds: float) -> None:
        self.safe_mode_seconds = safe_mode_seconds
        # The value each watched canary had at its last read.
        self.seen: dict[str, bytes] = {}
        self.safe_until = 0.0
        self.losses = 0

    def new_value(self) -> bytes:
        return secrets.token_hex(16).encode()

    def watch_only(self, keys: Iterable[str]) -> None:
        """Forget canaries no longer watched (the topology changed): if one is watched
        again later, its first read is a first sight, not a loss."""
        wanted = set(keys)
        for key in [k for k in self.seen if k not in wanted]:
            del self.seen[key]

    def observe(self, key: str, current: bytes | None) -> bool:
        """Feed one canary as read now. True when the caller must (re)write `self.seen[key]`."""
        seen = self.seen.get(key)
        if current is not None:
            if seen is not None and current != seen:
                # Another replica rewrote it after a loss it saw first.
                self._enter_safe_mode(key)
            self.seen[key] = current
            return False
        if seen is not None:
            self._enter_safe_mode(key)
        self.seen[key] = self.new_value()
        return True

    def _enter_safe_mode(self, key: str) -> None:
        self.losses += 1
        self.safe_until = time.monotonic() + self.safe_mode_seconds
        logger.error(
            "the store lost data (canary gone): refusing new claims until requests in flight "
            "have finished or timed out",
            extra={"safe_mode_s": self.safe_mode_seconds, "canary": key},
        )

    @property
    def active(self) -> bool:
        return time.monotonic() < self.safe_until
