"""The Redis store: each transition one Lua script, one round trip, its contract in the file.

Commands time out fast and retry at most a couple of times: every script is
safe to retry because it recognises its own token (a retried claim that already
won is not "in progress").

Longer than the other modules: one client for three topologies (single node, Sentinel,
Cluster, each with TLS and ACL), one wrapper per Lua script and the data-loss canary
share the connection, its retries and its error mapping; split, each part would have
to re-learn which errors mean "maybe sent".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.config import StoreSettings
from proxy.records import (
    CheckClaim,
    CheckResult,
    ClaimKind,
    ClaimResult,
    Record,
    StoredResponse,
    decode_headers,
    encode_headers,
)
from proxy.store.base import CorruptRecord, StoreUnavailable
from proxy.store.guard import CANARY_KEY, CircuitBreaker, DataLossWatch, canary_keys
from proxy.store.pool import ConnectionPool, NoFreeConnection, Slots
from proxy.store.wake import Subscription, Waiters

logger = logging.getLogger("idempotency_proxy")

_UNREACHABLE = (
    TimeoutError,
    OSError,
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ClusterDownError,
    # No node of the cluster reachable (not a RedisError subclass).
    RedisClusterException,
)

SCRIPTS = (
    "claim",
    "mark_sent",
    "renew",
    "complete",
    "mark_unknown",
    "release",
    "resolve",
    "discard",
    "check_claim",
    "check_done",
)


# Without routes to derive it from (a store opened by a tool): the default lease plus the
# default upstream timeout.
DEFAULT_SAFE_MODE_SECONDS = 40.0


def _source(name: str) -> str:
    return resources.files("proxy.store").joinpath(f"lua/{name}.lua").read_text("utf-8")


# redis-py's cluster client raises MaxConnectionsError at once when every connection to a
# node is in use, where a single node's pool waits for one: a burst of requests larger than
# the pool would be refused and open the circuit. (Sentinel's pool has no bound at all.)
# So the store bounds its own commands in flight (`RedisStore._slots`), and the cluster
# client has a few connections more than that per node, for the canary's reads.
CLUSTER_SPARE_CONNECTIONS = 4


def _client(
    url: str,
    timeout: float,
    retries: int,
    max_connections: int,
    connection: dict[str, Any],
    sentinel_connection: dict[str, Any],
) -> Any:
    """The redis-py client for the URL's topology. `connection` (credentials, TLS) applies to
    every node; `sentinel_connection` to the sentinels."""
    retry = Retry(ExponentialBackoff(cap=0.05, base=0.005), retries)
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry,
        "health_check_interval": 0,
        **connection,
    }
    scheme, _, rest = url.partition("://")
    if scheme in ("redis+cluster", "rediss+cluster"):
        # The cluster client speaks TLS to every node it discovers when ssl is set.
        # The settings' credentials beat the URL's (`from_url` would do the opposite).
        options = {**parse_url(f"redis://{rest}"), **common}
        options.pop("connection_class", None)
        if scheme == "rediss+cluster":
            options["ssl"] = True
        # The store's own commands take a slot (RedisStore._slots) and are at most
        # `max_connections` at once; the spare connections serve the canary's reads.
        return RedisCluster(max_connections=max_connections + CLUSTER_SPARE_CONNECTIONS, **options)
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        parts = urlsplit(url)
        hosts = []
        for item in parts.netloc.rsplit("@", 1)[-1].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or item, int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(
                "redis+sentinel:// needs the master's name: redis+sentinel://h:p/mymaster"
            )
        service = unquote(path[0])
        db = int(path[1]) if len(path) > 1 else 0
        if parts.password and "password" not in common:
            common["password"] = unquote(parts.password)
        if parts.username and "username" not in common:
            common["username"] = unquote(parts.username)
        if scheme == "rediss+sentinel":
            common["ssl"] = True
        to_sentinels = {"socket_timeout": timeout, **sentinel_connection}
        if scheme == "rediss+sentinel":
            to_sentinels["ssl"] = True
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, socket_timeout=timeout, sentinel_kwargs=to_sentinels
        )
        return sentinel.master_for(service, db=db, **common)
    # Built from the parsed URL rather than `from_url`, so that the settings' credentials
    # beat the URL's, as they do on the hot path's pool.
    pool = BlockingConnectionPool(
        max_connections=max_connections,
        timeout=timeout,
        **{**parse_url(url), **_for_url(url, common)},
    )
    return Redis(connection_pool=pool, retry=retry)


def _for_url(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options for a single node: `ssl` (store.tls.enabled on a plain
    `redis://` URL) picks the TLS connection class, as `rediss://` does."""
    options = dict(options)
    if options.pop("ssl", False):
        options["connection_class"] = SSLConnection
    return options


class RedisStore:
    """Records in Redis (single node, Sentinel or Cluster), shared by every replica."""

    name = "redis"

    def __init__(self, settings: StoreSettings, *, safe_mode_seconds: float | None = None) -> None:
        """`safe_mode_seconds`: how long claims fail closed after a data loss; the proxy
        passes the longest lease plus upstream timeout of its routes."""
        url = settings.url
        timeout, retries = settings.timeout, settings.retries
        max_connections = settings.max_connections
        connection = settings.connection_options()
        sentinel_connection = settings.sentinel_options()
        self.url = url
        self.cluster = url.startswith(("redis+cluster://", "rediss+cluster://"))
        self.connection = connection
        self._client = _client(
            url, timeout, retries, max_connections, connection, sentinel_connection
        )
        self.waiters = Waiters()
        self.subscription = _subscription(url, timeout, self._client, self.connection, self.waiters)
        self._scripts = {name: self._client.register_script(_source(name)) for name in SCRIPTS}
        # A single node gets the lean hot path; Cluster and Sentinel keep the full client.
        self._pool = (
            None
            if "+" in url.partition("://")[0]
            else ConnectionPool(
                url,
                timeout=timeout,
                retries=retries,
                max_connections=max_connections,
                connection=_for_url(url, self.connection),
            )
        )
        # Cluster and Sentinel: the client's commands wait here for a connection, as the
        # lean pool's do in the pool (CLUSTER_SPARE_CONNECTIONS says why).
        self._slots = Slots(max_connections, timeout) if self._pool is None else None
        self._wait_replicas = settings.wait_replicas
        # WAIT acts on one connection; a cluster pipeline cannot route it to the shard.
        self.waits_for_replicas = settings.wait_replicas > 0 and not self.cluster
        self._wait_timeout_ms = max(1, int(settings.wait_timeout * 1000))
        self.replica_shortfalls = 0
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown)
        self.watch = DataLossWatch(
            DEFAULT_SAFE_MODE_SECONDS if safe_mode_seconds is None else safe_mode_seconds
        )
        self._canary_interval = settings.canary_interval
        # The slot map the canaries' masters were read from, and those masters.
        self._canary_topology: tuple[int, frozenset[str]] | None = None
        self._canary_masters: set[str] = set()
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def client(self) -> Any:
        return self._client

    async def start(self) -> None:
        try:
            if self.cluster:
                await self._client.initialize()
            await self._client.ping()
            for script in self._scripts.values():
                script.sha = await self._client.script_load(script.script)
        except Exception as exc:  # a cluster whose seed is down raises RedisClusterException
            raise StoreUnavailable(f"cannot reach {_safe_url(self.url)}: {exc}") from exc
        finally:
            if self._canary_interval > 0 and self._watch_task is None:
                self._watch_task = asyncio.create_task(self._watch_canary())

    async def close(self) -> None:
        await self.subscription.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            await asyncio.gather(self._watch_task, return_exceptions=True)
        if self._pool is not None:
            await self._pool.aclose()
        await self._client.aclose()

    def canaries(self) -> list[str]:
        """The canary keys to read now: one on a single node (or Sentinel's master), one
        per master on a cluster, re-chosen from the client's slot map on every read so
        that a failover, a new master or a resharding is followed."""
        if not self.cluster:
            return [CANARY_KEY]
        manager = self._client.nodes_manager
        slots = manager.slots_cache
        # Which masters own slots takes a walk over the 16384 slots: only when the
        # client reloaded its slot map or the set of masters changed.
        signature = (id(slots), frozenset(node.name for node in self._client.get_primaries()))
        if signature != self._canary_topology:
            self._canary_topology = signature
            self._canary_masters = {nodes[0].name for nodes in slots.values() if nodes}

        def owner_of(key: str) -> str | None:
            nodes = slots.get(self._client.keyslot(key))
            return str(nodes[0].name) if nodes else None

        names = sorted(canary_keys(self._canary_masters, owner_of).values())
        self.watch.watch_only(names)
        return names

    async def check_canary(self) -> None:
        """Read every canary once; a vanished one puts claims into safe mode. One master
        that does not answer does not stop the others from being read."""
        results = await asyncio.gather(
            *(self._check_one(key) for key in self.canaries()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _check_one(self, key: str) -> None:
        current = await self._client.get(key)
        # SET NX: when several replicas notice at once (replicas starting together, or a
        # loss), one value wins; the others adopt it now, or their next read would look
        # like another loss and put them into safe mode for nothing.
        if self.watch.observe(key, current) and not await self._client.set(
            key, self.watch.seen[key], nx=True
        ):
            winner = await self._client.get(key)
            if winner is not None:
                self.watch.seen[key] = winner

    async def _watch_canary(self) -> None:
        while True:
            try:
                await self.check_canary()
            except (TimeoutError, RedisError, RedisClusterException, OSError):
                pass  # an outage is answered per request; only a loss matters here
            except Exception as exc:
                # The cluster client can raise other errors while its topology moves; the
                # watch must outlive them, or a later loss would go unnoticed.
                logger.warning("canary read failed", extra={"error": type(exc).__name__})
            await asyncio.sleep(self._canary_interval)

    async def _run(self, name: str, key: str, *args: Any, wait: bool = False) -> Any:
        """Run one script on one key; with `wait`, also WAIT for replicas on that connection."""
        self.breaker.before()
        wait = wait and self.waits_for_replicas
        try:
            if self._pool is not None:
                result, acknowledged = await self._run_pooled(name, key, args, wait)
            else:
                result, acknowledged = await self._run_client(name, key, args, wait)
        except Exception as exc:
            raise self._failure(exc) from exc
        self.breaker.success()
        if wait and int(acknowledged) < self._wait_replicas:
            self.replica_shortfalls += 1
        return result

    def _failure(self, exc: Exception) -> StoreUnavailable:
        """Whatever the client raised, as the store's failure: never a 500.

        A node down or coming back makes the cluster client raise more than RedisError
        (RuntimeError and AttributeError from a closed transport, RedisClusterException):
        all of it is an unreachable store. An error answer from Redis itself is not, and
        must not open the circuit: one corrupt record (WRONGTYPE) would take every other
        key down with it.
        """
        if isinstance(exc, ResponseError) and not isinstance(exc, _UNREACHABLE):
            if str(exc).startswith("WRONGTYPE"):
                return CorruptRecord("not a hash")
            return StoreUnavailable(type(exc).__name__)
        if isinstance(exc, NoFreeConnection):
            return StoreUnavailable("no-free-connection")  # a local queue, not Redis failing
        self.breaker.failure()
        return StoreUnavailable(type(exc).__name__)

    async def _run_pooled(
        self, name: str, key: str, args: tuple[Any, ...], wait: bool
    ) -> tuple[Any, int]:
        script = self._scripts[name]
        commands: list[tuple[Any, ...]] = [("EVALSHA", script.sha, 1, key, *args)]
        if wait:
            commands.append(("WAIT", self._wait_replicas, self._wait_timeout_ms))
        assert self._pool is not None
        replies = await self._pool.execute(commands)
        if isinstance(replies[0], NoScriptError):
            # Redis restarted without its script cache: load it and go once more.
            script.sha = await self._client.script_load(script.script)
            commands[0] = ("EVALSHA", script.sha, 1, key, *args)
            replies = await self._pool.execute(commands)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies[0], (replies[1] if wait else 0)

    async def _run_client(
        self, name: str, key: str, args: tuple[Any, ...], wait: bool
    ) -> tuple[Any, int]:
        script = self._scripts[name]
        assert self._slots is not None
        async with self._slots:
            if not wait:
                return await script(keys=[key], args=args), 0
            async with self._client.pipeline(transaction=False) as pipe:
                await script(keys=[key], args=args, client=pipe)
                pipe.wait(self._wait_replicas, self._wait_timeout_ms)
                result, acknowledged = await pipe.execute()
        return result, int(acknowledged)

    async def claim(
        self,
        key: str,
        token: str,
        fingerprint: str,
        lease_ms: int,
        retention_ms: int,
        *,
        waiting: bool = False,
    ) -> ClaimResult:
        if self.watch.active:
            raise StoreUnavailable("safe-mode")
        if waiting:
            self.subscription.ensure()
        reply = await self._run(
            "claim",
            key,
            token,
            fingerprint,
            lease_ms,
            retention_ms,
            b"1" if waiting else b"0",
            wait=True,
        )
        return _claim_result(reply)

    async def settled(self, key: str, timeout: float) -> bool:
        return await self.waiters.wait(key, timeout)

    async def mark_sent(self, key: str, token: str, lease_ms: int, check: str = "") -> bool:
        # WAIT here too: SENT is the write that must reach a replica before the first byte
        # goes out, or a failover leaves CLAIMED behind and a take-over sends again.
        return bool(await self._run("mark_sent", key, token, lease_ms, check, wait=True))

    async def claim_check(
        self, key: str, token: str, lease_ms: int, max_checks: int, min_age_ms: int
    ) -> CheckClaim | int | None:
        reply = await self._run("check_claim", key, token, lease_ms, max_checks, min_age_ms)
        kind = _text(reply[0])
        if kind == "claimed":
            return CheckClaim(_text(reply[1]), int(reply[2]))
        if kind == "later":
            return max(0, int(reply[1]))
        return None

    async def finish_check(
        self,
        key: str,
        token: str,
        result: CheckResult,
        response: StoredResponse | None,
        backoff_ms: int,
    ) -> bool:
        response = response or StoredResponse(0)
        reply = await self._run(
            "check_done",
            key,
            token,
            result.value,
            response.status,
            encode_headers(response.headers),
            response.body,
            backoff_ms,
            wait=True,
        )
        return bool(reply)

    async def renew(self, key: str, token: str, lease_ms: int) -> bool:
        return bool(await self._run("renew", key, token, lease_ms))

    async def complete(self, key: str, token: str, response: StoredResponse, how: str = "") -> bool:
        reply = await self._run(
            "complete",
            key,
            token,
            response.status,
            encode_headers(response.headers),
            response.body,
            b"1" if response.replayable else b"0",
            how,
            wait=True,
        )
        return bool(reply)

    async def mark_unknown(self, key: str, token: str, status: int, reason: str) -> bool:
        return bool(await self._run("mark_unknown", key, token, status, reason, wait=True))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._run("release", key, token))

    async def get(self, key: str) -> Record | None:
        try:
            async with self._slots or contextlib.nullcontext():
                # One after the other: on a cluster each takes a connection of its own.
                fields = await self._client.hgetall(key)
                ttl = await self._client.pttl(key)
                timing = await self._client.time()
        except ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise CorruptRecord("not a hash") from exc
            raise StoreUnavailable(type(exc).__name__) from exc
        except Exception as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        if not fields:
            return None
        now_ms = int(timing[0]) * 1000 + int(timing[1]) // 1000
        try:
            return _record(fields, int(ttl), now_ms)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CorruptRecord(f"unreadable record ({type(exc).__name__})") from exc

    async def resolve(self, key: str, response: StoredResponse, force: bool) -> bool:
        reply = await self._run(
            "resolve",
            key,
            response.status,
            encode_headers(response.headers),
            response.body,
            b"1" if force else b"0",
        )
        if int(reply) < 0:
            raise KeyError(key)
        return bool(reply == 1)

    async def discard(self, key: str, force: bool) -> bool:
        reply = await self._run("discard", key, b"1" if force else b"0")
        if int(reply) < 0:
            raise KeyError(key)
        return bool(reply == 1)

    async def server_info(self) -> dict[str, Any]:
        """Settings that decide whether records survive: eviction, persistence, replication."""
        try:
            policy = await self._client.config_get("maxmemory-policy")
            persistence = await self._client.info("persistence")
            replication = await self._client.info("replication")
        except Exception as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return {"config": policy, "persistence": persistence, "replication": replication}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _subscription(
    url: str, timeout: float, client: Any, connection: dict[str, Any], waiters: Waiters
) -> Subscription:
    """Sentinel: the master's client (it follows failovers). Cluster: one node, since a
    classic PUBLISH reaches every node. A single node: its own connection. Credentials and
    TLS as for the store's other connections; no read timeout (it listens)."""
    scheme, _, rest = url.partition("://")
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return Subscription(lambda: client, waiters, owned=False)
    options: dict[str, Any] = {"socket_connect_timeout": timeout, **connection}
    if scheme in ("redis+cluster", "rediss+cluster"):
        node = "redis://" + rest.split(",", 1)[0]
        if scheme == "rediss+cluster":
            options["ssl"] = True
        url = node
    settings = {**parse_url(url), **_for_url(url, options), "socket_timeout": None}
    return Subscription(lambda: Redis(**settings), waiters)


def _claim_result(reply: list[Any]) -> ClaimResult:
    """The claim script's answer; a record that cannot be read raises CorruptRecord.

    A field the script found missing cuts its reply short (Lua arrays end at the first
    nil), so a short reply is as corrupt as a malformed field.
    """
    try:
        return _parse_claim(reply)
    except (IndexError, TypeError, ValueError, AttributeError) as exc:
        # The type only: a field's content must not reach the logs.
        raise CorruptRecord(f"unreadable claim reply ({type(exc).__name__})") from exc


def _parse_claim(reply: list[Any]) -> ClaimResult:
    kind = _text(reply[0])
    if kind == "claimed":
        return ClaimResult(ClaimKind.CLAIMED, fence=int(reply[1]))
    if kind == "completed":
        status = _status(reply[1])
        body = reply[3] or b""
        if status in (204, 304) and body:
            raise ValueError("a body in a response that has none")
        response = StoredResponse(
            status=status,
            headers=decode_headers(reply[2], strict=True),
            body=body,
            replayable=reply[4] != b"0",
        )
        return ClaimResult(ClaimKind.COMPLETED, response=response, ttl_ms=int(reply[5]))
    if kind == "unknown":
        return ClaimResult(
            ClaimKind.UNKNOWN,
            response=StoredResponse(status=_status(reply[1])),
            reason=_text(reply[2]),
        )
    if kind == "in_flight":
        return ClaimResult(ClaimKind.IN_FLIGHT, retry_after_ms=max(0, int(reply[1])))
    if kind == "mismatch":
        return ClaimResult(ClaimKind.MISMATCH)
    raise ValueError("unexpected claim reply")


def _status(value: Any) -> int:
    status = int(value)
    if not 100 <= status <= 599:
        raise ValueError("status out of range")
    return status


def _record(fields: dict[bytes, bytes], ttl_ms: int, now_ms: int) -> Record:
    get = fields.get
    state = _text(get(b"state", b"?"))
    response = None
    if state == "COMPLETED":
        response = StoredResponse(
            status=int(get(b"status", b"0")),
            headers=decode_headers(get(b"headers")),
            body=get(b"body", b""),
            replayable=get(b"replayable") != b"0",
        )
    lease = get(b"lease")
    return Record(
        state=state,
        token=_text(get(b"token", b"")),
        fence=int(get(b"fence", b"0")),
        fingerprint=_text(get(b"fp", b"")),
        created_ms=int(get(b"created", b"0")),
        lease_remaining_ms=(int(lease) - now_ms) if lease else None,
        ttl_ms=ttl_ms,
        reason=_text(get(b"reason", b"")),
        response=response,
        checks=int(get(b"checks", b"0")),
    )


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(parts.password, "***")
    return url
