"""The `Store` protocol: every transition of a record is a compare-and-set on its owner token.

Implementations must give the same answers for the same history (the behaviour
suite runs against each); times are milliseconds, and the store's own clock
decides leases so that every replica shares one clock. Every failure of a call,
whatever the client library raised, comes out as `StoreUnavailable` (or its
`CorruptRecord`), so that callers answer 503 or retry in the background, never 500.
"""

from __future__ import annotations

from typing import Protocol

from proxy.records import CheckClaim, CheckResult, ClaimResult, Record, StoredResponse


class StoreUnavailable(Exception):
    """The store did not answer (in time): nothing may be assumed about the write."""


class CorruptRecord(StoreUnavailable):
    """The record exists but cannot be read (a field missing or malformed, not a hash).

    The contract treats it as alive: never overwritten, never taken over. Every caller
    that handles an unavailable store handles this too; a claim answers it apart (409,
    counted and logged), because it is no outage and a fail-open route must not forward.
    """


class Store(Protocol):
    name: str
    # The store WAITs for replicas after its writes (store.wait_replicas, not on Cluster):
    # then a client's answer waits for the completion too, so that the record is on a
    # replica by the time the client has it.
    waits_for_replicas: bool

    async def start(self) -> None:
        """Connect, load scripts; called once before serving."""

    async def close(self) -> None: ...

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
        """Create a CLAIMED record, recognise our own earlier claim, take over a CLAIMED record
        whose lease expired, or report what stands in the way (and turn a SENT record whose
        lease expired into UNKNOWN). `waiting`: the caller will wait for the record to settle
        (`settled`), so the transition that settles it must wake it."""

    async def settled(self, key: str, timeout: float) -> bool:
        """Wait until a record this process waits on settles (True: woken) or `timeout`
        passes (False: poll). A hint only: the caller claims again either way."""

    async def mark_sent(self, key: str, token: str, lease_ms: int, check: str = "") -> bool:
        """CLAIMED -> SENT, before the first byte goes upstream. False: fenced, do not send.
        `check`: the route's status-check target for this request, kept for `claim_check`."""

    async def renew(self, key: str, token: str, lease_ms: int) -> bool:
        """Push the lease deadline while the backend works. False: fenced."""

    async def complete(self, key: str, token: str, response: StoredResponse, how: str = "") -> bool:
        """SENT -> COMPLETED with the response to replay. False: fenced. `how`: shown as
        the record's reason ('late-answer' when it came during the outcome wait)."""

    async def mark_unknown(self, key: str, token: str, status: int, reason: str) -> bool:
        """SENT -> UNKNOWN: the backend may have executed it. False: fenced."""

    async def release(self, key: str, token: str) -> bool:
        """CLAIMED/SENT -> (absent): the backend provably did not act. False: fenced."""

    async def claim_check(
        self, key: str, token: str, lease_ms: int, max_checks: int, min_age_ms: int
    ) -> CheckClaim | int | None:
        """UNKNOWN: take the record's status check for `lease_ms`. A CheckClaim when the
        caller checks now; the milliseconds until a check may start when another holds
        it or it is not due; None when there is nothing to check (not UNKNOWN, no target,
        `max_checks` made)."""

    async def finish_check(
        self,
        key: str,
        token: str,
        result: CheckResult,
        response: StoredResponse | None,
        backoff_ms: int,
    ) -> bool:
        """Holder of the check on an UNKNOWN record: executed -> COMPLETED with `response`
        (reason 'status-check'); not executed -> (absent); unknown -> next check after
        `backoff_ms`. False: fenced."""

    async def get(self, key: str) -> Record | None:
        """The record as it is, for operators."""

    async def resolve(self, key: str, response: StoredResponse, force: bool) -> bool:
        """Operator: UNKNOWN (or any state with force) -> COMPLETED with `response`."""

    async def discard(self, key: str, force: bool) -> bool:
        """Operator: delete an UNKNOWN record (or any state with force) so a retry executes."""
