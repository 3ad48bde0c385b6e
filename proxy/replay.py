"""What a duplicate receives: the stored response, or the problem that stands in for it.

Replays keep the allow-listed headers and the raw (still encoded) body bytes,
get a fresh Date and a correct Content-Length, and never carry hop-by-hop
headers, Set-Cookie or the original request id.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from email.utils import formatdate

from proxy.records import Headers, StoredResponse
from proxy.upstream import HOP_BY_HOP

REPLAYED = (b"idempotent-replayed", b"true")
# Never replayed, even when a route lists them: the contract forbids Set-Cookie and the
# original request id, and the replay sets its own Date, Content-Length and marker.
_NEVER_REPLAYED = HOP_BY_HOP | {
    b"set-cookie",
    b"x-request-id",
    b"date",
    b"content-length",
    REPLAYED[0],
}
# RFC 9110 §8.6: no Content-Length in a 204; a 304's would describe the absent body.
_NO_CONTENT_LENGTH = frozenset({204, 304})

_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current IMF-fixdate, formatted at most once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def stored_headers(headers: list[tuple[bytes, bytes]], allowed: frozenset[bytes]) -> Headers:
    """The headers worth replaying: the allow-list, never hop-by-hop ones."""
    return tuple((k, v) for k, v in headers if k in allowed and k not in _NEVER_REPLAYED)


def replay_headers(response: StoredResponse) -> list[tuple[bytes, bytes]]:
    headers = list(response.headers)
    if response.status not in _NO_CONTENT_LENGTH:
        headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    headers.append((b"date", http_date()))
    headers.append(REPLAYED)
    return headers


def _size(response: StoredResponse) -> int:
    """What a cached response holds: its body, its stored headers, and a fixed overhead."""
    return len(response.body) + sum(len(k) + len(v) for k, v in response.headers) + 256


class ReplayCache:
    """The hottest COMPLETED records of this process, bounded in entries, bytes and age.

    A COMPLETED record never changes until it expires (only an operator's forced
    release removes one early), so answering a duplicate from memory is exactly
    what the store would have said, without the round trip.
    """

    def __init__(self, max_entries: int, max_bytes: int, max_age: float) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._max_age = max_age
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[str, StoredResponse, float]] = OrderedDict()
        # Plain ints, read by the metrics collector at scrape time: no cost per request
        # beyond an addition.
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[str, StoredResponse] | None:
        """(fingerprint, response) when cached and fresh."""
        if not self._max_entries:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[2] <= time.monotonic():
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0], entry[1]

    def put(self, key: str, fingerprint: str, response: StoredResponse, ttl_ms: int) -> None:
        size = _size(response)
        if not self._max_entries or size > self._max_bytes // 8 or ttl_ms <= 0:
            return
        if key in self._entries:
            self._drop(key)
        expires = time.monotonic() + min(self._max_age, ttl_ms / 1000)
        self._entries[key] = (fingerprint, response, expires)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, response, _ = self._entries.pop(key)
        self._bytes -= _size(response)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes held, as counted against `max_bytes` (body plus a fixed overhead)."""
        return self._bytes
