"""Raw HTTP on 127.0.0.1 where the exact bytes matter.

`raw_upstream_server` stands in for backends whose bytes matter (the request target it
received, a 204, a chunked answer, a stalled body); `raw_request` sends request targets
that an HTTP client library would normalise first and reads the answer until close.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

from harness import HOST


def _read_request(conn: socket.socket) -> tuple[bytes, dict[bytes, bytes]] | None:
    """The request line and headers of one request (its body read and dropped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
    else:
        length = int(headers.get(b"content-length", b"0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
    return lines[0], headers


def _serve(conn: socket.socket, stopped: threading.Event) -> None:
    """Answer one request per connection; the body is the raw request target received.

    `/no-content...` answers 204; `/chunked...` answers without Content-Length (chunked).
    """
    with conn:
        conn.settimeout(10)
        request = _read_request(conn)
        if request is None:
            return
        line, _ = request
        target = line.split(b" ")[1]
        if b"/no-content" in target:
            conn.sendall(b'HTTP/1.1 204 No Content\r\nConnection: close\r\nETag: "n"\r\n\r\n')
            return
        if b"/big-" in target:
            # /big-<status>: that status with a 64 KiB body.
            status = int(target.split(b"/big-")[1][:3])
            body = b"a" * 65536
            conn.sendall(
                b"HTTP/1.1 %d Big\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
            )
            return
        if b"/stall" in target:
            # Headers and a tenth of the body, then silence (bounded), then close.
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 100\r\n\r\n" + b"s" * 10
            )
            stopped.wait(60)
            return
        if b"/chunked" in target:
            body = b"0123456789" * 10
            conn.sendall(
                b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"".join(
                    b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
                    for i in range(0, len(body), 7)
                )
                + b"0\r\n\r\n"
            )
            return
        conn.sendall(
            b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (len(target), b"" if line.startswith(b"HEAD ") else target)
        )


@contextlib.contextmanager
def accept_loop(handle: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A listener on a free 127.0.0.1 port whose every connection is handed to `handle`
    (in its own thread, with the stop event), closed on the way out."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(conn, stop), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{listener.getsockname()[1]}"
    finally:
        stop.set()  # also ends every stalled answer
        thread.join(10)
        listener.close()


@contextlib.contextmanager
def raw_upstream_server() -> Iterator[str]:
    """A raw upstream on a free 127.0.0.1 port (see `_serve`), closed on the way out."""
    with accept_loop(_serve) as url:
        yield url


async def raw_request(
    url: str, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Send exactly these request-line bytes; (status, headers, body) read until close."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + host.encode()]
        head += [k + b": " + v for k, v in headers]
        head += [b"Content-Length: %d" % len(body), b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(30):
            data = await reader.read()
    finally:
        writer.close()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    parsed = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        parsed.append((name.strip().lower(), value.strip()))
    if (b"transfer-encoding", b"chunked") in parsed:
        decoded = b""
        while payload:
            size_line, _, payload = payload.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            decoded += payload[:size]
            payload = payload[size + 2 :]
        payload = decoded
    return status, parsed, payload


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]
