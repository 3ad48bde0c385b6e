"""Is the store safe for records? Eviction, persistence and replication, checked at start-up
and by `idempotency-proxy check-store`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError, ResponseError

from proxy.config import ConfigError, Settings, StoreSettings
from proxy.records import StoredResponse
from proxy.store import Store, StoreUnavailable

logger = logging.getLogger("idempotency_proxy")


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  # "ok" | "info" | "warning" (only warnings are unsafe)
    message: str


def assess(info: dict[str, Any]) -> list[Finding]:
    """Findings from CONFIG GET maxmemory-policy and INFO persistence/replication."""
    findings: list[Finding] = []
    config = {_s(k): _s(v) for k, v in (info.get("config") or {}).items()}
    policy = config.get("maxmemory-policy", "unknown")
    if "config" not in info:
        pass  # not readable (a minimal ACL denies CONFIG GET): the caller says so
    elif policy == "noeviction":
        findings.append(Finding("ok", "maxmemory-policy is noeviction"))
    else:
        findings.append(
            Finding(
                "warning",
                f"maxmemory-policy is {policy}: Redis may evict idempotency records under "
                "memory pressure and a duplicate would execute again; set noeviction",
            )
        )
    persistence = {_s(k): v for k, v in (info.get("persistence") or {}).items()}
    aof = str(persistence.get("aof_enabled", "0")) == "1"
    if aof:
        findings.append(Finding("ok", "AOF persistence is on"))
    else:
        findings.append(
            Finding(
                "warning",
                "AOF persistence is off: a Redis restart loses records written since the "
                "last snapshot (or all of them); set appendonly yes",
            )
        )
    replication = {_s(k): v for k, v in (info.get("replication") or {}).items()}
    replicas = int(replication.get("connected_slaves", 0) or 0)
    findings.append(Finding("ok", f"role {replication.get('role', '?')}, {replicas} replica(s)"))
    return findings


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_store(store: Store, settings: Settings) -> list[Finding]:
    """Log what is unsafe; refuse to start when `store.require_safe` is set."""
    server_info = getattr(store, "server_info", None)
    if server_info is None:
        return []
    try:
        findings = assess(await server_info())
    except StoreUnavailable as exc:
        logger.warning("could not check the store's settings", extra={"reason": str(exc)})
        return []
    except Exception as exc:  # a managed Redis may refuse CONFIG GET
        logger.warning("could not check the store's settings", extra={"reason": str(exc)})
        return []
    unsafe = [f for f in findings if f.severity == "warning"]
    for finding in unsafe:
        logger.warning(finding.message)
    if unsafe and settings.store.require_safe:
        raise ConfigError("store.require_safe: " + unsafe[0].message)
    return findings


def connection_findings(store: StoreSettings) -> list[Finding]:
    """How the proxy talks to Redis: TLS and authentication, as configured."""
    findings: list[Finding] = []
    tls = store.tls
    if store.tls_on:
        verified = (
            f"certificate verified against {tls.ca_file or 'the system trust store'}"
            if tls.verify
            else "certificate NOT verified (tls.verify: false)"
        )
        hostname = ", host name checked" if tls.check_hostname else ", host name not checked"
        client = ", client certificate sent" if tls.cert_file else ""
        findings.append(Finding("ok", f"TLS on: {verified}{hostname}{client}"))
        if not tls.verify:
            findings.append(
                Finding("warning", "TLS without verification accepts any server (tls.verify)")
            )
    else:
        findings.append(Finding("info", "TLS off: records and credentials travel in clear text"))
    url_has_password = bool(urlsplit(store.url).password) if "://" in store.url else False
    if store.username:
        findings.append(Finding("ok", f"authenticated as ACL user {store.username!r}"))
    elif store.password or url_has_password:
        findings.append(Finding("ok", "authenticated with a password (the default user)"))
    else:
        findings.append(Finding("info", "no authentication configured"))
    if store.url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        who = store.sentinel.username or ("password" if store.sentinel.password else None)
        findings.append(
            Finding(
                "ok" if who else "info",
                f"sentinels: authenticated ({who})" if who else "sentinels: no authentication",
            )
        )
    return findings


async def read_server_info(store: Any) -> tuple[dict[str, Any], list[Finding]]:
    """What `assess` reads, piece by piece: a minimal ACL may deny CONFIG GET and the
    rest is still worth reporting."""
    client = store.client
    info: dict[str, Any] = {}
    denied: list[Finding] = []
    reads: tuple[tuple[str, str, Callable[[], Awaitable[Any]]], ...] = (
        ("config", "CONFIG GET", lambda: client.config_get("maxmemory-policy")),
        ("persistence", "INFO", lambda: client.info("persistence")),
        ("replication", "INFO", lambda: client.info("replication")),
    )
    for name, command, read in reads:
        try:
            info[name] = await read()
        except ResponseError as exc:
            denied.append(
                Finding(
                    "info",
                    f"cannot read {name} ({command}: {_first_line(exc)}); check it in the "
                    "provider's console or grant it to this user (docs/operations.md)",
                )
            )
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return info, denied


async def probe_commands(store: Any) -> list[Finding]:
    """Run every script and read the proxy uses on a throwaway probe record, so that an ACL
    which lacks a command shows here and not as 503s under traffic."""
    key = f"idem:{{check-store-{secrets.token_hex(8)}}}"
    token = "check-store"
    response = StoredResponse(200, ((b"content-type", b"text/plain"),), b"probe")
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("claim", lambda: store.claim(key, token, "probe", 10_000, 60_000)),
        ("mark_sent", lambda: store.mark_sent(key, token, 10_000)),
        ("renew", lambda: store.renew(key, token, 10_000)),
        ("mark_unknown", lambda: store.mark_unknown(key, token, 504, "probe")),
        ("resolve", lambda: store.resolve(key, response, False)),
        ("get", lambda: store.get(key)),
        ("discard", lambda: store.discard(key, True)),
        ("claim", lambda: store.claim(key, token, "probe", 10_000, 60_000)),
        ("complete", lambda: store.complete(key, token, response)),
        ("discard", lambda: store.discard(key, True)),
        # A lease of 1 ms, expired by the next claim: the take-over path (HINCRBY).
        ("claim", lambda: store.claim(key, token, "probe", 1, 60_000)),
        (
            "take-over claim",
            lambda: _later(store.claim(key, token + "-2", "probe", 10_000, 60_000)),
        ),
        ("release", lambda: store.release(key, token + "-2")),
        ("canary", lambda: store.check_canary()),
    ]
    for step, call in steps:
        try:
            await call()
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, ResponseError):
                with contextlib.suppress(Exception):
                    await store.discard(key, True)
                return [Finding("warning", f"ACL: {step} refused: {_denied(step, cause)}")]
            raise
        except ResponseError as exc:
            return [Finding("warning", f"ACL: {step} refused: {_denied(step, exc)}")]
    return [Finding("ok", "ACL: every command the proxy uses is allowed (probe record)")]


_SCRIPT_LINE = re.compile(r"@user_script:(\d+)")
_CALL = re.compile(r"redis\.call\('(\w+)'")


def _denied(step: str, error: ResponseError) -> str:
    """Redis names only the script's line of a command an ACL denies inside a script;
    the command on that line is what the operator has to grant."""
    message = _first_line(error)
    line = _SCRIPT_LINE.search(message)
    script = step.split()[-1] if step != "get" else ""
    if line and script:
        from proxy.store.redis import _source

        lines = _source(script).splitlines()
        number = int(line.group(1))
        call = _CALL.search(lines[number - 1]) if 0 < number <= len(lines) else None
        if call:
            return f"the ACL denies {call.group(1).lower()} (used by the {script} script)"
    return message


async def _later(call: Awaitable[object]) -> object:
    await asyncio.sleep(0.01)
    return await call


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
