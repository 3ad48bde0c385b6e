"""Where records live: Redis for replicas that share them, memory for one process."""

from __future__ import annotations

from proxy.store.base import CorruptRecord, Store, StoreUnavailable


def open_store(url: str, **options: object) -> Store:
    """The store named by `url` (`memory://`, `redis://`, `rediss://`, `redis+sentinel://`, `redis+cluster://`)."""
    memory_max_entries = options.pop("memory_max_entries", None)
    memory_max_bytes = options.pop("memory_max_bytes", None)
    if url.startswith("memory://"):
        from proxy.store import memory

        return memory.MemoryStore(
            int(memory_max_entries or memory.DEFAULT_MAX_ENTRIES),  # type: ignore[call-overload]
            int(memory_max_bytes or memory.DEFAULT_MAX_BYTES),  # type: ignore[call-overload]
        )
    from proxy.store.redis import RedisStore

    return RedisStore(url, **options)  # type: ignore[arg-type]


__all__ = ["CorruptRecord", "Store", "StoreUnavailable", "open_store"]
