"""The store's share of the miss path, measured against the benchmark's own Redis.

Three numbers explain most of the miss path: the loopback round trip to Redis
(the floor under each of the three transitions), and the CPU one EVALSHA costs
through redis-py's client versus through the proxy's lean connection pool
(proxy/store/pool.py), which is why the single-node store uses the pool.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from proxy.store.pool import ConnectionPool

# A transition-sized script: read two fields, write two, like mark_sent.
SCRIPT = (
    "local r = redis.call('HMGET', KEYS[1], 'state', 'token') "
    "redis.call('HSET', KEYS[1], 'state', 'SENT', 'lease', ARGV[1]) return 1"
)
OPS = 20_000
CONCURRENCY = 32


async def _throughput(call: Callable[[str, int], Awaitable[Any]]) -> dict[str, float]:
    async def worker(i: int) -> None:
        for n in range(OPS // CONCURRENCY):
            await call(f"bench:{{{i}}}", n)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"ops_per_s": OPS / wall, "cpu_us_per_op": cpu / OPS * 1e6}


async def _measure(port: int) -> dict[str, Any]:
    url = f"redis://127.0.0.1:{port}/0"
    retry = Retry(ExponentialBackoff(cap=0.05, base=0.005), 2)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=0.5, socket_timeout=0.5, retry=retry
    )
    client = Redis(connection_pool=pool, retry=retry)
    sha = await client.script_load(SCRIPT)
    lean = ConnectionPool(url, timeout=0.5, retries=2, max_connections=64)

    rtts = []
    for _ in range(2000):
        started = time.perf_counter()
        await lean.execute([("PING",)])
        rtts.append((time.perf_counter() - started) * 1000)

    async def via_client(key: str, n: int) -> Any:
        return await client.evalsha(sha, 1, key, n)

    async def via_pool(key: str, n: int) -> Any:
        return await lean.execute([("EVALSHA", sha, 1, key, n)])

    result = {
        "ping_rtt_ms_p50": statistics.median(rtts[200:]),
        "redis_py_client": await _throughput(via_client),
        "lean_pool": await _throughput(via_pool),
    }
    await client.aclose()
    await lean.aclose()
    return result


def measure_store(port: int) -> dict[str, Any]:
    """Round-trip latency and per-EVALSHA CPU against the Redis on `port`."""
    import uvloop

    return uvloop.run(_measure(port))
