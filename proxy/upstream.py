"""Forwarding to the backend, behind a small interface, with the contract's error classes.

Only a failure to connect means "nothing was sent". Anything after the first
byte (a timeout, a reset, a protocol error) means the backend may have acted,
and the proxy never sends that request again. Three transports sit behind the
interface: the built-in one (proxy/http1.py, the default for protected routes), aiohttp
(pass-through traffic, and selectable) and httpx; docs/benchmarks.md compares them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from proxy.config import UpstreamPool, parse_upstream

if TYPE_CHECKING:  # each client library loads only when its transport starts
    import aiohttp
    import httpx

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Recomputed by the transport for the bytes it actually sends.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}

Headers = list[tuple[bytes, bytes]]


class NotSent(Exception):
    """The backend could not be reached: no byte of the request left the proxy."""


class OutcomeUnknown(Exception):
    """The request may have reached the backend, and no full answer came back."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # timeout | reset | protocol

    @property
    def status(self) -> int:
        return 504 if self.reason == "timeout" else 502


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def request_headers(
    headers: Headers, client: str | None, scheme: str, host: bytes | None
) -> Headers:
    """The client's headers minus hop-by-hop ones, plus X-Forwarded-*."""
    named = _connection_tokens(headers)
    out = [(k, v) for k, v in headers if k not in _NOT_FORWARDED and k not in named]
    forwarded_for = [v for k, v in headers if k == b"x-forwarded-for"]
    out = [
        (k, v)
        for k, v in out
        if k not in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host")
    ]
    chain = b", ".join([*forwarded_for, client.encode()] if client else forwarded_for)
    if chain:
        out.append((b"x-forwarded-for", chain))
    out.append((b"x-forwarded-proto", scheme.encode()))
    if host:
        out.append((b"x-forwarded-host", host))
    return out


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of an origin-form target; anything else was refused before this point,
    so another form here is a bug, and nothing is sent."""
    if not target.startswith("/"):
        raise NotSent("target-not-origin-form")
    path, _, query = target.partition("?")
    return path, query


def with_authorization(headers: Headers, authorization: bytes | None) -> Headers:
    """The upstream's own credentials (from its URL) replace the client's Authorization:
    one request carries one set of credentials."""
    if authorization is None:
        return headers
    return [(k, v) for k, v in headers if k != b"authorization"] + [
        (b"authorization", authorization)
    ]


def response_headers(headers: Headers) -> Headers:
    """The backend's headers minus hop-by-hop ones (the server frames the body itself)."""
    named = _connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


@dataclass(slots=True)
class UpstreamResponse:
    """Status, headers, the body read so far, and the rest as a stream if there is more."""

    status: int
    headers: Headers
    body: bytes = b""
    complete: bool = True
    rest: AsyncIterator[bytes] | None = None
    _release: Any = field(default=None, repr=False)

    def close(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


class UpstreamClient(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes],
        *,
        timeout: float,
        read_limit: int | None,
    ) -> UpstreamResponse:
        """Send one request once. `read_limit`: read at most this many body bytes before
        returning (None: all of it, under `timeout`); the rest comes from `rest`.

        Raises NotSent or OutcomeUnknown.
        """


class PoolSettings:
    """The connection pool's settings, which every transport takes alike."""

    def __init__(self, base_url: str, pool: UpstreamPool, *, passthrough: bool = False) -> None:
        self.upstream = parse_upstream(base_url)
        self._max_connections = (
            pool.passthrough_max_connections if passthrough else pool.max_connections
        )
        self._keepalive = pool.keepalive_expiry
        self._connect_timeout = pool.connect_timeout


class UnsafeClient(RuntimeError):
    """The HTTP client cannot be configured to send each request at most once."""


class AiohttpUpstream(PoolSettings):
    """aiohttp's client: streams request bodies, so pass-through traffic uses it."""

    _session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the upstream client is not started")
        return self._session

    async def start(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=self._keepalive,
            enable_cleanup_closed=False,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
        )
        # aiohttp quietly re-sends idempotent methods over a fresh connection when a
        # pooled one was closed; the proxy must decide about re-sending, not the client.
        # The switch is private: an aiohttp without it stops start-up, so that no request
        # is ever sent twice behind the proxy's back.
        if not hasattr(self._session, "_retry_connection"):
            await self._session.close()
            self._session = None
            raise UnsafeClient(
                f"aiohttp {aiohttp.__version__} has no ClientSession._retry_connection, the "
                "switch that stops it re-sending requests on a closed pooled connection; use "
                "an aiohttp the proxy supports (pyproject.toml) or upstream_pool.client: httpx"
            )
        self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes],
        *,
        timeout: float,
        read_limit: int | None,
    ) -> UpstreamResponse:
        import aiohttp
        from multidict import CIMultiDict
        from yarl import URL

        path, query = split_target(target)
        # Built from parts: the scheme and authority are the upstream's, fixed at start-up.
        # encoded=True: the client's path as it came (escapes, dot segments), not yarl's
        # normalisation of it.
        url = URL.build(
            scheme=self.upstream.scheme,
            authority=self.upstream.authority,
            path=self.upstream.prefix + path,
            query_string=query,
            encoded=True,
        )
        send_headers: CIMultiDict[str] = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in with_authorization(headers, self.upstream.authorization)
        )
        response: Any = None
        try:
            async with asyncio.timeout(timeout):
                response = await self.session.request(
                    method,
                    url,
                    headers=send_headers,
                    data=body if body else None,
                    allow_redirects=False,
                    # sock_read: the rest of a streamed answer outlives the asyncio timeout
                    # below; a backend that goes silent mid-body must not hold the client.
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=self._connect_timeout, sock_read=timeout
                    ),
                )
                if read_limit is None:
                    data = await response.read()
                    response.release()
                    return UpstreamResponse(response.status, _lower(response.raw_headers), data)
                data = await _read_up_to(response.content, read_limit)
        except aiohttp.ClientConnectorError as exc:
            raise NotSent(type(exc).__name__) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise NotSent("connect-timeout") from exc
        except TimeoutError as exc:
            _discard(response)
            raise OutcomeUnknown("timeout") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as exc:
            _discard(response)
            raise OutcomeUnknown("reset") from exc
        except aiohttp.ClientError as exc:
            _discard(response)
            raise OutcomeUnknown("protocol") from exc
        except asyncio.CancelledError:
            # A held exchange abandoned (proxy.outcome): close its connection now.
            _discard(response)
            raise
        if response.content.at_eof():
            response.release()
            return UpstreamResponse(response.status, _lower(response.raw_headers), data)
        return UpstreamResponse(
            response.status,
            _lower(response.raw_headers),
            data,
            complete=False,
            rest=response.content.iter_any(),
            _release=response.close,
        )


async def _read_up_to(content: Any, limit: int) -> bytes:
    """Read until EOF or just past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.readany()
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _discard(response: Any) -> None:
    if response is not None:
        response.close()


class HttpxUpstream(PoolSettings):
    """httpx's client, kept behind the same interface for comparison (docs/benchmarks.md)."""

    _session: httpx.AsyncClient | None = None
    _url: httpx.URL | None = None

    def _client(self) -> tuple[httpx.AsyncClient, httpx.URL]:
        if self._session is None or self._url is None:
            raise RuntimeError("the upstream client is not started")
        return self._session, self._url

    async def start(self) -> None:
        import httpx

        # No credentials in it: they travel as the header built at start-up.
        self._url = httpx.URL(
            scheme=self.upstream.scheme,
            host=self.upstream.host,
            port=self.upstream.port,
            path="/",
        )
        self._session = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
                keepalive_expiry=self._keepalive,
            ),
            timeout=httpx.Timeout(None, connect=self._connect_timeout),
            follow_redirects=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.aclose()

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes],
        *,
        timeout: float,
        read_limit: int | None,
    ) -> UpstreamResponse:
        import httpx

        split_target(target)
        # The URL (where to connect) is the upstream's, fixed at start-up; httpcore's "target"
        # extension puts the client's path and query on the request line as they came
        # (escapes, dot segments) under the upstream's prefix, not httpx's normalisation.
        session, url = self._client()
        request = session.build_request(
            method,
            url,
            headers=with_authorization(headers, self.upstream.authorization),
            content=body,
            extensions={"target": (self.upstream.prefix + target).encode("latin-1")},
            # read: also bounds the silence between chunks of a streamed answer.
            timeout=httpx.Timeout(None, connect=self._connect_timeout, read=timeout),
        )
        response: Any = None
        try:
            async with asyncio.timeout(timeout):
                response = await session.send(request, stream=True)
                raw = response.aiter_raw()
                chunks: list[bytes] = []
                size = 0
                done = False
                while read_limit is None or size <= read_limit:
                    try:
                        chunk = await raw.__anext__()
                    except StopAsyncIteration:
                        done = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise NotSent(type(exc).__name__) from exc
        except TimeoutError as exc:
            await _aclose(response)
            raise OutcomeUnknown("timeout") from exc
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            await _aclose(response)
            raise OutcomeUnknown("reset") from exc
        except httpx.HTTPError as exc:
            await _aclose(response)
            raise OutcomeUnknown("protocol") from exc
        headers_out = [(k.lower(), v) for k, v in response.headers.raw]
        if done:
            await response.aclose()
            return UpstreamResponse(response.status_code, headers_out, b"".join(chunks))
        return UpstreamResponse(
            response.status_code,
            headers_out,
            b"".join(chunks),
            complete=False,
            rest=raw,
            _release=lambda: asyncio.ensure_future(response.aclose()),
        )


async def _aclose(response: Any) -> None:
    if response is not None:
        await response.aclose()


def make_upstream(
    base_url: str, pool: UpstreamPool, *, passthrough: bool = False
) -> UpstreamClient:
    """The client `pool.client` names; `passthrough`: the pool for unprotected traffic.

    The built-in client sends whole bodies only, so pass-through traffic (streamed both
    ways) goes through aiohttp beside it.
    """
    if pool.client == "builtin" and not passthrough:
        from proxy.http1 import Http1Upstream

        return Http1Upstream(base_url, pool)
    cls = HttpxUpstream if pool.client == "httpx" else AiohttpUpstream
    return cls(base_url, pool, passthrough=passthrough)


def _lower(raw_headers: Any) -> Headers:
    return [(name.lower(), value) for name, value in raw_headers]
