"""Is the store safe for records? Eviction, persistence and replication, checked at start-up
and by `idempotency-proxy check-store`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from proxy.config import ConfigError, Settings
from proxy.store import Store, StoreUnavailable

logger = logging.getLogger("idempotency_proxy")


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str  # "ok" | "warning"
    message: str


def assess(info: dict[str, Any]) -> list[Finding]:
    """Findings from CONFIG GET maxmemory-policy and INFO persistence/replication."""
    findings: list[Finding] = []
    config = {_s(k): _s(v) for k, v in (info.get("config") or {}).items()}
    policy = config.get("maxmemory-policy", "unknown")
    if policy == "noeviction":
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
