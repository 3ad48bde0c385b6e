"""A small pool of redis-py connections for the hot path of a single Redis node.

redis-py's client wraps every command in a retry object, a blocking pool with a
condition variable, per-command socket timeouts (a task per write on Python
3.11) and observability hooks; measured here, that is about half the CPU of an
EVALSHA round trip (docs/benchmarks.md). The proxy keeps redis-py's `Connection`
(protocol, hiredis parser, TLS, AUTH, SELECT) and owns only the checkout, one
deadline per try, the retries, and the packing of its few argument types.
Cluster and Sentinel keep the full client, which knows their topology.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import Connection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Command = Sequence[Any]

# Failures after which the same command may be tried again on a fresh connection.
# Every script the proxy sends is safe to repeat: it recognises its owner's token.
RETRYABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


class NoFreeConnection(TimeoutError):
    """Every connection stayed busy for the whole timeout: the store is unavailable to this
    caller, but a long local queue is no sign that Redis failed (the circuit breaker
    counts only what Redis did)."""


class Slots:
    """At most `size` commands in flight; a caller waits for a free slot at most `timeout`
    seconds, then gets NoFreeConnection (as redis-py's BlockingConnectionPool raises).

    Without the bound on the wait, a queue built while Redis stalled would be worked off
    one timeout at a time: the last caller in a queue of a thousand would wait minutes.
    """

    __slots__ = ("_free", "_timeout")

    def __init__(self, size: int, timeout: float) -> None:
        self._free = asyncio.Semaphore(size)
        self._timeout = timeout

    async def __aenter__(self) -> None:
        if not self._free.locked():
            await self._free.acquire()  # free: taken at once, without a deadline's timer
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._free.acquire()
        except TimeoutError:
            raise NoFreeConnection(f"no free connection within {self._timeout} s") from None

    async def __aexit__(self, *exc_info: object) -> None:
        self._free.release()


class ConnectionPool:
    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retries: int,
        max_connections: int,
        connection: dict[str, Any] | None = None,
    ) -> None:
        # Credentials and TLS files from the settings beat what the URL says.
        options: dict[str, Any] = {**parse_url(url), **(connection or {})}
        connection_class: type[Connection] = options.pop("connection_class", Connection)
        if connection_class is Connection:
            # TLS options belong to SSLConnection only (a plain URL without store.tls).
            options = {k: v for k, v in options.items() if not k.startswith("ssl")}
        options.update(socket_timeout=None, socket_connect_timeout=timeout)
        self._options = options
        self._connection_class = connection_class
        self._idle: deque[Connection] = deque()
        self._slots = Slots(max_connections, timeout)
        self._timeout = timeout
        self._retries = retries

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send the commands in one write on one connection; their replies, in order.

        A reply that is an error is returned as the `ResponseError` instance, so that
        the caller sees every reply and the connection stays in step.
        """
        async with self._slots:
            connection = self._idle.pop() if self._idle else self._connect()
            try:
                for attempt in range(self._retries + 1):
                    try:
                        async with asyncio.timeout(self._timeout):
                            return await _round_trip(connection, commands)
                    except RETRYABLE:
                        # A half-read reply would poison the next command: start afresh.
                        await connection.disconnect(nowait=True)
                        if attempt == self._retries:
                            raise
                raise AssertionError("unreachable")
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
            finally:
                self._idle.append(connection)

    def _connect(self) -> Connection:
        """A new, not yet connected connection; it connects on its first command."""
        return self._connection_class(**self._options)

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().disconnect()


def pack(commands: Sequence[Command]) -> bytes:
    """The commands in RESP, as one buffer for one write.

    The proxy's arguments are only bytes, str and int; redis-py's general packer (any
    type, encoder lookups, buffer splitting for large values) cost more than the round
    trip's own send here.
    """
    parts: list[bytes] = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):  # bool is an int too, and packs as 0 or 1
                arg = b"%d" % arg
            elif not isinstance(arg, bytes | bytearray | memoryview):
                raise TypeError(f"cannot send a {type(arg).__name__} to Redis")
            parts.append(b"$%d\r\n" % len(arg))
            parts.append(arg)
            parts.append(b"\r\n")
    return b"".join(parts)


async def _round_trip(connection: Connection, commands: Sequence[Command]) -> list[Any]:
    await connection.send_packed_command(pack(commands), check_health=False)
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as error:
            replies.append(error)
    return replies
