"""The proxy is not a relay: only a path and query ever travel, and only to the fixed upstream.

A request target is untrusted bytes. Glued onto the upstream's base URL, a target such as
`*@127.0.0.1:9999/steal` turns the base into userinfo and sends the request, with the
client's cookies and the upstream's credentials, to another host. Raw sockets send the
exact request lines (an HTTP client library would refuse or normalise them); a listener
that counts every connection it accepts stands in for the foreign host and must see none.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from harness import HOST, ProxyFactory, ProxyServer

USER, PASSWORD = "proxy-user", "s3cr3t-Upstream-pw"
COOKIE = b"session=victim-cookie"


@dataclass
class Listener:
    """Accepts connections on 127.0.0.1, counts them, and answers each with the target it got."""

    port: int = 0
    connections: int = 0
    lines: list[bytes] = field(default_factory=list)
    headers: list[dict[bytes, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            with self.lock:
                self.lines.append(head[0])
                self.headers.append(headers)
            target = head[0].split(b" ")[1]
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(target), target)
            )


@pytest.fixture
def listeners() -> Iterator[tuple[Listener, Listener]]:
    """(upstream, foreign): two counting listeners, each on its own port."""
    stop = threading.Event()
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []
    made: list[Listener] = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind((HOST, 0))
        sock.listen(64)
        sock.settimeout(0.2)
        listener = Listener(port=sock.getsockname()[1])

        def loop(sock: socket.socket = sock, listener: Listener = listener) -> None:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                with listener.lock:
                    listener.connections += 1
                threading.Thread(target=listener.serve, args=(conn,), daemon=True).start()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        sockets.append(sock)
        threads.append(thread)
        made.append(listener)
    try:
        yield made[0], made[1]
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for sock in sockets:
            sock.close()


async def send_raw(proxy: ProxyServer, request_line: bytes, headers: list[bytes]) -> bytes:
    """Send one request with exactly this request line; the whole answer, read until close."""
    reader, writer = await asyncio.open_connection(HOST, proxy.port)
    try:
        head = [request_line, b"Host: " + HOST.encode(), *headers, b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(20):
            return await reader.read()
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(b" ")[1]), headers, body


def proxy_output(proxy: ProxyServer) -> str:
    """What the proxy process wrote (the harness's own `=== start <command>` lines dropped)."""
    return "\n".join(
        line for line in proxy.logs().splitlines() if not line.startswith("=== start ")
    )


def problem_type(headers: dict[bytes, bytes], body: bytes) -> str | None:
    if not headers.get(b"content-type", b"").startswith(b"application/problem+json"):
        return None
    return str(json.loads(body)["type"]).rsplit("/", 1)[-1]


def start_proxy(proxy_factory: ProxyFactory, upstream: Listener, client: str) -> ProxyServer:
    base = f"http://{USER}:{PASSWORD}@{HOST}:{upstream.port}/api"
    return proxy_factory(
        base, config={"admin": {"host": HOST}, "upstream_pool": {"client": client}}
    )


def protected(key: str) -> list[bytes]:
    """Headers that make the default rule protect a POST (it carries an Idempotency-Key)."""
    return [
        b"Idempotency-Key: " + key.encode(),
        b"Content-Type: text/plain",
        b"Content-Length: 0",
        b"Cookie: " + COOKIE,
    ]


PASS_THROUGH = [b"Cookie: " + COOKIE]

# Targets that name another host, or are no path at all: a 400, and nothing is contacted.
FOREIGN_TARGETS = [
    b"*@127.0.0.1:{port}/steal",
    b"*@127.0.0.1:{port}",
    b"*/steal",
    b"*",
]

CLIENTS = ["builtin", "aiohttp", "httpx"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("credentials", [False, True], ids=["plain-base", "credentials-and-prefix"])
async def test_asterisk_targets_are_refused_and_contact_nobody(
    proxy_factory: ProxyFactory,
    listeners: tuple[Listener, Listener],
    client: str,
    credentials: bool,
) -> None:
    upstream, foreign = listeners
    base = f"http://{USER}:{PASSWORD}@{HOST}:{upstream.port}/api" if credentials else upstream.url
    config = {"admin": {"host": HOST}, "upstream_pool": {"client": client}}
    proxy = proxy_factory(base, config=config)
    for template in FOREIGN_TARGETS:
        target = template.replace(b"{port}", b"%d" % foreign.port)
        for method in ("GET", "POST"):  # pass-through, and protected by the default rule
            line = method.encode() + b" " + target + b" HTTP/1.1"
            headers = protected(f"relay-{uuid.uuid4().hex}") if method == "POST" else PASS_THROUGH
            status, got, body = parse(await send_raw(proxy, line, headers))
            assert (status, problem_type(got, body)) == (400, "target-invalid"), (line, body)
            assert PASSWORD.encode() not in body
    await asyncio.sleep(0.2)
    assert foreign.connections == 0, foreign.lines
    assert upstream.connections == 0, upstream.lines
    assert PASSWORD not in proxy_output(proxy)


@pytest.mark.parametrize("client", CLIENTS)
async def test_options_asterisk_is_answered_by_the_proxy(
    proxy_factory: ProxyFactory, listeners: tuple[Listener, Listener], client: str
) -> None:
    upstream, foreign = listeners
    proxy = start_proxy(proxy_factory, upstream, client)
    status, headers, body = parse(await send_raw(proxy, b"OPTIONS * HTTP/1.1", []))
    assert status == 204, body
    assert body == b""
    assert b"content-length" not in headers
    assert upstream.connections == foreign.connections == 0


@pytest.mark.parametrize("client", CLIENTS)
async def test_connect_is_refused_and_contacts_nobody(
    proxy_factory: ProxyFactory, listeners: tuple[Listener, Listener], client: str
) -> None:
    upstream, foreign = listeners
    proxy = start_proxy(proxy_factory, upstream, client)
    line = b"CONNECT 127.0.0.1:%d HTTP/1.1" % foreign.port
    status, headers, body = parse(await send_raw(proxy, line, []))
    assert (status, problem_type(headers, body)) == (400, "target-invalid"), body
    await asyncio.sleep(0.2)
    assert upstream.connections == foreign.connections == 0


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("method", ["GET", "POST"], ids=["pass-through", "protected"])
@pytest.mark.parametrize(
    ("target", "sent"),
    [
        (b"http://127.0.0.1:{port}/steal?x=1", b"/steal?x=1"),
        (b"http://evil@127.0.0.1:{port}/steal", b"/steal"),
        (b"//127.0.0.1:{port}/steal", b"//127.0.0.1:{port}/steal"),
        (b"/a@127.0.0.1:{port}/steal", b"/a@127.0.0.1:{port}/steal"),
    ],
    ids=["absolute-form", "absolute-form-userinfo", "double-slash", "at-in-path"],
)
async def test_only_a_path_and_query_travel_to_the_fixed_upstream(
    proxy_factory: ProxyFactory,
    listeners: tuple[Listener, Listener],
    client: str,
    method: str,
    target: bytes,
    sent: bytes,
) -> None:
    upstream, foreign = listeners
    proxy = start_proxy(proxy_factory, upstream, client)
    port = b"%d" % foreign.port
    line = method.encode() + b" " + target.replace(b"{port}", port) + b" HTTP/1.1"
    headers = protected(f"relay-{uuid.uuid4().hex}") if method == "POST" else PASS_THROUGH
    status, _, body = parse(await send_raw(proxy, line, headers))
    expected = b"/api" + sent.replace(b"{port}", port)
    assert (status, body) == (200, expected)
    assert foreign.connections == 0, foreign.lines
    assert upstream.connections == 1
    assert upstream.lines == [method.encode() + b" " + expected + b" HTTP/1.1"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_upstream_credentials_go_to_the_upstream_only_and_never_to_the_log(
    proxy_factory: ProxyFactory, listeners: tuple[Listener, Listener], client: str
) -> None:
    upstream, _ = listeners
    proxy = start_proxy(proxy_factory, upstream, client)
    expected = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
    for method, headers in (
        ("GET", PASS_THROUGH),
        ("POST", protected(f"relay-{uuid.uuid4().hex}")),
        # The upstream's credentials replace the client's: one Authorization per request.
        ("GET", [*PASS_THROUGH, b"Authorization: Bearer client-token"]),
    ):
        status, _, _ = parse(await send_raw(proxy, method.encode() + b" /x HTTP/1.1", headers))
        assert status == 200
        assert upstream.headers[-1].get(b"authorization") == expected
    assert upstream.connections == 3
    logs = proxy_output(proxy)
    assert PASSWORD not in logs
    assert f"{HOST}:{upstream.port}/api" in logs  # the start-up line still names the upstream


def test_a_bad_upstream_url_is_reported_without_its_credentials() -> None:
    from proxy.config import ConfigError, load_settings

    for url in (
        f"ftp://{USER}:{PASSWORD}@example.com/",
        f"http://{USER}:{PASSWORD}@example.com:99999/",
        f"http://{USER}:{PASSWORD}@/x",
        f"http://{USER}:{PASSWORD}@example.com/x?y=1",
    ):
        with pytest.raises(ConfigError) as caught:
            load_settings(None, {"upstream": url}, environ={})
        assert PASSWORD not in str(caught.value), url
        assert str(caught.value).startswith("upstream:"), caught.value


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"/x/a/b", b"/x/a%2Fb"),
        (b"/x?note=a;b=2", b"/x?note=a%3Bb=2"),
        (b"/x?note=a+b", b"/x?note=a%20b"),
    ],
    ids=["encoded-slash", "semicolon", "plus-and-%20"],
)
async def test_a_target_the_backend_may_read_differently_is_never_another_targets_replay(
    proxy_factory: ProxyFactory,
    listeners: tuple[Listener, Listener],
    first: bytes,
    second: bytes,
) -> None:
    """The backend gets the target's bytes, not the proxy's decoding of them: many backends
    route on the raw path (`%2F` is not `/`) or split a query on `;`. Two targets whose bytes
    differ (beyond the order of parameters) are two requests, so one key sent with both is
    422, never the first one's replay answering for a request the backend never saw."""
    upstream, _ = listeners
    proxy = start_proxy(proxy_factory, upstream, "aiohttp")
    headers = protected(f"fp-{uuid.uuid4().hex}")
    status, _, body = parse(await send_raw(proxy, b"POST " + first + b" HTTP/1.1", headers))
    assert (status, body) == (200, b"/api" + first)
    status, got, body = parse(await send_raw(proxy, b"POST " + second + b" HTTP/1.1", headers))
    assert (status, problem_type(got, body)) == (422, "key-reused"), body
    assert b"idempotent-replayed" not in got
    assert upstream.connections == 1
