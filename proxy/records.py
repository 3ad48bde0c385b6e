"""The record kept per scoped key, and what a claim can find.

States: CLAIMED -> SENT -> COMPLETED | UNKNOWN, or (absent) when released. Only
the owner holding the record's token may move it on; see docs/design.md.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import orjson

Headers = tuple[tuple[bytes, bytes], ...]


class State(enum.StrEnum):
    CLAIMED = "CLAIMED"
    SENT = "SENT"
    COMPLETED = "COMPLETED"
    UNKNOWN = "UNKNOWN"


class ClaimKind(enum.Enum):
    CLAIMED = "claimed"  # the caller owns the record: a new one, its own retry, or a take-over
    COMPLETED = "completed"  # replay the stored response
    IN_FLIGHT = "in_flight"  # another owner is alive and working
    MISMATCH = "mismatch"  # same key, different request
    UNKNOWN = "unknown"  # the backend may have executed it; an operator must resolve


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What a duplicate is answered with: status, allow-listed headers, raw body bytes."""

    status: int
    headers: Headers = ()
    body: bytes = b""
    # False when the response was over the stored-response cap: duplicates get 409.
    replayable: bool = True


@dataclass(frozen=True, slots=True)
class ClaimResult:
    kind: ClaimKind
    fence: int = 0
    response: StoredResponse | None = None
    retry_after_ms: int = 0
    # Remaining retention of a COMPLETED record, which bounds how long it may be cached.
    ttl_ms: int = 0
    reason: str = ""


class CheckResult(enum.StrEnum):
    """What a route's status check learned about an UNKNOWN record's request."""

    EXECUTED = "executed"
    NOT_EXECUTED = "not_executed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class CheckClaim:
    """The caller holds an UNKNOWN record's status check (`claim_check`)."""

    target: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Record:
    """A record as an operator sees it (`records show`)."""

    state: str
    token: str
    fence: int
    fingerprint: str
    created_ms: int
    lease_remaining_ms: int | None
    ttl_ms: int
    reason: str = ""
    response: StoredResponse | None = None
    # Status checks made so far (UNKNOWN records of routes with a status check).
    checks: int = 0


def encode_headers(headers: Headers) -> bytes:
    return orjson.dumps(
        [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]
    )


# What the HTTP server refuses to send (a 500), or what would frame a replay twice: a
# record carrying them was not written by the proxy.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})


def decode_headers(blob: bytes | str | None, *, strict: bool = False) -> Headers:
    """The stored headers. `strict`: raise ValueError unless each is a pair the proxy could
    have stored (lower-case token name, sendable value, no framing header)."""
    if not blob:
        return ()
    headers = tuple(
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in orjson.loads(blob)
    )
    if strict:
        for name, value in headers:
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value) or name in _FRAMING:
                raise ValueError("a stored header the proxy could not have stored")
    return headers
