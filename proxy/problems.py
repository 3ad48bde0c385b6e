"""RFC 9457 problem+json answers for everything the proxy itself decides.

`type` ends in the contract's name for the situation, `status` equals the HTTP
status, and nothing the client sent (keys, bodies) is ever echoed back.
"""

from __future__ import annotations

import orjson

TYPE_BASE = "https://idempotency-proxy.dev/problems/"

TITLES: dict[str, str] = {
    "request-in-progress": "A request with this idempotency key is still in progress",
    "key-reused": "This idempotency key was already used for a different request",
    "key-missing": "This endpoint requires an idempotency key",
    "key-invalid": "The idempotency key is malformed",
    "tenant-invalid": "The tenant header is empty or was sent more than once",
    "body-too-large": "The request body is larger than this endpoint accepts",
    "body-invalid": "The request body cannot be read",
    "body-timeout": "The request body did not arrive in time",
    "unsupported-media-type": "This endpoint reads its idempotency key from another media type",
    "headers-too-large": "The request headers are too large",
    "target-invalid": "The request target is not a path this proxy forwards",
    "request-invalid": "The request is not valid HTTP/1.1",
    "header-timeout": "The request headers did not arrive in time",
    "overloaded": "The proxy is at its concurrency limit; nothing was sent",
    "outcome-unknown": "The backend may or may not have executed this request",
    "upstream-unreachable": "The backend could not be reached; nothing was sent",
    "upstream-failed": "The backend did not answer",
    "store-unavailable": "The idempotency store is unavailable; nothing was sent",
    "replay-unavailable": "The stored response is too large to replay",
}


class Problem(Exception):
    """A decision the proxy answers itself, as problem+json."""

    def __init__(
        self,
        name: str,
        status: int,
        detail: str | None = None,
        *,
        retry_after: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(name)
        self.name = name
        self.status = status
        self.detail = detail
        # The client may still be sending a body the proxy will not read: close the
        # connection after the answer, or the server keeps parsing whatever else comes.
        self.close = close
        self.retry_after = retry_after

    def body(self) -> bytes:
        document: dict[str, object] = {
            "type": TYPE_BASE + self.name,
            "title": TITLES.get(self.name, self.name),
            "status": self.status,
        }
        if self.detail:
            document["detail"] = self.detail
        return orjson.dumps(document)

    def headers(self, date: bytes) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"cache-control", b"no-store"),
            (b"date", date),
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        if self.close:
            headers.append((b"connection", b"close"))
        return headers


def body_too_large() -> Problem:
    return Problem(
        "body-too-large", 413, "the request body is larger than this route accepts", close=True
    )


def body_timeout() -> Problem:
    return Problem("body-timeout", 408, "the request body was not received in time", close=True)


def key_missing(where: str) -> Problem:
    return Problem("key-missing", 400, f"expected the idempotency key in {where}")


def target_invalid() -> Problem:
    return Problem(
        "target-invalid",
        400,
        "the request target must be a path (origin-form) or an absolute URL; "
        "the proxy forwards to its configured upstream only",
        close=True,
    )


def key_invalid(reason: str) -> Problem:
    return Problem("key-invalid", 400, reason)


def key_reused() -> Problem:
    return Problem(
        "key-reused",
        422,
        "this key was first used with a different method, path, query or body",
    )


def in_progress(retry_after: int) -> Problem:
    return Problem(
        "request-in-progress",
        409,
        "the first request with this key has not finished; retry later to get its response",
        retry_after=retry_after,
    )


def store_unavailable(retry_after: int = 1) -> Problem:
    return Problem(
        "store-unavailable",
        503,
        "the request was not forwarded; it is safe to retry",
        retry_after=retry_after,
    )


def outcome_unknown(status: int, reason: str) -> Problem:
    return Problem(
        "outcome-unknown",
        status,
        f"the backend may or may not have executed this request ({reason}); it will not be "
        "sent again with this key until an operator resolves it",
    )


def outcome_pending(wait: float) -> Problem:
    return Problem(
        "outcome-unknown",
        504,
        "the backend has not answered in time (timeout); the proxy keeps listening for its "
        f"answer for up to {wait:g}s more and will not send the request again: retry with the "
        "same key to get the answer",
    )


def replay_unavailable() -> Problem:
    return Problem(
        "replay-unavailable",
        409,
        "the request was executed, but its response was too large to store for replays",
    )


def upstream_unreachable(detail: str = "the backend could not be reached") -> Problem:
    return Problem("upstream-unreachable", 502, detail)


def upstream_failed(status: int, reason: str) -> Problem:
    return Problem("upstream-failed", status, f"the backend did not answer ({reason})")


def record_unreadable(retry_after: int) -> Problem:
    # An unreadable record is alive: in progress, until an operator resolves it.
    return Problem(
        "request-in-progress",
        409,
        "the record of this key cannot be read; it is treated as in progress until an "
        "operator resolves it",
        retry_after=retry_after,
    )


def tenant_invalid(reason: str) -> Problem:
    return Problem("tenant-invalid", 400, reason)


def headers_too_large(detail: str) -> Problem:
    return Problem("headers-too-large", 431, detail)


def body_invalid(detail: str) -> Problem:
    return Problem("body-invalid", 400, detail)


def unsupported_media_type(detail: str) -> Problem:
    return Problem("unsupported-media-type", 415, detail)


def request_invalid() -> Problem:
    return Problem("request-invalid", 400, "the request is not valid HTTP/1.1", close=True)


def header_timeout() -> Problem:
    return Problem("header-timeout", 408, "the request headers were not received in time")


def overloaded() -> Problem:
    return Problem(
        "overloaded",
        503,
        "the proxy is at its concurrency limit; nothing was sent, it is safe to retry",
        retry_after=1,
        close=True,
    )
