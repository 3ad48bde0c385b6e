"""Where records live: Redis for replicas that share them, memory for one process."""

from __future__ import annotations

from proxy.store.base import CorruptRecord, Store, StoreUnavailable


def open_store(url: str, **options: object) -> Store:
    """The store named by `url` (`memory://`, `redis://`, `rediss://`, `redis+sentinel://`, `redis+cluster://`)."""
    if url.startswith("memory://"):
        from proxy.store.memory import MemoryStore

        return MemoryStore()
    from proxy.store.redis import RedisStore

    return RedisStore(url, **options)  # type: ignore[arg-type]


__all__ = ["CorruptRecord", "Store", "StoreUnavailable", "open_store"]
