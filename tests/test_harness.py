"""Fast checks that the process supervisor (devstack) works, so other suites can trust it."""

from __future__ import annotations

import socket

import pytest
import redis
from harness import (
    BackendServer,
    HarnessError,
    RedisCluster,
    RedisFactory,
    RedisServer,
    free_port,
    free_port_pair,
    wait_for_port,
)


def test_free_ports_are_bindable_and_distinct() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    port, bus = free_port_pair()
    assert bus == port + 10000
    for p in (port, bus):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", p))


def test_redis_server_set_get(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    wait_for_port("127.0.0.1", redis_server.port, 1.0)
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    client.set("k", "v")
    assert redis_server.client().get("k") == b"v"


def test_redis_kill_then_restart_with_aof_keeps_data(redis_factory: RedisFactory) -> None:
    server = redis_factory(appendonly=True)
    port = server.port
    server.client().set("survives", "yes")
    server.kill()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        server.client().ping()
    server.restart()
    assert server.port == port
    assert server.client().get("survives") == b"yes"


def test_redis_restart_without_aof_loses_data(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    server.client().set("gone", "1")
    server.restart()
    assert server.client().get("gone") is None


def test_redis_pause_and_resume(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    server.pause()
    assert server.paused
    with pytest.raises(redis.TimeoutError):
        server.client(socket_timeout=0.3).ping()
    server.resume()
    assert server.client().ping()


def test_redis_bad_option_fails_fast_with_log(redis_factory: RedisFactory) -> None:
    server = redis_factory(args=["--no-such-option", "x"], start=False)
    with pytest.raises(HarnessError, match="no-such-option"):
        server.start()
    assert not server.running


def test_redis_cluster_routes_keys_and_tagged_multikey(redis_cluster: RedisCluster) -> None:
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"
    client = redis_cluster.client()
    try:
        keys = [f"key-{i}" for i in range(30)]
        owners = {client.get_node_from_key(k).port for k in keys}
        assert len(owners) == 3, "keys should spread over all three masters"
        for k in keys:
            client.set(k, k)
        assert [client.get(k) for k in keys] == [k.encode() for k in keys]

        lock, result = "{order-42}:lock", "{order-42}:result"
        assert client.keyslot(lock) == client.keyslot(result)
        assert client.mset({lock: "1", result: "paid"})
        assert client.mget([lock, result]) == [b"1", b"paid"]
        swapped = client.eval(
            "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('GET', KEYS[2])",
            2,
            lock,
            result,
            "2",
        )
        assert swapped == b"paid"
        assert client.get(lock) == b"2"
    finally:
        client.close()


def test_backend_server_ledger(ledger_backend: BackendServer) -> None:
    assert ledger_backend.ledger()["charges"] == 0
    with ledger_backend.http() as client:
        response = client.post(
            "/v1/orders/pay", json={"order_id": "o-1", "amount": 1000, "currency": "EUR"}
        )
    assert response.status_code < 300, response.text
    ledger = ledger_backend.ledger()
    assert ledger["orders"] == {"o-1": 1}
    assert ledger["double_charged_count"] == 0
    ledger_backend.reset()
    assert ledger_backend.ledger()["orders"] == {}
