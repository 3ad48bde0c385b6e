"""Where records live: Redis for replicas that share them, memory for one process."""

from __future__ import annotations

from proxy.config import StoreSettings
from proxy.store.base import CorruptRecord, Store, StoreUnavailable


def open_store(settings: StoreSettings, *, safe_mode_seconds: float | None = None) -> Store:
    """The store `settings.url` names (`memory://`, `redis://`, `rediss://`,
    `redis+sentinel://`, `redis+cluster://`); `safe_mode_seconds`: see `RedisStore`."""
    if settings.url.startswith("memory://"):
        from proxy.store.memory import MemoryStore

        return MemoryStore(settings.memory_max_entries, settings.memory_max_bytes)
    from proxy.store.redis import RedisStore

    return RedisStore(settings, safe_mode_seconds=safe_mode_seconds)


__all__ = ["CorruptRecord", "Store", "StoreUnavailable", "open_store"]
