"""The memory store: the Redis store's semantics inside one process.

The embedded default for a single replica. Every method runs without awaiting
in between, so on one event loop each transition is as atomic as a Lua script.
It shares nothing between processes: with more than one replica, use Redis.
"""

from __future__ import annotations

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
from proxy.store.wake import Waiters

SWEEP_EVERY = 1024


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
    response: StoredResponse | None = None
    reason: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # The status check (check_claim.lua / check_done.lua).
    check: str = ""
    checks: int = 0
    check_token: str = ""
    check_lease_ms: int = 0
    check_next_ms: int = 0


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._records: dict[str, _Entry] = {}
        self._ops = 0
        self.waiters = Waiters()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._records.clear()

    def _live(self, key: str, now: int) -> _Entry | None:
        entry = self._records.get(key)
        if entry is not None and entry.expires_ms <= now:
            del self._records[key]
            return None
        return entry

    def _sweep(self, now: int) -> None:
        self._ops += 1
        if self._ops % SWEEP_EVERY:
            return
        expired = [k for k, e in self._records.items() if e.expires_ms <= now]
        for key in expired:
            del self._records[key]

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
            self._records[key] = _Entry(
                State.CLAIMED, token, 1, fingerprint, now, now + retention_ms, now + lease_ms
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
                entry.token = token
                entry.lease_ms = now + lease_ms
                return ClaimResult(ClaimKind.CLAIMED, fence=entry.fence)
        elif entry.state is State.SENT and deadline <= now:
            entry.state = State.UNKNOWN
            entry.response = StoredResponse(status=502)
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
        entry.state = State.SENT
        entry.lease_ms = _now_ms() + lease_ms
        if check:
            entry.check = check
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
        entry.response = response
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
        entry.response = StoredResponse(status=status)
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
        del self._records[key]
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
            entry.response = response or StoredResponse(0)
            entry.reason = "status-check"
            entry.lease_ms = None
            entry.check = entry.check_token = ""
            entry.check_lease_ms = entry.check_next_ms = 0
        elif result is CheckResult.NOT_EXECUTED:
            del self._records[key]
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
        entry.response = response
        entry.reason = "resolved"
        entry.lease_ms = None
        return True

    async def discard(self, key: str, force: bool) -> bool:
        entry = self._live(key, _now_ms())
        if entry is None:
            raise KeyError(key)
        if entry.state is not State.UNKNOWN and not force:
            return False
        del self._records[key]
        return True
