"""The status check: asking the backend whether an UNKNOWN request was executed.

A route may name a read-only request (`status_check`) whose answer tells whether the
operation behind an UNKNOWN record happened. Its target is rendered when the
request is marked SENT and kept in the record, so any replica can check later,
also when the owner died. A check is claimed and fenced in the store
(`check_claim.lua`, `check_done.lua`), so one replica checks a record at a time,
and only UNKNOWN records are checked: a SENT record still belongs to its owner,
who may yet get a late answer (proxy/outcome.py).

Only "not executed" releases the record (the retry then executes once);
"executed" completes it with the check's answer; anything else leaves it UNKNOWN
and tries again after a backoff, up to `max_checks`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, quote

from proxy.config import StatusCheck
from proxy.metrics import Metrics
from proxy.records import CheckClaim, CheckResult, StoredResponse
from proxy.request import InvalidJSON, ProxyRequest, is_json
from proxy.routes import Route
from proxy.store import Store, StoreUnavailable
from proxy.upstream import NotSent, OutcomeUnknown, UpstreamClient

logger = logging.getLogger("idempotency_proxy")

_PLACEHOLDER = re.compile(r"{([^{}]*)}")
_TOKEN_PREFIX = "check." + secrets.token_hex(8)
_tokens = (f"{_TOKEN_PREFIX}.{n}" for n in itertools.count(1))
# Marks a replay whose answer came from the status check, not from the original exchange.
RECONCILED = (b"idempotent-reconciled", b"true")
# A check that is not due for longer than this is left to whichever replica next sees
# a duplicate, rather than kept as a sleeping task here.
_LONGEST_SLEEP = 600.0


def render_target(
    check: StatusCheck, key: str, params: dict[str, str], request: ProxyRequest
) -> str:
    """The check's target for this request; '' when a placeholder has no value (then
    the record cannot be checked, and an operator resolves it as before)."""
    body: dict[str, Any] | None = None
    out: list[str] = []
    last = 0
    for match in _PLACEHOLDER.finditer(check.path):
        name = match.group(1)
        if name == "key":
            value: object = key
        elif name in params:
            value = params[name]
        else:
            if body is None:
                body = _body_fields(request)
            value = body.get(name)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            return ""
        out.append(check.path[last : match.start()])
        out.append(quote(str(value), safe=""))
        last = match.end()
    out.append(check.path[last:])
    return "".join(out)


def _body_fields(request: ProxyRequest) -> dict[str, Any]:
    try:
        if is_json(request.media_type):
            data = request.json()
            return data if isinstance(data, dict) else {}
        if request.media_type == "application/x-www-form-urlencoded":
            form = parse_qs(request.body.decode("utf-8"), keep_blank_values=True)
            return {k: v[0] for k, v in form.items() if len(v) == 1}
    except (InvalidJSON, UnicodeDecodeError):
        pass
    return {}


class StatusChecker:
    """Runs status checks for UNKNOWN records this process learns about."""

    def __init__(self, store: Store, upstream: UpstreamClient, metrics: Metrics) -> None:
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.pending: dict[str, asyncio.Task[None]] = {}
        self.stopped = False

    def soon(self, route: Route, storage_key: str, key_hash: str) -> None:
        """Check this record when it is due (at once if it is), unless this process
        already follows it. The store decides whether there is anything to check."""
        if route.status_check is None or storage_key in self.pending or self.stopped:
            return
        task = asyncio.ensure_future(self._follow(route, route.status_check, storage_key, key_hash))
        self.pending[storage_key] = task
        task.add_done_callback(lambda _: self.pending.pop(storage_key, None))

    def stop(self) -> None:
        """Shutdown: a check in progress is simply not finished; its claim in the store
        runs out and another replica checks the record."""
        self.stopped = True
        for task in list(self.pending.values()):
            task.cancel()

    async def _follow(
        self, route: Route, check: StatusCheck, storage_key: str, key_hash: str
    ) -> None:
        lease_ms = int((check.timeout + 5.0) * 1000)
        min_age_ms = int(check.after * 1000)
        while True:
            token = next(_tokens)
            try:
                claim = await self.store.claim_check(
                    storage_key, token, lease_ms, check.max_checks, min_age_ms
                )
            except StoreUnavailable:
                return  # the next duplicate tries again
            if claim is None:
                return
            if isinstance(claim, int):
                wait = claim / 1000 + 0.01
                if wait > _LONGEST_SLEEP:
                    return
                await asyncio.sleep(wait)
                continue
            result = await self._check_once(route, check, storage_key, key_hash, token, claim)
            if result is not CheckResult.UNKNOWN:
                return

    async def _check_once(
        self,
        route: Route,
        check: StatusCheck,
        storage_key: str,
        key_hash: str,
        token: str,
        claim: CheckClaim,
    ) -> CheckResult | None:
        result, response, detail = await self._ask(route, check, claim.target)
        backoff_ms = int(check.backoff * 1000 * 2 ** (claim.attempt - 1))
        try:
            applied = await self.store.finish_check(
                storage_key, token, result, response, backoff_ms
            )
        except StoreUnavailable:
            # The claim runs out and the check is made again: it is read-only.
            return None
        if not applied:
            self.metrics.fence("finish_check")
            return None
        label = result.value
        if result is CheckResult.UNKNOWN and claim.attempt >= check.max_checks:
            label = "gave_up"
        self.metrics.resolution("status_check", label)
        log = logger.warning if label == "gave_up" else logger.info
        log(
            "status check: %s",
            label,
            extra={
                "route": route.name,
                "key_hash": key_hash,
                "result": label,
                "attempt": claim.attempt,
                "detail": detail,
            },
        )
        return result

    async def _ask(
        self, route: Route, check: StatusCheck, target: str
    ) -> tuple[CheckResult, StoredResponse | None, str]:
        try:
            response = await self.upstream.send(
                check.method,
                target,
                [(b"accept", b"application/json")],
                b"",
                timeout=check.timeout,
                read_limit=route.policy.max_stored_response,
            )
        except (NotSent, OutcomeUnknown) as exc:
            return CheckResult.UNKNOWN, None, type(exc).__name__
        try:
            status = response.status
            if status in check.executed:
                headers = [(k, v) for k, v in response.headers if k == b"content-type"]
                body = response.body if response.complete else b""
                stored = StoredResponse(check.replay_status or status, (*headers, RECONCILED), body)
                return CheckResult.EXECUTED, stored, str(status)
            if status in check.not_executed:
                return CheckResult.NOT_EXECUTED, None, str(status)
            return CheckResult.UNKNOWN, None, str(status)
        finally:
            response.close()
