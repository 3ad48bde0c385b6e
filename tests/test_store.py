"""The store's semantics, the same behaviour suite against the memory store and real Redis.

Every transition is a compare-and-set on the owner token: a stale owner must never
send, overwrite or delete, a take-over may only happen before anything was sent,
and a record whose owner died after sending is UNKNOWN, never re-sent. Leases are
short (~200 ms) where expiry matters; the tests poll instead of timing anything.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.config import StoreSettings
from proxy.keys import scope
from proxy.records import CheckClaim, CheckResult, ClaimKind, ClaimResult, StoredResponse
from proxy.store.base import Store, StoreUnavailable
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore

LEASE_MS = 10_000
RETENTION_MS = 60_000
SHORT_LEASE_MS = 200
LONG_LEASE_MS = 60_000
FP = "a" * 64
OTHER_FP = "b" * 64
# Generous: the machine is shared; "close to" only has to tell a retention from a lease.
TTL_SLACK_MS = 15_000

RESPONSE = StoredResponse(
    status=201,
    headers=(
        (b"content-type", b"application/json"),
        (b"location", b"/v1/charges/ch_1"),
        (b"etag", b'"v1"'),
    ),
    body=b'{"id": "ch_1", "amount": 1000}\x00\xff raw bytes',
)


def _key() -> str:
    return scope("tenant", "pay", f"order-{uuid.uuid4()}").storage_key


def _token() -> str:
    return uuid.uuid4().hex


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each behaviour test runs once per store: memory, one Redis node, a Redis Cluster."""
    instance: Store
    if request.param == "memory":
        instance = MemoryStore()
    elif request.param == "cluster":
        instance = RedisStore(
            StoreSettings(url=request.getfixturevalue("redis_cluster").url, timeout=5.0)
        )
    else:
        # A generous command timeout: these tests are about semantics, not latency.
        instance = RedisStore(StoreSettings(url=request.getfixturevalue("redis_url"), timeout=5.0))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    instance = RedisStore(StoreSettings(url=redis_url, timeout=5.0))
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


async def _claim(
    store: Store,
    key: str,
    token: str,
    fp: str = FP,
    *,
    lease_ms: int = LEASE_MS,
    retention_ms: int = RETENTION_MS,
) -> ClaimResult:
    return await store.claim(key, token, fp, lease_ms, retention_ms)


async def _claim_until_not_in_flight(
    store: Store, key: str, token: str, *, lease_ms: int = LONG_LEASE_MS, timeout: float = 15.0
) -> ClaimResult:
    """Retry a claim (as a client would) until the current owner's lease has run out."""
    deadline = time.monotonic() + timeout
    result = await _claim(store, key, token, lease_ms=lease_ms)
    for _ in range(int(timeout / 0.05) + 1):
        if result.kind is not ClaimKind.IN_FLIGHT or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
        result = await _claim(store, key, token, lease_ms=lease_ms)
    return result


async def _completed(store: Store, key: str, response: StoredResponse = RESPONSE) -> str:
    token = _token()
    assert (await _claim(store, key, token)).kind is ClaimKind.CLAIMED
    assert await store.mark_sent(key, token, LEASE_MS)
    assert await store.complete(key, token, response)
    return token


async def _unknown(store: Store, key: str) -> str:
    token = _token()
    assert (await _claim(store, key, token)).kind is ClaimKind.CLAIMED
    assert await store.mark_sent(key, token, LEASE_MS)
    assert await store.mark_unknown(key, token, 504, "timeout")
    return token


# --------------------------------------------------------------------------- claim


async def test_claim_new_record(store: Store) -> None:
    key, token = _key(), _token()
    assert await store.get(key) is None
    result = await _claim(store, key, token)
    assert result.kind is ClaimKind.CLAIMED
    assert result.fence == 1
    record = await store.get(key)
    assert record is not None
    assert record.state == "CLAIMED"
    assert record.token == token
    assert record.fence == 1
    assert record.fingerprint == FP
    assert record.lease_remaining_ms is not None
    assert 0 < record.lease_remaining_ms <= LEASE_MS
    assert record.response is None


async def test_retried_claim_with_the_same_token_is_still_ours(store: Store) -> None:
    key, token = _key(), _token()
    assert (await _claim(store, key, token)).kind is ClaimKind.CLAIMED
    for _ in range(3):
        again = await _claim(store, key, token)
        assert again.kind is ClaimKind.CLAIMED, again
        assert again.fence == 1
    record = await store.get(key)
    assert record is not None and record.token == token and record.fence == 1


async def test_second_token_is_in_flight(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    other = await _claim(store, key, _token())
    assert other.kind is ClaimKind.IN_FLIGHT
    assert 0 < other.retry_after_ms <= LEASE_MS
    # Still in flight once the owner is sending, and the owner keeps its record.
    assert await store.mark_sent(key, owner, LEASE_MS)
    other = await _claim(store, key, _token())
    assert other.kind is ClaimKind.IN_FLIGHT
    assert 0 < other.retry_after_ms <= LEASE_MS
    record = await store.get(key)
    assert record is not None and record.state == "SENT" and record.token == owner


async def test_mismatch_is_reported_in_every_state(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert (await _claim(store, key, _token(), OTHER_FP)).kind is ClaimKind.MISMATCH
    # Even the owner's own token cannot reuse the key for another request.
    assert (await _claim(store, key, owner, OTHER_FP)).kind is ClaimKind.MISMATCH
    await store.mark_sent(key, owner, LEASE_MS)
    assert (await _claim(store, key, _token(), OTHER_FP)).kind is ClaimKind.MISMATCH
    await store.complete(key, owner, RESPONSE)
    assert (await _claim(store, key, _token(), OTHER_FP)).kind is ClaimKind.MISMATCH
    unknown_key = _key()
    await _unknown(store, unknown_key)
    assert (await _claim(store, unknown_key, _token(), OTHER_FP)).kind is ClaimKind.MISMATCH
    # The mismatching claims changed nothing.
    record = await store.get(key)
    assert record is not None and record.fingerprint == FP and record.state == "COMPLETED"


# --------------------------------------------------------------------------- completion


async def test_completed_record_replays_status_headers_and_raw_body(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await store.mark_sent(key, owner, LEASE_MS)
    assert await store.complete(key, owner, RESPONSE)
    for token in (_token(), _token(), owner):
        result = await _claim(store, key, token)
        assert result.kind is ClaimKind.COMPLETED
        assert result.response == RESPONSE
        assert 0 < result.ttl_ms <= RETENTION_MS
    record = await store.get(key)
    assert record is not None
    assert record.state == "COMPLETED"
    assert record.response == RESPONSE
    assert record.lease_remaining_ms is None


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(StoredResponse(status=204), id="empty"),
        pytest.param(StoredResponse(status=500, body=b"boom"), id="500"),
        pytest.param(
            StoredResponse(status=200, headers=((b"x-extra", b"caf\xe9"),), body=bytes(range(256))),
            id="binary",
        ),
        pytest.param(StoredResponse(status=200, replayable=False), id="not-replayable"),
    ],
)
async def test_responses_round_trip(store: Store, response: StoredResponse) -> None:
    key = _key()
    await _completed(store, key, response)
    result = await _claim(store, key, _token())
    assert result.kind is ClaimKind.COMPLETED
    assert result.response == response
    assert result.response is not None and result.response.replayable is response.replayable


async def test_complete_is_idempotent_for_the_same_token(store: Store) -> None:
    key = _key()
    owner = await _completed(store, key)
    # A retried complete (e.g. the reply was lost) succeeds and keeps the first response.
    assert await store.complete(key, owner, RESPONSE)
    assert await store.complete(key, owner, StoredResponse(status=500, body=b"later"))
    result = await _claim(store, key, _token())
    assert result.kind is ClaimKind.COMPLETED and result.response == RESPONSE
    # Nobody else can complete it, and nothing moves it back.
    assert not await store.complete(key, _token(), StoredResponse(status=200))
    assert not await store.mark_sent(key, owner, LEASE_MS)
    assert not await store.renew(key, owner, LEASE_MS)
    assert not await store.mark_unknown(key, owner, 504, "timeout")
    assert not await store.release(key, owner)
    record = await store.get(key)
    assert record is not None and record.state == "COMPLETED" and record.response == RESPONSE


async def test_a_late_answer_completes_a_renewed_record_and_says_so(store: Store) -> None:
    """The outcome wait: the owner renews past its first lease, then completes with
    `how='late-answer'`, which `records show` displays as the reason."""
    key, owner = _key(), _token()
    await _claim(store, key, owner, lease_ms=SHORT_LEASE_MS)
    assert await store.mark_sent(key, owner, SHORT_LEASE_MS)
    for _ in range(3):
        await asyncio.sleep(SHORT_LEASE_MS / 2000)
        assert await store.renew(key, owner, SHORT_LEASE_MS)
        assert (await _claim(store, key, _token())).kind is ClaimKind.IN_FLIGHT
    assert await store.complete(key, owner, RESPONSE, "late-answer")
    record = await store.get(key)
    assert record is not None and record.state == "COMPLETED"
    assert record.reason == "late-answer" and record.response == RESPONSE


async def test_a_late_answer_never_overwrites_unknown(store: Store) -> None:
    """An owner that stopped renewing (frozen) and answers after its SENT record turned
    UNKNOWN is fenced: UNKNOWN then belongs to the status check and the operator."""
    key, owner = _key(), _token()
    await _claim(store, key, owner, lease_ms=SHORT_LEASE_MS)
    assert await store.mark_sent(key, owner, SHORT_LEASE_MS)
    assert (await _claim_until_not_in_flight(store, key, _token())).kind is ClaimKind.UNKNOWN
    assert not await store.complete(key, owner, RESPONSE, "late-answer")
    record = await store.get(key)
    assert record is not None and record.state == "UNKNOWN" and record.reason == "owner-lost"


async def test_complete_needs_sent(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert not await store.complete(key, owner, RESPONSE)
    record = await store.get(key)
    assert record is not None and record.state == "CLAIMED"


async def test_mark_sent_is_idempotent_and_owner_only(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert not await store.mark_sent(key, _token(), LEASE_MS)
    record = await store.get(key)
    assert record is not None and record.state == "CLAIMED"
    assert await store.mark_sent(key, owner, LEASE_MS)
    assert await store.mark_sent(key, owner, LEASE_MS)
    record = await store.get(key)
    assert record is not None and record.state == "SENT" and record.fence == 1


async def test_transitions_on_an_absent_record_are_fenced(store: Store) -> None:
    key, token = _key(), _token()
    assert not await store.mark_sent(key, token, LEASE_MS)
    assert not await store.renew(key, token, LEASE_MS)
    assert not await store.complete(key, token, RESPONSE)
    assert not await store.mark_unknown(key, token, 502, "reset")
    assert await store.get(key) is None


# --------------------------------------------------------------------------- leases


async def test_take_over_of_an_expired_claim_fences_the_old_owner(store: Store) -> None:
    key, old, new = _key(), _token(), _token()
    assert (await _claim(store, key, old, lease_ms=SHORT_LEASE_MS)).fence == 1
    taken = await _claim_until_not_in_flight(store, key, new)
    assert taken.kind is ClaimKind.CLAIMED, taken
    assert taken.fence == 2
    # The old owner wakes up: every write it tries is refused, so it never sends.
    assert not await store.mark_sent(key, old, LEASE_MS)
    assert not await store.renew(key, old, LEASE_MS)
    assert not await store.complete(key, old, StoredResponse(status=200, body=b"stale"))
    assert not await store.mark_unknown(key, old, 502, "reset")
    assert not await store.release(key, old)
    assert (await _claim(store, key, old)).kind is ClaimKind.IN_FLIGHT
    record = await store.get(key)
    assert record is not None
    assert (record.state, record.token, record.fence) == ("CLAIMED", new, 2)
    # The new owner's retried claim is still its own, and it finishes normally.
    assert (await _claim(store, key, new, lease_ms=LONG_LEASE_MS)).fence == 2
    assert await store.mark_sent(key, new, LEASE_MS)
    assert await store.complete(key, new, RESPONSE)
    replay = await _claim(store, key, _token())
    assert replay.kind is ClaimKind.COMPLETED and replay.response == RESPONSE


async def test_sent_record_with_expired_lease_becomes_unknown(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await store.mark_sent(key, owner, SHORT_LEASE_MS)
    result = await _claim_until_not_in_flight(store, key, _token())
    # Never a take-over: the backend may have executed it.
    assert result.kind is ClaimKind.UNKNOWN, result
    assert result.response is not None and result.response.status == 502
    assert result.reason == "owner-lost"
    for token in (_token(), owner):
        again = await _claim(store, key, token)
        assert again.kind is ClaimKind.UNKNOWN
    # The late owner cannot revive, overwrite or delete it.
    assert not await store.renew(key, owner, LEASE_MS)
    assert not await store.mark_sent(key, owner, LEASE_MS)
    assert not await store.complete(key, owner, RESPONSE)
    assert not await store.release(key, owner)
    record = await store.get(key)
    assert record is not None
    assert record.state == "UNKNOWN"
    assert record.reason == "owner-lost"
    assert record.fence == 1
    assert record.lease_remaining_ms is None


async def test_renew_keeps_a_sent_record_alive_past_its_first_lease(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await store.mark_sent(key, owner, SHORT_LEASE_MS)
    assert await store.renew(key, owner, LONG_LEASE_MS)
    assert not await store.renew(key, _token(), LONG_LEASE_MS)
    await asyncio.sleep(3 * SHORT_LEASE_MS / 1000)  # well past the first deadline
    other = await _claim(store, key, _token())
    assert other.kind is ClaimKind.IN_FLIGHT, other
    assert other.retry_after_ms > SHORT_LEASE_MS
    record = await store.get(key)
    assert record is not None and record.state == "SENT" and record.token == owner
    assert record.lease_remaining_ms is not None and record.lease_remaining_ms > SHORT_LEASE_MS
    assert await store.complete(key, owner, RESPONSE)


async def test_renew_keeps_a_claim_from_being_taken_over(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner, lease_ms=SHORT_LEASE_MS)
    assert await store.renew(key, owner, LONG_LEASE_MS)
    await asyncio.sleep(3 * SHORT_LEASE_MS / 1000)
    assert (await _claim(store, key, _token())).kind is ClaimKind.IN_FLIGHT
    record = await store.get(key)
    assert record is not None and record.token == owner and record.state == "CLAIMED"


# --------------------------------------------------------------------------- release / unknown


async def test_release_by_owner_removes_the_record(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await store.release(key, owner)
    assert await store.get(key) is None
    # A retried release finds nothing and succeeds; the next request starts afresh.
    assert await store.release(key, owner)
    fresh = await _claim(store, key, _token(), OTHER_FP)
    assert fresh.kind is ClaimKind.CLAIMED and fresh.fence == 1


async def test_release_of_a_sent_record_by_owner(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    await store.mark_sent(key, owner, LEASE_MS)
    assert await store.release(key, owner)
    assert await store.get(key) is None


async def test_release_by_a_stranger_is_refused(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert not await store.release(key, _token())
    record = await store.get(key)
    assert record is not None and record.token == owner
    unknown_key = _key()
    unknown_owner = await _unknown(store, unknown_key)
    # Not even the owner may delete an UNKNOWN record: only an operator can.
    assert not await store.release(unknown_key, unknown_owner)
    assert (await store.get(unknown_key)) is not None


async def test_mark_unknown(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    await store.mark_sent(key, owner, LEASE_MS)
    assert not await store.mark_unknown(key, _token(), 504, "timeout")
    assert await store.mark_unknown(key, owner, 504, "timeout")
    assert await store.mark_unknown(key, owner, 504, "timeout")  # a retried call
    for token in (_token(), owner):
        result = await _claim(store, key, token)
        assert result.kind is ClaimKind.UNKNOWN
        assert result.response is not None and result.response.status == 504
        assert result.reason == "timeout"
    assert not await store.complete(key, owner, RESPONSE)
    assert not await store.renew(key, owner, LEASE_MS)
    record = await store.get(key)
    assert record is not None
    assert (record.state, record.reason, record.lease_remaining_ms) == ("UNKNOWN", "timeout", None)
    assert record.ttl_ms > 0


# --------------------------------------------------------------------------- retention


async def test_retention_is_set_at_claim_and_kept(store: Store) -> None:
    key, owner = _key(), _token()

    async def ttl() -> int:
        record = await store.get(key)
        assert record is not None
        return record.ttl_ms

    await _claim(store, key, owner, lease_ms=SHORT_LEASE_MS)
    # The full retention at once, not the lease.
    assert RETENTION_MS - TTL_SLACK_MS < await ttl() <= RETENTION_MS
    assert await store.mark_sent(key, owner, LEASE_MS)
    assert RETENTION_MS - TTL_SLACK_MS < await ttl() <= RETENTION_MS
    assert await store.renew(key, owner, LEASE_MS)
    assert RETENTION_MS - TTL_SLACK_MS < await ttl() <= RETENTION_MS
    assert await store.complete(key, owner, RESPONSE)
    assert RETENTION_MS - TTL_SLACK_MS < await ttl() <= RETENTION_MS
    replay = await _claim(store, key, _token())
    assert RETENTION_MS - TTL_SLACK_MS < replay.ttl_ms <= RETENTION_MS
    unknown_key = _key()
    await _unknown(store, unknown_key)
    record = await store.get(unknown_key)
    assert record is not None and RETENTION_MS - TTL_SLACK_MS < record.ttl_ms <= RETENTION_MS


async def test_retention_restarts_at_sent(store: Store) -> None:
    """A record must not expire while its request may still be running: the claim's TTL
    runs from the claim, but the backend call starts at SENT."""
    key, owner = _key(), _token()
    started = time.monotonic()
    await _claim(store, key, owner, retention_ms=1500)
    await asyncio.sleep(1.0)
    assert await store.mark_sent(key, owner, LEASE_MS)
    record = await store.get(key)
    assert record is not None and record.ttl_ms > 1200, record
    # Past the claim's own retention: the SENT record still holds the key.
    await asyncio.sleep(max(0.0, started + 2.0 - time.monotonic()))
    record = await store.get(key)
    assert record is not None and record.state == "SENT"
    assert (await _claim(store, key, _token())).kind is ClaimKind.IN_FLIGHT


async def test_record_expires_after_retention(store: Store) -> None:
    key = _key()
    token = _token()
    await _claim(store, key, token, retention_ms=300)
    assert await store.mark_sent(key, token, LEASE_MS)
    assert await store.complete(key, token, RESPONSE)
    for _ in range(300):  # bounded: 15 s at most
        if await store.get(key) is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get(key) is None
    fresh = await _claim(store, key, _token(), OTHER_FP)
    assert fresh.kind is ClaimKind.CLAIMED and fresh.fence == 1


# --------------------------------------------------------------------------- operators


async def test_resolve_unknown(store: Store) -> None:
    key = _key()
    await _unknown(store, key)
    operator = StoredResponse(status=200, headers=((b"content-type", b"text/plain"),), body=b"ok")
    assert await store.resolve(key, operator, force=False)
    result = await _claim(store, key, _token())
    assert result.kind is ClaimKind.COMPLETED
    assert result.response is not None
    assert (result.response.status, result.response.body) == (200, b"ok")
    assert result.response.headers == ((b"content-type", b"text/plain"),)
    record = await store.get(key)
    assert record is not None and record.state == "COMPLETED" and record.ttl_ms > 0


async def test_resolve_other_states_needs_force(store: Store) -> None:
    operator = StoredResponse(status=200, body=b"resolved")
    claimed, owner = _key(), _token()
    await _claim(store, claimed, owner)
    assert not await store.resolve(claimed, operator, force=False)
    record = await store.get(claimed)
    assert record is not None and record.state == "CLAIMED"
    completed = _key()
    await _completed(store, completed)
    assert not await store.resolve(completed, operator, force=False)
    assert (await _claim(store, completed, _token())).response == RESPONSE
    assert await store.resolve(claimed, operator, force=True)
    result = await _claim(store, claimed, _token())
    assert result.kind is ClaimKind.COMPLETED and result.response is not None
    assert result.response.body == b"resolved"
    # The owner of the resolved claim can no longer send it.
    assert not await store.mark_sent(claimed, owner, LEASE_MS)
    result = await _claim(store, claimed, _token())
    assert result.response is not None and result.response.body == b"resolved"


async def test_resolve_and_discard_absent_raise_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        await store.resolve(_key(), StoredResponse(status=200), force=False)
    with pytest.raises(KeyError):
        await store.resolve(_key(), StoredResponse(status=200), force=True)
    with pytest.raises(KeyError):
        await store.discard(_key(), force=False)
    with pytest.raises(KeyError):
        await store.discard(_key(), force=True)


async def test_discard_unknown_lets_a_retry_execute(store: Store) -> None:
    key = _key()
    await _unknown(store, key)
    assert await store.discard(key, force=False)
    assert await store.get(key) is None
    retry = await _claim(store, key, _token())
    assert retry.kind is ClaimKind.CLAIMED and retry.fence == 1


async def test_discard_other_states_needs_force(store: Store) -> None:
    key = _key()
    await _completed(store, key)
    assert not await store.discard(key, force=False)
    assert (await _claim(store, key, _token())).kind is ClaimKind.COMPLETED
    assert await store.discard(key, force=True)
    assert await store.get(key) is None
    sent, owner = _key(), _token()
    await _claim(store, sent, owner)
    await store.mark_sent(sent, owner, LEASE_MS)
    assert not await store.discard(sent, force=False)
    assert await store.discard(sent, force=True)
    assert not await store.complete(sent, owner, RESPONSE)


# --------------------------------------------------------------------------- redis only


def _redis_ms(timing: Any) -> int:
    return int(timing[0]) * 1000 + int(timing[1]) // 1000


async def test_redis_lease_deadline_comes_from_redis_time(redis_store: RedisStore) -> None:
    client = redis_store.client
    key, owner = _key(), _token()

    async def lease_ahead() -> int:
        lease = int(await client.hget(key, "lease"))
        return lease - _redis_ms(await client.time())

    await _claim(redis_store, key, owner, lease_ms=LONG_LEASE_MS)
    ahead = await lease_ahead()
    assert LONG_LEASE_MS - TTL_SLACK_MS < ahead <= LONG_LEASE_MS
    created = int(await client.hget(key, "created"))
    assert 0 <= _redis_ms(await client.time()) - created < TTL_SLACK_MS
    assert await redis_store.mark_sent(key, owner, 30_000)
    assert 30_000 - TTL_SLACK_MS < await lease_ahead() <= 30_000
    assert await redis_store.renew(key, owner, 45_000)
    assert 45_000 - TTL_SLACK_MS < await lease_ahead() <= 45_000
    assert await redis_store.complete(key, owner, RESPONSE)
    assert await client.hget(key, "lease") is None


async def test_redis_ttl_is_the_retention(redis_store: RedisStore) -> None:
    client = redis_store.client
    key, owner = _key(), _token()
    await _claim(redis_store, key, owner, lease_ms=SHORT_LEASE_MS)
    assert RETENTION_MS - TTL_SLACK_MS < await client.pttl(key) <= RETENTION_MS
    await redis_store.mark_sent(key, owner, LEASE_MS)
    await redis_store.renew(key, owner, LEASE_MS)
    await redis_store.complete(key, owner, RESPONSE)
    assert RETENTION_MS - TTL_SLACK_MS < await client.pttl(key) <= RETENTION_MS


async def test_redis_keys_hold_no_raw_key_bytes(redis_store: RedisStore) -> None:
    client = redis_store.client
    raw = "RAW-client-key-3f9c"
    scoped = scope("tenant-x", "pay", raw).storage_key
    token = _token()
    await _claim(redis_store, scoped, token)
    await redis_store.mark_sent(scoped, token, LEASE_MS)
    await redis_store.complete(scoped, token, RESPONSE)
    names = [name async for name in client.scan_iter(count=1000)]
    assert scoped.encode() in names
    for name in names:
        # Records, plus any fixed-name bookkeeping key of the store itself.
        assert re.fullmatch(rb"idem:\{[0-9a-z]+\}", name), name
        assert raw.encode() not in name
    fields = await client.hgetall(scoped)
    assert all(raw.encode() not in value for value in fields.values())


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(("string", "a plain string"), id="string"),
        pytest.param(("list", ["x"]), id="list"),
        pytest.param(("hash", {"foo": "bar"}), id="hash-without-state"),
        pytest.param(("hash", {"state": "CLAIMED", "token": "t"}), id="no-fingerprint"),
        pytest.param(("hash", {"state": "CLAIMED", "fp": FP, "token": "t"}), id="no-lease"),
        pytest.param(("hash", {"state": "SENT", "fp": FP, "lease": "x"}), id="bad-lease"),
    ],
)
async def test_redis_unreadable_record_is_alive_never_overwritten(
    redis_store: RedisStore, garbage: tuple[str, Any]
) -> None:
    client = redis_store.client
    key = _key()
    kind, value = garbage
    if kind == "string":
        await client.set(key, value)
    elif kind == "list":
        await client.rpush(key, *value)
    else:
        await client.hset(key, mapping=value)
    before = await client.dump(key)

    async def answers(call: Any) -> Any:
        try:
            return await call
        except StoreUnavailable:
            return "unavailable"

    result = await answers(_claim(redis_store, key, _token()))
    assert result == "unavailable" or result.kind is ClaimKind.IN_FLIGHT, result
    stranger = _token()
    assert await answers(redis_store.mark_sent(key, stranger, LEASE_MS)) in (False, "unavailable")
    assert await answers(redis_store.complete(key, stranger, RESPONSE)) in (False, "unavailable")
    assert await answers(redis_store.release(key, _token())) in (False, "unavailable")
    assert await client.dump(key) == before


# --------------------------------------------------------------------------- status checks

TARGET = "/v1/orders/ord-1/status"
CHECK_LEASE_MS = 5_000


async def _unknown_with_check(store: Store, key: str) -> str:
    token = _token()
    assert (await _claim(store, key, token)).kind is ClaimKind.CLAIMED
    assert await store.mark_sent(key, token, LEASE_MS, TARGET)
    assert await store.mark_unknown(key, token, 502, "reset")
    return token


async def _check(store: Store, key: str, token: str, max_checks: int = 3, min_age_ms: int = 0):  # type: ignore[no-untyped-def]
    return await store.claim_check(key, token, CHECK_LEASE_MS, max_checks, min_age_ms)


async def test_only_unknown_records_with_a_target_are_checked(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await _check(store, key, _token()) is None  # CLAIMED
    assert await store.mark_sent(key, owner, LEASE_MS, TARGET)
    # SENT belongs to its owner, who may still get a late answer: never checked.
    assert await _check(store, key, _token()) is None
    assert await store.mark_unknown(key, owner, 504, "timeout")
    assert isinstance(await _check(store, key, _token()), CheckClaim)
    plain = _key()
    await _unknown(store, plain)  # sent without a target: nothing to check
    assert await _check(store, plain, _token()) is None
    assert await _check(store, _key(), _token()) is None  # absent


async def test_one_checker_at_a_time_and_a_stale_one_is_fenced(store: Store) -> None:
    key = _key()
    await _unknown_with_check(store, key)
    first, second = _token(), _token()
    claimed = await _check(store, key, first)
    assert claimed == CheckClaim(TARGET, 1)
    busy = await _check(store, key, second)
    assert isinstance(busy, int) and 0 < busy <= CHECK_LEASE_MS
    assert not await store.finish_check(key, second, CheckResult.EXECUTED, RESPONSE, 0)
    record = await store.get(key)
    assert record is not None and record.state == "UNKNOWN" and record.checks == 1


async def test_executed_completes_with_the_checks_answer(store: Store) -> None:
    key, checker = _key(), _token()
    owner = await _unknown_with_check(store, key)
    await _check(store, key, checker)
    assert await store.finish_check(key, checker, CheckResult.EXECUTED, RESPONSE, 0)
    result = await _claim(store, key, _token())
    assert result.kind is ClaimKind.COMPLETED and result.response == RESPONSE
    record = await store.get(key)
    assert record is not None and record.reason == "status-check"
    assert record.response == RESPONSE
    # The old owner cannot change it any more, nor can the checker again.
    await store.complete(key, owner, StoredResponse(500))
    assert not await store.mark_unknown(key, owner, 504, "timeout")
    assert not await store.release(key, owner)
    assert not await store.finish_check(key, checker, CheckResult.NOT_EXECUTED, None, 0)
    assert await _check(store, key, _token()) is None


async def test_not_executed_releases_so_the_retry_executes(store: Store) -> None:
    key, checker = _key(), _token()
    await _unknown_with_check(store, key)
    await _check(store, key, checker)
    assert await store.finish_check(key, checker, CheckResult.NOT_EXECUTED, None, 0)
    assert await store.get(key) is None
    assert (await _claim(store, key, _token())).kind is ClaimKind.CLAIMED


async def test_dont_know_backs_off_and_stops_at_the_limit(store: Store) -> None:
    key = _key()
    await _unknown_with_check(store, key)
    for attempt in (1, 2):
        checker = _token()
        claimed = await _check(store, key, checker, max_checks=2)
        assert claimed == CheckClaim(TARGET, attempt)
        assert await store.finish_check(key, checker, CheckResult.UNKNOWN, None, 150)
        wait = await _check(store, key, _token(), max_checks=2)
        assert attempt == 2 or (isinstance(wait, int) and 0 < wait <= 150)
        await asyncio.sleep(0.3)
    assert await _check(store, key, _token(), max_checks=2) is None  # the limit
    record = await store.get(key)
    assert record is not None and record.state == "UNKNOWN" and record.checks == 2


async def test_a_young_record_is_not_checked_yet(store: Store) -> None:
    key = _key()
    await _unknown_with_check(store, key)
    wait = await _check(store, key, _token(), min_age_ms=60_000)
    assert isinstance(wait, int) and 50_000 < wait <= 60_000


async def test_an_operator_decision_fences_the_check(store: Store) -> None:
    key, checker = _key(), _token()
    await _unknown_with_check(store, key)
    await _check(store, key, checker)
    assert await store.resolve(key, RESPONSE, False)
    assert not await store.finish_check(key, checker, CheckResult.NOT_EXECUTED, None, 0)
    record = await store.get(key)
    assert record is not None and record.state == "COMPLETED" and record.reason == "resolved"


# --------------------------------------------------------------------------- wake-ups


@pytest.mark.parametrize("settle", ["complete", "mark_unknown", "release"])
async def test_a_waiter_is_woken_when_the_record_settles(store: Store, settle: str) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await store.mark_sent(key, owner, LEASE_MS)
    waiter = await store.claim(key, _token(), FP, LEASE_MS, RETENTION_MS, waiting=True)
    assert waiter.kind is ClaimKind.IN_FLIGHT
    woken = asyncio.ensure_future(store.settled(key, 10.0))
    await asyncio.sleep(0.3)  # subscribed by now (Redis: one subscription per store)
    assert not woken.done()
    started = time.monotonic()
    if settle == "complete":
        assert await store.complete(key, owner, RESPONSE)
    elif settle == "mark_unknown":
        assert await store.mark_unknown(key, owner, 502, "reset")
    else:
        assert await store.release(key, owner)
    assert await woken is True
    assert time.monotonic() - started < 2.0


async def test_without_a_notification_a_waiter_times_out_to_poll(store: Store) -> None:
    key, owner = _key(), _token()
    await _claim(store, key, owner)
    assert await store.mark_sent(key, owner, LEASE_MS)
    started = time.monotonic()
    assert await store.settled(key, 0.2) is False
    assert time.monotonic() - started >= 0.2
    # A renewal settles nothing: still no wake-up.
    assert await store.renew(key, owner, LEASE_MS)
    assert await store.settled(key, 0.1) is False


async def test_a_connection_that_timed_out_mid_command_never_answers_a_later_one(
    redis_factory: Any,
) -> None:
    """The lean pool's connections, on a real Redis frozen (SIGSTOP) with commands in
    flight: every command that times out leaves its connection, so after the thaw every
    reply read belongs to the command that asked for it. A connection kept with an unread
    reply would hand one request's answer to the next (a claim reading another's state)."""
    from proxy.store.pool import ConnectionPool

    redis = redis_factory()
    # The deadline covers connect and round trip: 0.1 s timed out a warm-up on a loaded
    # CI machine. Frozen commands still time out, whatever the deadline.
    pool = ConnectionPool(redis.url, timeout=0.5, retries=0, max_connections=4)
    try:

        async def echo(token: str) -> bool:
            replies = await pool.execute([("ECHO", token), ("ECHO", token + "-2")])
            assert replies == [token.encode(), (token + "-2").encode()], (token, replies)
            return True

        assert all(await asyncio.gather(*(echo(f"warm-{n}") for n in range(8))))
        for round_ in range(3):
            redis.pause()
            try:
                frozen = await asyncio.gather(
                    *(echo(f"frozen-{round_}-{n}") for n in range(8)), return_exceptions=True
                )
            finally:
                redis.resume()
            assert all(isinstance(result, TimeoutError) for result in frozen), frozen
            # The frozen commands' replies are on the wire now, to connections that left.
            await asyncio.sleep(0.1)
            assert all(await asyncio.gather(*(echo(f"after-{round_}-{n}") for n in range(32))))
    finally:
        await pool.aclose()


async def test_a_caller_waits_for_a_pooled_connection_no_longer_than_the_timeout(
    redis_factory: Any,
) -> None:
    """With Redis frozen and every connection taken, the callers queued behind them give up
    after one timeout each, as the one holding the connection does. Worked off one timeout
    after another, 10 callers on 1 connection at 0.3 s would end 3 s after they started,
    and a queue built during a stall would keep requests waiting for minutes."""
    from proxy.store.pool import ConnectionPool

    redis = redis_factory()
    pool = ConnectionPool(redis.url, timeout=0.3, retries=0, max_connections=1)
    try:
        assert await pool.execute([("PING",)]) == [b"PONG"]
        redis.pause()
        try:
            started = time.monotonic()

            async def given_up_after() -> float:
                with pytest.raises(TimeoutError):
                    await pool.execute([("PING",)])
                return time.monotonic() - started

            ends = await asyncio.gather(*(given_up_after() for _ in range(10)))
        finally:
            redis.resume()
        assert max(ends) < 1.5, ends
        await asyncio.sleep(0.1)
        assert await pool.execute([("PING",)]) == [b"PONG"]  # and the pool still works
    finally:
        await pool.aclose()


async def test_callers_that_waited_for_a_busy_pool_do_not_open_the_circuit(
    redis_factory: Any,
) -> None:
    """With Redis frozen, the one command holding the only connection times out: a store
    failure, counted by the breaker. The nine callers queued behind it time out waiting for
    the connection: 503s too, but a long local queue says nothing about Redis, and counting
    them would open the circuit for every request after a burst on a healthy store."""
    redis = redis_factory()
    store = RedisStore(
        StoreSettings(url=redis.url, timeout=0.3, retries=0, max_connections=1, breaker_threshold=3)
    )
    await store.start()
    try:
        redis.pause()
        try:
            results = await asyncio.gather(
                *(store.claim(f"busy-{n}", "owner", "fp", 10_000, 60_000) for n in range(10)),
                return_exceptions=True,
            )
        finally:
            redis.resume()
        assert all(isinstance(result, StoreUnavailable) for result in results), results
        assert not store.breaker.is_open
        await asyncio.sleep(0.1)
        assert (await store.claim("busy-after", "owner", "fp", 10_000, 60_000)).kind is (
            ClaimKind.CLAIMED
        )
    finally:
        await store.close()


async def test_the_pools_packing_round_trips_every_argument_type_the_store_sends(
    redis_factory: Any,
) -> None:
    """The lean pool packs RESP itself: str (also non-ASCII), bytes (empty, CRLF, NUL,
    larger than a socket buffer), int (negative, 0) arrive exactly as sent."""
    from proxy.store.pool import ConnectionPool

    redis = redis_factory()
    pool = ConnectionPool(redis.url, timeout=5, retries=0, max_connections=1)
    values: list[Any] = ["k€y", b"", b"\r\n$3\r\n*1\0", b"x" * 300_000, 0, -7, 86_400_000]
    try:
        for value in values:
            replies = await pool.execute([("SET", "pack-test", value), ("GET", "pack-test")])
            expected = value.encode() if isinstance(value, str) else value
            if isinstance(value, int):
                expected = str(value).encode()
            assert replies == [b"OK", expected]
        with pytest.raises(TypeError):
            await pool.execute([("SET", "pack-test", 1.5)])
    finally:
        await pool.aclose()
