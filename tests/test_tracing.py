"""Tracing: one span per request on a protected route, with the store calls and the upstream
call as children; an incoming `traceparent` continued; the backend told that the proxy's
upstream span is its parent; the trace id in the request's log line; never a key, a body or
a header's value in a span. Without the `OTEL_*` environment the header passes untouched and
the proxy does not even need the OpenTelemetry packages.

The span tree is checked with the SDK's in-memory exporter on the real ASGI app served by
uvicorn in a thread (real Redis, real backend process); the environment switch, the log line
and the propagation are checked on real proxy processes (console exporter).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from harness import (
    HOST,
    REPO_ROOT,
    BackendServer,
    ProxyFactory,
    ProxyServer,
    child_env,
    free_port,
    wait_for_port,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.app import ProxyApp
from proxy.config import Settings
from proxy.tracing import Tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
KEY = "key-SECRET-5521"
BODY = b'{"card": "4111-SECRET-1111", "amount": 7}'
ECHO_ROUTE = {
    "name": "echo",
    "methods": ["POST"],
    "path": "/v1/echo",
    "key": {"from": "header", "name": "Idempotency-Key"},
}
CONSOLE_ENV = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"}


def _headers(**extra: str) -> dict[str, str]:
    return {
        "Idempotency-Key": KEY,
        "Content-Type": "application/json",
        "Authorization": "Bearer tok-SECRET",
        **extra,
    }


@contextmanager
def in_process_proxy(settings: Settings, tracing: Tracing) -> Iterator[str]:
    """The proxy's ASGI app on uvicorn in a thread, so that its spans can be read here."""
    port = free_port()
    config = uvicorn.Config(
        ProxyApp(settings, tracing=tracing),
        host=HOST,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(HOST, port, 15.0)
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def _finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The finished spans once there are `count` (bounded wait): the completion's store
    span may end just after the client has its answer, which does not wait for it."""
    deadline = time.monotonic() + 10.0
    spans = list(exporter.get_finished_spans())
    while len(spans) < count and time.monotonic() < deadline:
        time.sleep(0.01)
        spans = list(exporter.get_finished_spans())
    return spans


def _by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def _no_secrets(spans: list[ReadableSpan]) -> None:
    for span in spans:
        text = json.dumps(dict(span.attributes or {})) + span.name
        for event in span.events:
            text += json.dumps(dict(event.attributes or {}))
        for secret in ("SECRET", KEY, "4111"):
            assert secret not in text, (span.name, text)


def test_span_tree_and_the_traceparent_the_backend_receives(
    ledger_backend: BackendServer, redis_url: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings.model_validate(
        {"upstream": ledger_backend.url, "store": {"url": redis_url}, "routes": [ECHO_ROUTE]}
    )
    with (
        in_process_proxy(settings, Tracing(provider)) as url,
        httpx.Client(trust_env=False, timeout=10) as http,
    ):
        first = http.post(
            f"{url}/v1/echo?headers=1", content=BODY, headers=_headers(traceparent=TRACEPARENT)
        )
        assert first.status_code == 200
        received = first.json()
        spans = _finished(exporter, 5)
        exporter.clear()
        replay = http.post(
            f"{url}/v1/echo?headers=1", content=BODY, headers=_headers(traceparent=TRACEPARENT)
        )
        assert replay.headers["idempotent-replayed"] == "true"
        replay_spans = list(exporter.get_finished_spans())
        exporter.clear()
        fresh = http.post(
            f"{url}/v1/echo?headers=1", content=BODY, headers=_headers(**{"Idempotency-Key": "k2"})
        )
        assert fresh.status_code == 200
        fresh_spans = list(exporter.get_finished_spans())
    provider.shutdown()

    named = _by_name(spans)
    assert set(named) == {
        "POST echo",
        "store claim",
        "store mark_sent",
        "upstream",
        "store complete",
    }
    root = named["POST echo"]
    # The incoming trace is continued: same trace id, the client's span is the parent.
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
    for name in ("store claim", "store mark_sent", "upstream", "store complete"):
        child = named[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id, name
        assert child.context.trace_id == root.context.trace_id
    attributes = dict(root.attributes or {})
    assert attributes["idempotency.route"] == "echo"
    assert attributes["idempotency.outcome"] == "forwarded"
    assert attributes["idempotency.replayed"] is False
    assert attributes["http.response.status_code"] == 200
    assert len(str(attributes["idempotency.key_hash"])) >= 8
    # The backend's parent is the proxy's upstream span, in the same trace.
    upstream = named["upstream"]
    assert received["traceparent"] == (f"00-{TRACE_ID}-{upstream.context.span_id:016x}-01"), (
        received["traceparent"]
    )
    _no_secrets(spans)

    # The duplicate: one span, a replay from the process's cache without a store call.
    replayed = _by_name(replay_spans)
    assert set(replayed) == {"POST echo"}
    replay_attributes = dict(replayed["POST echo"].attributes or {})
    assert replay_attributes["idempotency.replayed"] is True
    assert replay_attributes["idempotency.outcome"] == "replayed"
    assert replay_attributes["idempotency.key_hash"] == attributes["idempotency.key_hash"]
    _no_secrets(replay_spans)

    # Without an incoming traceparent the proxy starts the trace and the backend joins it.
    root2 = _by_name(fresh_spans)["POST echo"]
    assert root2.parent is None
    assert f"{root2.context.trace_id:032x}" in fresh.json()["traceparent"]


def _request_line(proxy: ProxyServer) -> dict[str, Any]:
    lines = [
        json.loads(raw)
        for raw in proxy.logs().splitlines()
        if raw.startswith('{"ts"') and '"msg":"request"' in raw
    ]
    assert len(lines) == 1, lines
    return lines[0]


async def test_tracing_from_the_environment_on_a_real_process(
    ledger_backend: BackendServer,
    redis_url: str,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(
        ledger_backend.url, redis_url, config={"routes": [ECHO_ROUTE]}, env=CONSOLE_ENV
    )
    answer = await client.post(
        f"{proxy.url}/v1/echo?headers=1", content=BODY, headers=_headers(traceparent=TRACEPARENT)
    )
    assert answer.status_code == 200
    sent = answer.json()["traceparent"]
    version, trace_id, parent, flags = sent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent != PARENT_ID  # the proxy's own upstream span
    proxy.stop()  # flushes the exporter
    assert _request_line(proxy)["trace_id"] == TRACE_ID
    log = proxy.logs()
    for name in ("POST echo", "store claim", "store mark_sent", "upstream", "store complete"):
        assert f'"name": "{name}"' in log, name
    assert f'"span_id": "0x{parent}"' in log


async def test_without_tracing_the_traceparent_passes_untouched(
    ledger_backend: BackendServer,
    redis_url: str,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(ledger_backend.url, redis_url, config={"routes": [ECHO_ROUTE]})
    answer = await client.post(
        f"{proxy.url}/v1/echo?headers=1",
        content=BODY,
        headers=_headers(traceparent=TRACEPARENT, tracestate="vendor=x"),
    )
    received = answer.json()
    assert received["traceparent"] == TRACEPARENT
    assert received["tracestate"] == "vendor=x"
    proxy.stop()
    assert "trace_id" not in _request_line(proxy)


def _refused_start(upstream: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`proxy run` that must stop at start-up (bounded: it would otherwise serve)."""
    refused = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--upstream", upstream, "--port", "0"],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0, refused.stderr
    return refused


def _without_opentelemetry(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import opentelemetry` fails, as where it is not installed."""
    stub = tmp_path / "no-otel" / "opentelemetry"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('opentelemetry is not installed')\n")
    return {"PYTHONPATH": f"{stub.parent}{':'}{REPO_ROOT}"}


async def test_starts_without_the_packages_unless_tracing_is_configured(
    ledger_backend: BackendServer,
    redis_url: str,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    env = _without_opentelemetry(tmp_path)
    proxy = proxy_factory(ledger_backend.url, redis_url, config={"routes": [ECHO_ROUTE]}, env=env)
    answer = await client.post(f"{proxy.url}/v1/echo", content=BODY, headers=_headers())
    assert answer.status_code == 200

    refused = _refused_start(
        ledger_backend.url, {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    )
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "idempotency-proxy[tracing]" in lines[0]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
    ],
)
def test_unsupported_tracing_settings_are_one_line(
    ledger_backend: BackendServer, env: dict[str, str], message: str
) -> None:
    refused = _refused_start(ledger_backend.url, env)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], refused.stderr
