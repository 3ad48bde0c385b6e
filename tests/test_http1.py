"""The built-in upstream client (proxy/http1.py) against scripted backends on real sockets.

Each backend here is a few lines of asyncio that answer with exactly the bytes a case
needs (a reset, an early hint, a close-delimited body, a header flood), and count the
requests and connections they saw: one send per request, whatever the backend does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import HOST

from devstack.servers import TlsFiles
from proxy.config import UpstreamPool
from proxy.http1 import MAX_RESPONSE_HEAD_BYTES, Http1Upstream
from proxy.upstream import NotSent, OutcomeUnknown, UpstreamResponse, make_upstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Backend"], Awaitable[None]]


@dataclass
class Backend:
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)  # request heads and bodies, as read


async def read_request(reader: asyncio.StreamReader, backend: Backend) -> bytes | None:
    """One request (head and Content-Length body), recorded; None at the end of the stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    request = head + (await reader.readexactly(length) if length else b"")
    backend.requests.append(request)
    return request


@asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Backend]:
    backend = Backend()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.connections += 1
        try:
            await handler(reader, writer, backend)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    backend.port = server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def client(backend: Backend, max_connections: int = 100) -> AsyncIterator[Http1Upstream]:
    pool = UpstreamPool(max_connections=max_connections)
    upstream = Http1Upstream(f"http://{HOST}:{backend.port}/base", pool)
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


async def post(
    upstream: Http1Upstream,
    body: bytes = b'{"amount":1}',
    *,
    method: str = "POST",
    timeout: float = 5.0,
    read_limit: int | None = 1 << 20,
) -> UpstreamResponse:
    headers = [(b"content-type", b"application/json"), (b"idempotency-key", b"k1")]
    return await upstream.send(
        method, "/v1/charges?x=1", headers, body, timeout=timeout, read_limit=read_limit
    )


async def keep_alive(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
) -> None:
    while await read_request(reader, b) is not None:
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\nX-N: %d\r\n\r\ncharged" % len(b.requests)
        )
        await writer.drain()


# --------------------------------------------------------------------------- the request


async def test_request_bytes_are_the_upstreams_host_prefix_target_headers_and_body() -> None:
    async with scripted(keep_alive) as backend, client(backend) as upstream:
        response = await post(upstream)
    assert (response.status, response.body, response.complete) == (201, b"charged", True)
    assert (b"x-n", b"1") in response.headers
    assert backend.requests == [
        b"POST /base/v1/charges?x=1 HTTP/1.1\r\n"
        b"host: %s:%d\r\n"
        % (HOST.encode(), backend.port)
        + b"content-type: application/json\r\nidempotency-key: k1\r\n"
        b'content-length: 12\r\n\r\n{"amount":1}'
    ]


async def test_a_get_without_a_body_carries_no_content_length() -> None:
    async with scripted(keep_alive) as backend, client(backend) as upstream:
        await post(upstream, b"", method="GET")
    assert b"content-length" not in backend.requests[0].lower()


@pytest.mark.parametrize(
    "headers",
    [[(b"x-evil", b"a\r\nx-injected: 1")], [(b"x-evil", b"a\nb")], [(b"x-evil", b"a\0")]],
    ids=["crlf", "lf", "nul"],
)
async def test_a_header_that_would_split_the_request_is_never_sent(
    headers: list[tuple[bytes, bytes]],
) -> None:
    async with scripted(keep_alive) as backend, client(backend) as upstream:
        with pytest.raises(NotSent):
            await upstream.send("POST", "/v1", headers, b"{}", timeout=5, read_limit=None)
    assert backend.connections == 0


async def test_requests_reuse_one_keep_alive_connection() -> None:
    async with scripted(keep_alive) as backend, client(backend) as upstream:
        for n in range(1, 6):
            response = await post(upstream)
            assert (b"x-n", str(n).encode()) in response.headers
    assert backend.connections == 1


async def test_concurrent_requests_never_exceed_the_pool() -> None:
    async with scripted(keep_alive) as backend, client(backend, max_connections=3) as upstream:
        answers = await asyncio.gather(*(post(upstream) for _ in range(30)))
    assert {a.status for a in answers} == {201}
    assert len(backend.requests) == 30
    assert backend.connections <= 3


# --------------------------------------------------------------------------- nothing sent


async def test_a_refused_connection_is_not_sent() -> None:
    async with scripted(keep_alive) as backend:
        port = backend.port
    upstream = Http1Upstream(f"http://{HOST}:{port}", UpstreamPool())
    with pytest.raises(NotSent):
        await post(upstream)
    await upstream.close()


async def test_waiting_past_the_deadline_for_a_free_connection_is_not_sent() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        await read_request(reader, b)
        await release.wait()
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with scripted(slow) as backend, client(backend, max_connections=1) as upstream:
        first = asyncio.ensure_future(post(upstream))
        await asyncio.sleep(0.1)
        with pytest.raises(NotSent, match="pool-timeout"):
            await post(upstream, timeout=0.2)
        release.set()
        assert (await first).status == 201
    assert len(backend.requests) == 1


async def test_a_pooled_connection_the_backend_closed_is_not_used() -> None:
    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
    ) -> None:
        await read_request(reader, b)
        # Keep-alive promised, then the backend closes the idle connection anyway.
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with scripted(one_per_connection) as backend, client(backend) as upstream:
        assert (await post(upstream)).status == 201
        await asyncio.sleep(0.1)  # the close arrives while the connection is idle
        assert (await post(upstream)).status == 201
    assert (backend.connections, len(backend.requests)) == (2, 2)


# --------------------------------------------------------------------------- outcome unknown


async def test_a_reset_after_the_request_is_outcome_unknown_and_never_sent_again() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        await read_request(reader, b)
        writer.transport.abort()

    async with scripted(reset) as backend, client(backend) as upstream:
        with pytest.raises(OutcomeUnknown) as caught:
            await post(upstream)
    assert caught.value.reason == "reset"
    assert (backend.connections, len(backend.requests)) == (1, 1)


async def test_a_close_in_the_middle_of_the_body_is_outcome_unknown() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        await read_request(reader, b)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    async with scripted(cut) as backend, client(backend) as upstream:
        with pytest.raises(OutcomeUnknown, match="reset"):
            await post(upstream)
    assert len(backend.requests) == 1


async def test_silence_past_the_deadline_is_a_timeout_and_the_connection_is_dropped() -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
    ) -> None:
        await read_request(reader, b)
        await asyncio.sleep(5)

    async with scripted(silent) as backend, client(backend, max_connections=1) as upstream:
        with pytest.raises(OutcomeUnknown, match="timeout"):
            await post(upstream, timeout=0.2)
        # The slot came back: another request gets a connection of its own.
        with pytest.raises(OutcomeUnknown, match="timeout"):
            await post(upstream, timeout=0.2)
    assert (backend.connections, len(backend.requests)) == (2, 2)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Flood: "
        + b"a" * (MAX_RESPONSE_HEAD_BYTES + 1)
        + b"\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["switching-protocols", "garbage", "header-flood"],
)
async def test_an_answer_that_is_not_a_proper_response_is_a_protocol_error(answer: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        await read_request(reader, b)
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(1)

    async with scripted(bad) as backend, client(backend) as upstream:
        with pytest.raises(OutcomeUnknown, match="protocol"):
            await post(upstream)
    assert len(backend.requests) == 1


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"abcde",
        ),
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            b"ok",
        ),
        (b"HTTP/1.0 201 Created\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", b""),
    ],
    ids=["chunked", "early-hints", "http1.0-close", "close-delimited", "no-content"],
)
async def test_every_framing_gives_the_exact_body(answer: bytes, body: bytes) -> None:
    async def framed(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
    ) -> None:
        await read_request(reader, b)
        writer.write(answer)
        await writer.drain()
        if b"Content-Length" not in answer and b"chunked" not in answer:
            writer.close()  # the end of the body is the end of the connection
        else:
            await asyncio.sleep(0.5)

    async with scripted(framed) as backend, client(backend) as upstream:
        response = await post(upstream)
    assert (response.body, response.complete) == (body, True)
    assert not any(name == b"link" for name, _ in response.headers)  # the hint's, not the answer's


async def test_head_ends_at_the_headers_whatever_content_length_says() -> None:
    async def head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        while await read_request(reader, b) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            await writer.drain()

    async with scripted(head) as backend, client(backend) as upstream:
        for _ in range(2):
            # Ends at the head, not at the deadline (which would also give the head).
            response = await asyncio.wait_for(post(upstream, b"", method="HEAD", timeout=60), 10)
            assert (response.status, response.body, response.complete) == (200, b"", True)
    # The parser cannot be told "no body follows": such a connection is never reused.
    assert backend.connections == 2


async def test_a_long_answer_streams_past_the_read_limit_and_then_frees_its_connection() -> None:
    chunk = b"x" * 65536

    async def long(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        while await read_request(reader, b) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(chunk) * 20))
            for _ in range(20):
                writer.write(chunk)
                await writer.drain()

    async with scripted(long) as backend, client(backend, max_connections=1) as upstream:
        response = await post(upstream, read_limit=1000)
        assert not response.complete and response.rest is not None
        received = response.body + b"".join([part async for part in response.rest])
        assert received == chunk * 20
        response.close()  # as the app does after streaming: harmless once released
        assert (await post(upstream, read_limit=None)).body == chunk * 20
    assert backend.connections == 1


async def test_a_long_answer_that_goes_silent_is_cut_at_the_silence_bound() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        await read_request(reader, b)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"s" * 5000)
        await writer.drain()
        await asyncio.sleep(5)

    async with scripted(stall) as backend, client(backend) as upstream:
        response = await post(upstream, read_limit=1000, timeout=0.3)
        assert response.rest is not None
        with pytest.raises(OutcomeUnknown, match="timeout"):
            async for _ in response.rest:
                pass
    assert len(backend.requests) == 1


def test_pass_through_keeps_aiohttp_because_it_streams_request_bodies() -> None:
    from proxy.upstream import AiohttpUpstream

    pool = UpstreamPool(client="builtin")
    assert isinstance(make_upstream("http://127.0.0.1:9", pool), Http1Upstream)
    assert isinstance(make_upstream("http://127.0.0.1:9", pool, passthrough=True), AiohttpUpstream)


async def test_a_head_and_body_written_apart_give_one_whole_answer() -> None:
    async def apart(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend) -> None:
        while await read_request(reader, b) is not None:
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"charged")
            await writer.drain()

    async with scripted(apart) as backend, client(backend) as upstream:
        for _ in range(3):
            response = await post(upstream)
            assert (response.status, response.body, response.complete) == (201, b"charged", True)
    assert backend.connections == 1


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("trusted", [True, False], ids=["verified", "unverified"])
async def test_an_https_upstream_is_verified_before_anything_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trusted: bool
) -> None:
    tls = TlsFiles.create(tmp_path / "tls")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls.server_cert, tls.server_key)
    if trusted:  # the system trust store plus the test's CA, as an operator would add one
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    backend = Backend()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.connections += 1
        try:
            await keep_alive(reader, writer, backend)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    upstream = Http1Upstream(f"https://{HOST}:{port}", UpstreamPool())
    await upstream.start()
    try:
        if trusted:
            response = await post(upstream)
            assert (response.status, response.body) == (201, b"charged")
            assert backend.requests[0].startswith(
                b"POST /v1/charges?x=1 HTTP/1.1\r\nhost: %s:%d\r\n" % (HOST.encode(), port)
            )
        else:
            with pytest.raises(NotSent):
                await post(upstream)
            assert backend.requests == []
    finally:
        await upstream.close()
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- out of step


def answered_with(answers: list[bytes]) -> Handler:
    """A keep-alive backend that answers its n-th request with answers[n] (then the last)."""

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
    ) -> None:
        while await read_request(reader, b) is not None:
            writer.write(answers[min(len(b.requests), len(answers)) - 1])
            await writer.drain()

    return handler


@pytest.mark.parametrize(
    "extra",
    [b" and more", b"HTTP/1.1 500 Injected\r\nX-Injected: 1\r\nContent-Length: 0\r\n\r\n"],
    ids=["longer-than-content-length", "a-second-answer"],
)
async def test_bytes_past_the_end_of_an_answer_close_its_connection(extra: bytes) -> None:
    first = b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncharged" + extra
    second = b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\n\r\nsecond"
    handler = answered_with([first, second])
    async with scripted(handler) as backend, client(backend, max_connections=1) as upstream:
        response = await post(upstream)
        # The answer its head framed, nothing of what followed.
        assert (response.status, response.body) == (201, b"charged")
        assert response.headers == [(b"content-length", b"7")]
        # The next request goes out on a fresh connection and gets its own answer.
        for _ in range(3):
            response = await post(upstream)
            assert (response.status, response.body) == (201, b"second")
    assert (backend.connections, len(backend.requests)) == (2, 4)


async def test_the_start_of_a_stray_answer_is_never_read_as_the_next_one() -> None:
    # A complete answer, then the first line of one nobody asked for, in the same read.
    first = b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\nchargedHTTP/1.1 500 Stray\r\n"
    second = b"HTTP/1.1 201 Created\r\nContent-Length: 6\r\n\r\nsecond"
    handler = answered_with([first, second])
    async with scripted(handler) as backend, client(backend, max_connections=1) as upstream:
        assert (await post(upstream)).body == b"charged"
        response = await post(upstream)
        assert (response.status, response.body) == (201, b"second")
    assert (backend.connections, len(backend.requests)) == (2, 2)


async def test_closing_a_streamed_answer_after_its_end_leaves_the_next_request_alone() -> None:
    """The app closes a streamed reply after its last write to the client (which may wait
    for a slow client): the connection may carry another request by then."""
    chunk = b"x" * 65536
    second_read, go_on = asyncio.Event(), asyncio.Event()

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
    ) -> None:
        while await read_request(reader, b) is not None:
            if len(b.requests) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(chunk) * 8))
                for _ in range(8):
                    writer.write(chunk)
                    await writer.drain()
                continue
            if len(b.requests) == 2:
                second_read.set()
                await go_on.wait()
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\ncharged")
            await writer.drain()

    async with scripted(handler) as backend, client(backend, max_connections=1) as upstream:
        streamed = await post(upstream, read_limit=1000)
        assert streamed.rest is not None
        assert streamed.body + b"".join([part async for part in streamed.rest]) == chunk * 8
        # The stream ended and gave its connection back; the next request takes it.
        second = asyncio.ensure_future(post(upstream))
        await second_read.wait()
        streamed.close()  # what the app's reply does once the client has it all
        go_on.set()
        response = await second
        assert (response.status, response.body) == (201, b"charged")
        # The pool still holds one connection, not two: requests take turns on it.
        answers = await asyncio.gather(*(post(upstream) for _ in range(4)))
        assert [a.status for a in answers] == [201] * 4
    assert (backend.connections, len(backend.requests)) == (1, 6)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Endless: ",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Endless: ",
    ],
    ids=["head", "trailer"],
)
async def test_a_header_line_that_never_ends_is_a_protocol_error_not_a_buffer(
    answer: bytes,
) -> None:
    async def endless(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, b: Backend
    ) -> None:
        await read_request(reader, b)
        writer.write(answer)
        for _ in range(64):  # 4 MiB of one header value, then silence
            writer.write(b"a" * 65536)
            await writer.drain()
        await asyncio.sleep(30)

    async with scripted(endless) as backend, client(backend) as upstream:
        with pytest.raises(OutcomeUnknown) as caught:
            await post(upstream, timeout=10)
    # Refused as it grew, not buffered until the deadline.
    assert caught.value.reason == "protocol"
    assert len(backend.requests) == 1


async def test_trailer_fields_are_not_merged_into_the_answers_headers() -> None:
    answer = (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        b"Content-Type: text/html\r\nSet-Cookie: s=1\r\nX-Checksum: abc\r\n\r\n"
    )
    handler = answered_with([answer])
    async with scripted(handler) as backend, client(backend) as upstream:
        response = await post(upstream)
    assert (response.status, response.body) == (201, b"{}")
    assert response.headers == [
        (b"content-type", b"application/json"),
        (b"transfer-encoding", b"chunked"),
    ]
    assert len(backend.requests) == 1
