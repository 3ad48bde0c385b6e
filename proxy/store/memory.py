"""The memory store: the Redis store's semantics inside one process.

The embedded default for a single replica. Every method runs without awaiting
in between, so on one event loop each transition is as atomic as a Lua script.
It shares nothing between processes: with more than one replica, use Redis.

It is bounded in records and bytes. When full, a claim that would create a
record raises `StoreUnavailable` (503, nothing sent), as Redis does under
`maxmemory-policy noeviction`; expired records are reclaimed first. Transitions
of records that exist always land, so an executed request's outcome is never
lost to the cap (the overshoot is bounded by the requests in flight).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from proxy.records import (
    CheckClaim,
    CheckResult,
    ClaimKind,
    ClaimResult,
    Record,
    State,
    StoredResponse,
)
from proxy.store.base import StoreUnavailable
from proxy.store.wake import Waiters

logger = logging.getLogger("idempotency_proxy")

SWEEP_EVERY = 1024
# What a record costs beyond its strings and body (the entry, the dict slot, the
# response object, the string objects): ~300 bytes measured with tracemalloc on
# CPython 3.11. The byte cap counts it per record, so the cap is close to real memory.
ENTRY_OVERHEAD = 320
DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class _Entry:
    state: State
    token: str
    fence: int
    fingerprint: str
    created_ms: int
    expires_ms: int
    lease_ms: int | None
    retention_ms: int
    response: StoredResponse | None = None
    reason: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # The status check (check_claim.lua / check_done.lua).
    check: str = ""
    checks: int = 0
    check_token: str = ""
    check_lease_ms: int = 0
    check_next_ms: int = 0


def _size(key: str, entry: _Entry) -> int:
    size = ENTRY_OVERHEAD + len(key) + len(entry.token) + len(entry.fingerprint)
    size += len(entry.check)
    response = entry.response
    if response is not None:
        size += len(response.body) + sum(len(k) + len(v) + 16 for k, v in response.headers)
    return size


class MemoryStore:
    name = "memory"
    waits_for_replicas = False

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self._records: dict[str, _Entry] = {}
        self._ops = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        # No record expires before this: a full store sweeps only once it has passed.
        self._earliest_expiry = 0
        self._full_logged = False
        self.waiters = Waiters()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()
        self.bytes = 0

    @property
    def records(self) -> int:
        """How many records it holds (not __len__: an empty store must stay truthy)."""
        return len(self._records)

    def _put(self, key: str, entry: _Entry) -> None:
        self._records[key] = entry
        self.bytes += _size(key, entry)
        self._earliest_expiry = min(self._earliest_expiry, entry.expires_ms)

    def _delete(self, key: str) -> None:
        self.bytes -= _size(key, self._records.pop(key))

    def _resize(self, key: str, entry: _Entry, response: StoredResponse | None) -> None:
        """Replace the entry's response, keeping the byte count true."""
        self.bytes -= _size(key, entry)
        entry.response = response
        self.bytes += _size(key, entry)

    def _live(self, key: str, now: int) -> _Entry | None:
        entry = self._records.get(key)
        if entry is not None and entry.expires_ms <= now:
            self._delete(key)
            return None
        return entry

    def _sweep(self, now: int) -> None:
        self._ops += 1
        if self._ops % SWEEP_EVERY:
            return
        self._sweep_all(now)

    def _sweep_all(self, now: int) -> None:
        expired = [k for k, e in self._records.items() if e.expires_ms <= now]
        for key in expired:
            self._delete(key)
        self._earliest_expiry = min(
            (e.expires_ms for e in self._records.values()), default=now + 3_600_000
        )

    def _full(self, now: int) -> bool:
        """Whether a new record would pass a cap, after reclaiming what has expired."""
        if len(self._records) < self.max_entries and self.bytes < self.max_bytes:
            self._full_logged = False
            return False
        # A full sweep is O(records): only when some record has expired since the last
        # one, so a full store under load does not sweep on every claim.
        if now >= self._earliest_expiry:
            self._sweep_all(now)
            if len(self._records) < self.max_entries and self.bytes < self.max_bytes:
                return False
        if not self._full_logged:
            self._full_logged = True
            logger.error(
                "memory store full: new keys get 503 until records expire "
                "(store.memory_max_entries / store.memory_max_bytes, or use Redis)",
                extra={"records": len(self._records), "bytes": self.bytes},
            )
        return True

    def _owned(self, key: str, token: str) -> _Entry | None:
        entry = self._live(key, _now_ms())
        return entry if entry is not None and entry.token == token else None

    async def settled(self, key: str, timeout: float) -> bool:
        return await self.waiters.wait(key, timeout)

    async def claim(
        self,
        key: str,
        token: str,
        fingerprint: str,
        lease_ms: int,
        retention_ms: int,
        *,
        waiting: bool = False,
    ) -> ClaimResult:
        now = _now_ms()
        self._sweep(now)
        entry = self._live(key, now)
        if entry is None:
            if self._full(now):
                raise StoreUnavailable("memory-store-full")
            self._put(
                key,
                _Entry(
                    State.CLAIMED,
                    token,
                    1,
                    fingerprint,
                    now,
                    now + retention_ms,
                    now + lease_ms,
                    retention_ms,
                ),
            )
            return ClaimResult(ClaimKind.CLAIMED, fence=1)
        if entry.fingerprint != fingerprint:
            return ClaimResult(ClaimKind.MISMATCH)
        if entry.state is State.COMPLETED:
            return ClaimResult(
                ClaimKind.COMPLETED, response=entry.response, ttl_ms=entry.expires_ms - now
            )
        if entry.state is State.UNKNOWN:
            status = entry.response.status if entry.response else 502
            return ClaimResult(
                ClaimKind.UNKNOWN, response=StoredResponse(status=status), reason=entry.reason
            )
        deadline = entry.lease_ms
        if deadline is None:
            return ClaimResult(ClaimKind.IN_FLIGHT, retry_after_ms=lease_ms)
        if entry.state is State.CLAIMED:
            if entry.token == token:
                return ClaimResult(ClaimKind.CLAIMED, fence=entry.fence)
            if deadline <= now:
                entry.fence += 1
                self.bytes += len(token) - len(entry.token)
                entry.token = token
                entry.lease_ms = now + lease_ms
                return ClaimResult(ClaimKind.CLAIMED, fence=entry.fence)
        elif entry.state is State.SENT and deadline <= now:
            entry.state = State.UNKNOWN
            self._resize(key, entry, StoredResponse(status=502))
            entry.reason = "owner-lost"
            entry.lease_ms = None
            self.waiters.notify(key)
            return ClaimResult(
                ClaimKind.UNKNOWN, response=StoredResponse(status=502), reason="owner-lost"
            )
        return ClaimResult(ClaimKind.IN_FLIGHT, retry_after_ms=deadline - now)

    async def mark_sent(self, key: str, token: str, lease_ms: int, check: str = "") -> bool:
        entry = self._owned(key, token)
        if entry is None:
            return False
        if entry.state is State.SENT:
            return True
        if entry.state is not State.CLAIMED:
            return False
        now = _now_ms()
        entry.state = State.SENT
        entry.lease_ms = now + lease_ms
        # The request runs from now: its record must not expire under it.
        entry.expires_ms = max(entry.expires_ms, now + entry.retention_ms)
        if check:
            entry.check = check
            self.bytes += len(check)
        return True

    async def renew(self, key: str, token: str, lease_ms: int) -> bool:
        entry = self._owned(key, token)
        if entry is None or entry.state not in (State.CLAIMED, State.SENT):
            return False
        entry.lease_ms = _now_ms() + lease_ms
        return True

    async def complete(self, key: str, token: str, response: StoredResponse, how: str = "") -> bool:
        entry = self._owned(key, token)
        if entry is None:
            return False
        if entry.state is State.COMPLETED:
            return True
        if entry.state is not State.SENT:
            return False
        entry.state = State.COMPLETED
        self._resize(key, entry, response)
        entry.lease_ms = None
        if how:
            entry.reason = how
        self.waiters.notify(key)
        return True

    async def mark_unknown(self, key: str, token: str, status: int, reason: str) -> bool:
        entry = self._owned(key, token)
        if entry is None:
            return False
        if entry.state is State.UNKNOWN:
            return True
        if entry.state not in (State.SENT, State.CLAIMED):
            return False
        entry.state = State.UNKNOWN
        self._resize(key, entry, StoredResponse(status=status))
        entry.reason = reason
        entry.lease_ms = None
        self.waiters.notify(key)
        return True

    async def release(self, key: str, token: str) -> bool:
        entry = self._live(key, _now_ms())
        if entry is None:
            return True
        if entry.token != token or entry.state not in (State.CLAIMED, State.SENT):
            return False
        self._delete(key)
        self.waiters.notify(key)
        return True

    async def claim_check(
        self, key: str, token: str, lease_ms: int, max_checks: int, min_age_ms: int
    ) -> CheckClaim | int | None:
        now = _now_ms()
        entry = self._live(key, now)
        if entry is None or entry.state is not State.UNKNOWN or not entry.check:
            return None
        if entry.checks >= max_checks:
            return None
        due = max(entry.check_lease_ms, entry.check_next_ms, entry.created_ms + min_age_ms)
        if due > now:
            return due - now
        entry.check_token = token
        entry.check_lease_ms = now + lease_ms
        entry.checks += 1
        return CheckClaim(entry.check, entry.checks)

    async def finish_check(
        self,
        key: str,
        token: str,
        result: CheckResult,
        response: StoredResponse | None,
        backoff_ms: int,
    ) -> bool:
        now = _now_ms()
        entry = self._live(key, now)
        if entry is None or entry.state is not State.UNKNOWN or entry.check_token != token:
            return False
        if result is CheckResult.EXECUTED:
            entry.state = State.COMPLETED
            self.bytes -= len(entry.check)
            self._resize(key, entry, response or StoredResponse(0))
            entry.reason = "status-check"
            entry.lease_ms = None
            entry.check = entry.check_token = ""
            entry.check_lease_ms = entry.check_next_ms = 0
        elif result is CheckResult.NOT_EXECUTED:
            self._delete(key)
        else:
            entry.check_next_ms = now + backoff_ms
            entry.check_token = ""
            entry.check_lease_ms = 0
        return True

    async def get(self, key: str) -> Record | None:
        now = _now_ms()
        entry = self._live(key, now)
        if entry is None:
            return None
        return Record(
            state=entry.state.value,
            token=entry.token,
            fence=entry.fence,
            fingerprint=entry.fingerprint,
            created_ms=entry.created_ms,
            lease_remaining_ms=None if entry.lease_ms is None else entry.lease_ms - now,
            ttl_ms=entry.expires_ms - now,
            reason=entry.reason,
            response=entry.response if entry.state is State.COMPLETED else None,
            checks=entry.checks,
        )

    async def resolve(self, key: str, response: StoredResponse, force: bool) -> bool:
        entry = self._live(key, _now_ms())
        if entry is None:
            raise KeyError(key)
        if entry.state is not State.UNKNOWN and not force:
            return False
        entry.state = State.COMPLETED
        self._resize(key, entry, response)
        entry.reason = "resolved"
        entry.lease_ms = None
        return True

    async def discard(self, key: str, force: bool) -> bool:
        entry = self._live(key, _now_ms())
        if entry is None:
            raise KeyError(key)
        if entry.state is not State.UNKNOWN and not force:
            return False
        self._delete(key)
        return True
