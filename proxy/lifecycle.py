"""The request's story on a protected route, in one place.

extract and validate the key -> scope it -> fingerprint -> claim -> (duplicate:
replay, 409, 422 or outcome-unknown) -> mark SENT -> forward -> record -> reply.

"Record" issues the write; the reply does not wait for its answer (the write goes on as
a tracked task), but the write reaches the store first (`_shielded`).

Every ambiguous case resolves towards "do not send again": the only failure that
releases a record is one where the backend provably never saw the request.

Longer than the other modules on purpose: the story is told in one place, so a reader
follows one request from claim to reply, including what happens when the store fails
after the backend answered (`_settle`) and while the backend works (lease renewal),
without leaving the file. What is not the story lives elsewhere: the reply type and
unrecorded forwarding in forwarding.py, every problem in problems.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TypeVar

from proxy import keys, logs, problems
from proxy.fingerprint import fingerprint
from proxy.forwarding import (
    Reply,
    forward_headers,
    forward_unrecorded,
    problem_reply,
    reply_from,
    target_of,
)
from proxy.metrics import Metrics
from proxy.outcome import Held, LateAnswers, silence_bounded
from proxy.problems import Problem
from proxy.records import ClaimKind, ClaimResult, StoredResponse
from proxy.replay import REPLAYED, ReplayCache, replay_headers, stored_headers
from proxy.request import ProxyRequest
from proxy.resolution import StatusChecker, render_target
from proxy.routes import Route
from proxy.store import CorruptRecord, Store, StoreUnavailable
from proxy.tracing import Tracing
from proxy.upstream import (
    NotSent,
    OutcomeUnknown,
    UpstreamClient,
    UpstreamResponse,
    response_headers,
)

logger = logging.getLogger("idempotency_proxy")
T = TypeVar("T")

# Owner tokens must be unique, not secret (they never leave the proxy and the store):
# a random per-process prefix and a counter, without a system call per request.
_TOKEN_PREFIX = secrets.token_hex(8)
_tokens = (f"{_TOKEN_PREFIX}.{n}" for n in itertools.count(1))

# What enforcement answers itself, without forwarding: in observe mode each of these is
# counted and the request forwarded instead.
_PROXY_ANSWERS = frozenset(
    {
        "replayed",
        "in_flight",
        "record_unreadable",
        "key_reused",
        "outcome_unknown",
        "replay_unavailable",
        "store_unavailable",
        "fenced",
        "key_missing",
        "key_invalid",
        "tenant_invalid",
        "body_invalid",
        "unsupported_media_type",
    }
)

# How long background completion keeps trying after the store failed at the end.
BACKGROUND_RETRY_SECONDS = 60.0
# With wake-ups, a waiting duplicate still claims again at least this often.
WAKE_POLL_SECONDS = 1.0


@dataclass(slots=True)
class _Attempt:
    """One owner's hold on a record while it forwards."""

    route: Route
    storage_key: str
    token: str
    lease_ms: int
    key_hash: str = ""
    # The status check's target for this request ('' without one), kept at mark_sent.
    check: str = ""
    renewal: asyncio.TimerHandle | None = None
    done: bool = False


class Lifecycle:
    """Claims, forwards and records requests on protected routes."""

    def __init__(
        self,
        store: Store,
        upstream: UpstreamClient,
        metrics: Metrics,
        *,
        tenant_header: str | None,
        cache: ReplayCache,
        date: Callable[[], bytes],
        hasher: keys.KeyHasher | None = None,
        tracing: Tracing | None = None,
        max_held_exchanges: int = 64,
        wake_waiters: bool = True,
    ) -> None:
        self.store = store
        self.hasher = hasher or keys.KeyHasher()
        self.upstream = upstream
        self.metrics = metrics
        self.tracing = tracing
        if tracing is not None:
            # Swapped once here, so that without tracing the hot path is the plain code.
            self.upstream = tracing.wrap(upstream)
            self.handle = self._traced_handle  # type: ignore[method-assign]
            self._timed = self._traced_timed  # type: ignore[method-assign]
        self.tenant_header = tenant_header.lower().encode("latin-1") if tenant_header else None
        self.cache = cache
        self.date = date
        # Forwards and completions run as tasks that outlive a client that hangs up;
        # shutdown waits for them.
        self.tasks: set[asyncio.Task[object]] = set()
        self.late = LateAnswers(max_held_exchanges, metrics)
        self.checker = StatusChecker(store, upstream, metrics)
        self.wake = wake_waiters

    # -- the story -------------------------------------------------------------------

    async def handle(
        self,
        request: ProxyRequest,
        route: Route,
        params: dict[str, str],
    ) -> Reply:
        if route.observe:
            return await self._observe(request, route, params)
        return await self._enforce(request, route, params)

    async def _traced_handle(
        self,
        request: ProxyRequest,
        route: Route,
        params: dict[str, str],
    ) -> Reply:
        """`handle` inside the request's span; its store and upstream calls are children."""
        tracing = self.tracing
        assert tracing is not None
        with tracing.request_span(request.method, route.name, request.headers) as span:
            try:
                reply = await Lifecycle.handle(self, request, route, params)
            except Problem as problem:
                reply = problem_reply(problem, problem.name.replace("-", "_"), self.date())
            reply.extra["trace_id"] = tracing.finish(
                span,
                outcome=reply.outcome,
                status=reply.status,
                replayed=REPLAYED in reply.headers,
                key_hash=reply.scoped.log_hash if reply.scoped else "",
            )
        return reply

    async def _enforce(
        self,
        request: ProxyRequest,
        route: Route,
        params: dict[str, str],
    ) -> Reply:
        key = keys.extract(request, route.key, params, route.required)
        if key is None:
            return await self._forward_unrecorded(request, route, "unprotected")
        scoped = self.hasher.scope(self._tenant(request), route.namespace, key)
        fp = fingerprint(request)

        cached = self.cache.get(scoped.storage_key)
        if cached is not None:
            reply = self._duplicate_of_completed(cached[0] == fp, cached[1])
        else:
            check = (
                render_target(route.status_check, key, params, request)
                if route.status_check is not None
                else ""
            )
            try:
                reply = await self._claim_and_execute(
                    request, route, scoped.storage_key, fp, scoped.log_hash, check
                )
            except CorruptRecord as exc:
                reply = self._unreadable(route, scoped.log_hash, exc)
        reply.scoped = scoped
        return reply

    async def _observe(
        self,
        request: ProxyRequest,
        route: Route,
        params: dict[str, str],
    ) -> Reply:
        """Observe mode: the request's story as enforcement tells it (first requests are
        claimed, forwarded and recorded), except that every answer enforcement would have
        made itself instead of forwarding is counted, logged, and replaced by forwarding the
        request unrecorded, as if the proxy were not there. Nothing is ever blocked here,
        also not by a store that is down."""
        try:
            would = await self._enforce(request, route, params)
        except Problem as problem:
            would = problem_reply(problem, problem.name.replace("-", "_"), self.date())
        # A reply that went upstream carries its upstream time; the proxy's own answers
        # (replays, 409, 422, 503, 400...) never went upstream and have none.
        if would.upstream_ms is not None or would.outcome not in _PROXY_ANSWERS:
            return would
        self.metrics.observe(route.name, would.outcome)
        reply = await self._forward_unrecorded(request, route, "observed")
        reply.scoped = would.scoped
        reply.store_ms = would.store_ms
        reply.extra["would"] = would.outcome
        status = would.status
        if would.problem is not None:  # the status the route's error format would have sent
            status = route.error_format.render(would.problem, [], request.request_id)[0]
        reply.extra["would_status"] = status
        return reply

    async def _claim_and_execute(
        self,
        request: ProxyRequest,
        route: Route,
        storage_key: str,
        fp: str,
        key_hash: str = "",
        check: str = "",
    ) -> Reply:
        token = next(_tokens)
        lease_ms = route.lease_ms
        started = time.perf_counter()
        try:
            claim = await self._claim(route, storage_key, token, fp, lease_ms)
        except CorruptRecord:
            raise  # no outage: answered by `handle`, and never forwarded unrecorded
        except StoreUnavailable:
            if route.fail_open:
                reply = await self._forward_unrecorded(request, route, "fail_open")
            else:
                reply = problem_reply(
                    problems.store_unavailable(), "store_unavailable", self.date()
                )
            # A call that timed out is store time too: the log line says where it went.
            reply.store_ms = (time.perf_counter() - started) * 1000
            return reply
        store_ms = (time.perf_counter() - started) * 1000
        if claim.kind is ClaimKind.CLAIMED:
            self.metrics.transition("CLAIMED")
            attempt = _Attempt(route, storage_key, token, lease_ms, key_hash, check)
            reply = await self._shielded(self._execute(attempt, request, fp))
        else:
            reply = self._duplicate(claim, storage_key, fp)
            if claim.kind is ClaimKind.UNKNOWN:
                # Any replica that meets an UNKNOWN record may check it (the store lets
                # one at a time, when due): also the records of owners that died.
                self.checker.soon(route, storage_key, key_hash)
        reply.store_ms += store_ms
        return reply

    async def _claim(
        self, route: Route, storage_key: str, token: str, fp: str, lease_ms: int
    ) -> ClaimResult:
        """Claim once; on an `in_flight: wait` route, keep claiming with the same token until
        the first request finishes or `wait_timeout` passes. A record released meanwhile is
        claimed by the waiter, which then executes as a retry would."""
        policy = route.policy
        retention_ms = route.retention_ms
        waiting = policy.in_flight == "wait"
        deadline = time.monotonic() + policy.wait_timeout
        delay = 0.02
        while True:
            if waiting and self.wake:  # the settling transition must wake this waiter
                call = self.store.claim(
                    storage_key, token, fp, lease_ms, retention_ms, waiting=True
                )
            else:
                call = self.store.claim(storage_key, token, fp, lease_ms, retention_ms)
            claim = await self._timed("claim", call)
            if claim.kind is not ClaimKind.IN_FLIGHT or not waiting or route.observe:
                return claim
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return claim
            pause = min(delay, remaining, max(claim.retry_after_ms, 1) / 1000)
            if self.wake:
                # Woken when the record settles, on whichever replica; polling only as
                # the fallback for a lost notification, so it can be slow.
                await self.store.settled(storage_key, pause)
                delay = min(delay * 2, WAKE_POLL_SECONDS)
            else:
                # Poll gently: a waiting duplicate must not hammer the store.
                await asyncio.sleep(pause)
                delay = min(delay * 2, 0.25)

    def _tenant(self, request: ProxyRequest) -> str | None:
        """The request's tenant; None for a request without the tenant header, which is a
        scope of its own (never `default`, never the one of an empty value)."""
        if self.tenant_header is None:
            return keys.DEFAULT_TENANT
        values = request.header_values(self.tenant_header)
        if not values:
            return None
        if len(values) > 1:
            # A client's line plus the auth layer's appended one: using either could let a
            # client pick whose records it sees, so refuse instead of choosing.
            raise problems.tenant_invalid("the tenant header was sent more than once")
        if not values[0].strip(b" \t"):
            # An auth layer that sets the header always gives it a value; an empty one is a
            # broken layer or a client probing for the anonymous scope.
            raise problems.tenant_invalid("the tenant header is empty")
        return values[0].decode("latin-1")

    # -- duplicates ------------------------------------------------------------------

    def _unreadable(self, route: Route, log_hash: str, exc: CorruptRecord) -> Reply:
        """A record that cannot be read is alive (the contract): 409, left as it is, and
        told to an operator, who alone can decide what it was."""
        self.metrics.corrupt_records.inc()
        logger.error(
            "unreadable record: answered as in progress and left as it is",
            extra={"key_hash": log_hash, "route": route.name, "reason": str(exc)},
        )
        problem = problems.record_unreadable(max(1, math.ceil(route.lease_ms / 1000)))
        return problem_reply(problem, "record_unreadable", self.date())

    def _duplicate(self, claim: ClaimResult, storage_key: str, fp: str) -> Reply:
        date = self.date()
        if claim.kind is ClaimKind.MISMATCH:
            return problem_reply(problems.key_reused(), "key_reused", date)
        if claim.kind is ClaimKind.IN_FLIGHT:
            retry_after = max(1, math.ceil(claim.retry_after_ms / 1000))
            return problem_reply(problems.in_progress(retry_after), "in_flight", date)
        if claim.kind is ClaimKind.UNKNOWN:
            status = claim.response.status if claim.response else 502
            problem = problems.outcome_unknown(status, claim.reason or "unknown")
            return problem_reply(problem, "outcome_unknown", date, replayed=True)
        assert claim.response is not None
        if claim.response.replayable:
            self.cache.put(storage_key, fp, claim.response, claim.ttl_ms)
        return self._duplicate_of_completed(True, claim.response)

    def _duplicate_of_completed(self, same_request: bool, response: StoredResponse) -> Reply:
        if not same_request:
            return problem_reply(problems.key_reused(), "key_reused", self.date())
        if not response.replayable:
            return problem_reply(problems.replay_unavailable(), "replay_unavailable", self.date())
        self.metrics.replayed_bytes.inc(len(response.body))
        return Reply(response.status, replay_headers(response), response.body, outcome="replayed")

    # -- the owner's path ------------------------------------------------------------

    async def _shielded(self, work: Coroutine[object, object, Reply]) -> Reply:
        """Run the owner's work as a task a client disconnect cannot cancel.

        A recording the work started just before it ended (`_record`) takes its first
        step, in which its bytes go to the store, before this returns: that step was
        queued before the work's task ended, and the end reaches this caller through the
        shield a loop turn later. So the store gets the write before the client gets the
        reply. A write that has to wait (for a free pooled connection) may come after the
        reply: safe too, the record stays SENT under this owner's token until it lands."""
        return await asyncio.shield(self._spawn(work))

    def _spawn(self, work: Coroutine[object, object, T]) -> asyncio.Task[T]:
        """Run `work` as a task that shutdown waits for."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _execute(
        self,
        attempt: _Attempt,
        request: ProxyRequest,
        fp: str,
    ) -> Reply:
        route, key, token = attempt.route, attempt.storage_key, attempt.token
        policy = route.policy
        date = self.date()
        store_started = time.perf_counter()
        try:
            sent = await self._timed(
                "mark_sent", self.store.mark_sent(key, token, attempt.lease_ms, attempt.check)
            )
        except StoreUnavailable:
            failed_ms = (time.perf_counter() - store_started) * 1000
            # Nothing was sent, but the mark may have been applied before its answer was
            # lost: release the record (now or in the background) so that a retry executes
            # instead of waiting for an operator.
            await self._settle("release", attempt, lambda: self.store.release(key, token))
            reply = problem_reply(problems.store_unavailable(), "store_unavailable", date)
            reply.store_ms = failed_ms
            return reply
        store_ms = (time.perf_counter() - store_started) * 1000
        if not sent:
            self.metrics.fence("mark_sent")
            return problem_reply(problems.in_progress(1), "fenced", date)
        self.metrics.transition("SENT")

        self._schedule_renewal(attempt)
        self.metrics.in_flight.inc()
        upstream_started = time.perf_counter()
        wait = policy.outcome_wait
        # One exchange, whose own deadline includes the outcome wait: the client's timeout
        # only stops waiting for it here (proxy.outcome).
        exchange = self.late.start(
            self.upstream.send(
                request.method,
                target_of(request),
                forward_headers(request),
                request.body,
                timeout=policy.upstream_timeout + wait,
                read_limit=policy.max_stored_response,
            )
        )
        try:
            response = await self.late.answer(exchange, policy.upstream_timeout, wait)
        except Held as held:
            # The lease keeps being renewed: the record stays SENT while the proxy listens.
            self._spawn(self._follow_late(attempt, held.exchange, fp))
            reply = problem_reply(problems.outcome_pending(wait), "outcome_unknown", self.date())
            return _timed_reply(reply, upstream_started, store_ms)
        except NotSent as exc:
            self._stop_renewal(attempt)
            await self._settle("release", attempt, lambda: self.store.release(key, token))
            reply = problem_reply(
                problems.upstream_unreachable(
                    f"the backend refused or could not take the connection ({exc}); nothing was "
                    "sent and the key is free for a retry"
                ),
                "upstream_unreachable",
                self.date(),
            )
            return _timed_reply(reply, upstream_started, store_ms)
        except OutcomeUnknown as exc:
            self._stop_renewal(attempt)
            status, reason = exc.status, exc.reason
            await self._settle(
                "mark_unknown",
                attempt,
                lambda: self.store.mark_unknown(key, token, status, reason),
            )
            self.checker.soon(route, key, attempt.key_hash)
            reply = problem_reply(
                problems.outcome_unknown(exc.status, exc.reason), "outcome_unknown", self.date()
            )
            return _timed_reply(reply, upstream_started, store_ms)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.upstream_call(route.name, time.perf_counter() - upstream_started)
        self._stop_renewal(attempt)
        headers = response_headers(response.headers)
        # Record, then reply: the write reaches the store before the reply reaches the
        # client (`_shielded`), and goes on as a tracked task while the reply goes out.
        outcome, recording = self._record(attempt, response, headers, fp)
        if response.rest is not None and wait > 0:
            response.rest = silence_bounded(response.rest, policy.upstream_timeout)
        reply = _timed_reply(reply_from(response, headers, outcome), upstream_started, store_ms)
        if self.store.waits_for_replicas:
            # store.wait_replicas: the record is on a replica before the client has its answer.
            await asyncio.wait({recording})
        return reply

    def _record(
        self,
        attempt: _Attempt,
        response: UpstreamResponse,
        headers: list[tuple[bytes, bytes]],
        fp: str,
        how: str = "",
    ) -> tuple[str, asyncio.Task[bool]]:
        """Store the backend's answer for replays (or release the record for a
        `release_statuses` status); the same for an on-time and a late answer.

        Started, not awaited: the caller answers its client while the write goes on. As a
        tracked task it goes on when the client hangs up, shutdown waits for it, and
        `_settle` retries it in the background when the store fails."""
        route, key, token = attempt.route, attempt.storage_key, attempt.token
        policy = route.policy
        if response.status in policy.release_statuses:
            release = self._settle("release", attempt, lambda: self.store.release(key, token))
            return "released", self._spawn(release)
        if response.complete and len(response.body) <= policy.max_stored_response:
            stored = StoredResponse(
                response.status, stored_headers(headers, route.replay_headers), response.body
            )
        else:
            stored = StoredResponse(response.status, replayable=False)
        return "forwarded", self._spawn(self._complete(attempt, stored, fp, how))

    async def _complete(self, attempt: _Attempt, stored: StoredResponse, fp: str, how: str) -> bool:
        key, token = attempt.storage_key, attempt.token
        completed = await self._settle(
            "complete", attempt, lambda: self.store.complete(key, token, stored, how)
        )
        # Replayed from this process only once the store took it: a fenced completion never.
        if completed and stored.replayable:
            self.cache.put(key, fp, stored, attempt.route.retention_ms)
        return completed

    async def _follow_late(
        self, attempt: _Attempt, exchange: asyncio.Future[UpstreamResponse], fp: str
    ) -> None:
        """After the client got its 504: record the late answer like an on-time one, or
        turn the record UNKNOWN when the exchange breaks, the wait runs out or shutdown
        abandons it. (If this process dies, the lease runs out: UNKNOWN as well.)"""
        key, token = attempt.storage_key, attempt.token
        await asyncio.wait({exchange})
        try:
            try:
                response = exchange.result()
            except NotSent:
                # Still connecting when the client's timeout fired: nothing was sent.
                await self._settle("release", attempt, lambda: self.store.release(key, token))
                self._resolved(attempt, "released", "not sent")
                return
            except (OutcomeUnknown, asyncio.CancelledError) as exc:
                reason = exc.reason if isinstance(exc, OutcomeUnknown) else "timeout"
                status = 504 if reason == "timeout" else 502
                await self._settle(
                    "mark_unknown",
                    attempt,
                    lambda: self.store.mark_unknown(key, token, status, reason),
                )
                result = "abandoned" if isinstance(exc, asyncio.CancelledError) else reason
                self._resolved(attempt, "unknown", result)
                self.checker.soon(attempt.route, key, attempt.key_hash)
                return
            try:
                headers = response_headers(response.headers)
                outcome, recording = self._record(attempt, response, headers, fp, "late-answer")
                await recording
            finally:
                response.close()
            result = "released" if outcome == "released" else "executed"
            self._resolved(attempt, result, str(response.status))
        finally:
            self._stop_renewal(attempt)

    def _resolved(self, attempt: _Attempt, result: str, detail: str) -> None:
        self.metrics.resolution("late_answer", result)
        logger.info(
            "late answer: %s",
            result,
            extra={
                "route": attempt.route.name,
                "key_hash": attempt.key_hash,
                "result": result,
                "detail": detail,
            },
        )

    async def _forward_unrecorded(
        self,
        request: ProxyRequest,
        route: Route,
        outcome: str,
    ) -> Reply:
        """Forward without a record: no key on an optional route, or a fail-open route
        whose store is down."""
        return await forward_unrecorded(
            self.upstream,
            request.method,
            target_of(request),
            forward_headers(request),
            request.body,
            timeout=route.policy.upstream_timeout,
            outcome=outcome,
        )

    # -- store calls that must not be lost -------------------------------------------

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        failed = True
        try:
            result = await call
            failed = False
            return result
        finally:
            self.metrics.store_call(operation, time.perf_counter() - started, failed)

    async def _traced_timed(self, operation: str, call: Awaitable[T]) -> T:
        assert self.tracing is not None
        with self.tracing.store_span(operation):
            return await Lifecycle._timed(self, operation, call)

    async def _settle(
        self, operation: str, attempt: _Attempt, call: Callable[[], Awaitable[bool]]
    ) -> bool:
        """Record the outcome; if the store is down, keep trying in the background.

        The client still gets the real answer: losing the store after the backend
        answered must not turn a success into an error. Every try is safe to repeat,
        because the scripts recognise the owner's token.
        """
        try:
            ok = bool(await self._timed(operation, call()))
        except Exception as exc:  # a store failure of any kind: the answer still goes out
            logger.warning(
                "store unavailable; recording the outcome in the background",
                extra={
                    "operation": operation,
                    "route": attempt.route.name,
                    "reason": logs.describe(exc),
                },
            )
            self._spawn(self._retry_later(operation, attempt, call))
            return False
        self._note(operation, attempt, ok)
        return ok

    def _note(self, operation: str, attempt: _Attempt, ok: bool) -> None:
        if ok:
            to = {"complete": "COMPLETED", "mark_unknown": "UNKNOWN", "release": "released"}
            self.metrics.transition(to.get(operation, operation))
            return
        self.metrics.fence(operation)
        logger.warning(
            "fenced: another owner holds the record, or it left the state this owner expected",
            extra={"operation": operation, "route": attempt.route.name},
        )

    async def _retry_later(
        self, operation: str, attempt: _Attempt, call: Callable[[], Awaitable[bool]]
    ) -> None:
        deadline = time.monotonic() + BACKGROUND_RETRY_SECONDS
        delay = 0.1
        reason = ""
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                ok = bool(await self._timed(operation, call()))
            except Exception as exc:  # whatever the store raised, this task must not die of it
                reason = logs.describe(exc)
                continue
            self._note(operation, attempt, ok)
            return
        logger.error(
            "gave up recording an outcome; the record will turn UNKNOWN when its lease expires",
            extra={"operation": operation, "route": attempt.route.name, "reason": reason},
        )

    # -- lease renewal ---------------------------------------------------------------

    def _schedule_renewal(self, attempt: _Attempt) -> None:
        """Renew at a third of the lease, so a slow backend never looks like a dead owner.

        A timer, not a task: most requests finish long before the first renewal.
        """
        loop = asyncio.get_running_loop()
        attempt.renewal = loop.call_later(attempt.lease_ms / 3000, self._renew_soon, attempt)

    def _renew_soon(self, attempt: _Attempt) -> None:
        if attempt.done:
            return
        self._spawn(self._renew(attempt))

    async def _renew(self, attempt: _Attempt) -> None:
        try:
            ok = await self._timed(
                "renew", self.store.renew(attempt.storage_key, attempt.token, attempt.lease_ms)
            )
        except Exception:  # any store failure: try again at the next tick; the lease may hold
            ok = True
        if not ok:
            self.metrics.fence("renew")
            return
        if not attempt.done:
            self._schedule_renewal(attempt)

    def _stop_renewal(self, attempt: _Attempt) -> None:
        attempt.done = True
        if attempt.renewal is not None:
            attempt.renewal.cancel()


def _timed_reply(reply: Reply, upstream_started: float, store_ms: float) -> Reply:
    reply.upstream_ms = (time.perf_counter() - upstream_started) * 1000
    reply.store_ms += store_ms
    return reply
