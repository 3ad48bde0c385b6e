#!/usr/bin/env python3
"""What tracing costs the proxy: CPU per request of the proxy's own code, without tracing and
with it, on the miss path (claim, mark SENT, forward, complete) and the replay path.

The ASGI app is driven in-process, without sockets, on the memory store and an upstream that
answers at once, so that the number is the proxy's own work and nothing else: the part that
tracing could make more expensive. With tracing, spans go through the SDK's batch processor
to an exporter that drops them (the OTLP encoding and network happen on the processor's
thread, off the request path, and depend on the collector).

    PYTHONPATH=. .venv/bin/python scripts/bench_tracing.py [--requests N] [--rounds R]
                                   [--off-only] [--write docs/benchmarks-tracing.md]

Bounded: N requests per path and mode per round (default 3000, 5 rounds), one process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import inspect
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.app import ProxyApp
from proxy.config import Settings
from proxy.upstream import UpstreamResponse

ROUTE = {
    "name": "charges",
    "methods": ["POST"],
    "path": "/v1/charges",
    "key": {"from": "header", "name": "Idempotency-Key"},
}
BODY = b'{"amount": 1250, "currency": "EUR"}'


class InstantUpstream:
    """An upstream that answers 201 at once: no socket, no backend time."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        return UpstreamResponse(
            201, [(b"content-type", b"application/json")], b'{"id": "ch_1", "status": "ok"}'
        )


def _tracing(enabled: bool) -> Any:
    if not enabled:
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from proxy.tracing import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return Tracing(provider)


def _app(tracing: bool) -> ProxyApp:
    settings = Settings.model_validate(
        {"upstream": "http://127.0.0.1:9", "routes": [ROUTE], "log_level": "warning"}
    )
    if "tracing" in inspect.signature(ProxyApp).parameters:
        app = ProxyApp(settings, tracing=_tracing(tracing))
    elif tracing:
        raise SystemExit("this checkout has no tracing")
    else:
        app = ProxyApp(settings)
    upstream = InstantUpstream()
    app.upstream = upstream  # type: ignore[assignment]
    lifecycle = app.lifecycle
    # With tracing the lifecycle wraps the upstream; keep the wrapper, swap what it wraps.
    inner = getattr(lifecycle.upstream, "inner", None)
    if inner is not None:
        lifecycle.upstream.inner = upstream  # type: ignore[attr-defined]
    else:
        lifecycle.upstream = upstream  # type: ignore[assignment]
    return app


async def _drive(app: ProxyApp, keys: list[bytes]) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    for key in keys:
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/charges",
            "raw_path": b"/v1/charges",
            "query_string": b"",
            "scheme": "http",
            "client": ("127.0.0.1", 50000),
            "headers": [
                (b"host", b"proxy"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode()),
                (b"idempotency-key", key),
                (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ],
        }
        await app(scope, receive, send)


async def _measure(tracing: bool, requests: int, nonce: str) -> dict[str, float]:
    app = _app(tracing)
    await app.startup()
    try:
        misses = [f"{nonce}-{n}".encode() for n in range(requests)]
        await _drive(app, [f"warm-{nonce}-{n}".encode() for n in range(200)])
        gc.collect()
        started = time.process_time()
        await _drive(app, misses)
        miss = (time.process_time() - started) / requests * 1e6
        started = time.process_time()
        await _drive(app, misses)  # every key is COMPLETED now: replays
        replay = (time.process_time() - started) / requests * 1e6
    finally:
        await app.shutdown()
    return {"miss": miss, "replay": replay}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--off-only", action="store_true", help="only without tracing")
    parser.add_argument("--write", metavar="MD", help="write the result as markdown")
    args = parser.parse_args(argv)
    # The memory store's start-up warning, once per app; request lines are off (no handler).
    logging.getLogger("idempotency_proxy").setLevel(logging.ERROR)
    modes = ["off"] if args.off_only else ["off", "on"]
    results: dict[str, dict[str, list[float]]] = {m: {"miss": [], "replay": []} for m in modes}
    for round_ in range(args.rounds):
        # Interleaved, order rotated, so that drift on a shared machine hits both modes.
        for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
            sample = asyncio.run(_measure(mode == "on", args.requests, f"{mode}{round_}"))
            for path, value in sample.items():
                results[mode][path].append(value)
    print(f"CPU per request, us (median of {args.rounds} rounds of {args.requests} requests)")
    for path in ("miss", "replay"):
        line = f"  {path:6}"
        for mode in modes:
            values = results[mode][path]
            line += f"  tracing {mode}: {statistics.median(values):7.1f}"
            line += f" ({min(values):.1f}-{max(values):.1f})"
        if len(modes) == 2:
            off = statistics.median(results["off"][path])
            on = statistics.median(results["on"][path])
            line += f"  cost: +{on - off:.1f} us ({on / off - 1:+.0%})"
        print(line)
    if args.write and len(modes) == 2:
        Path(args.write).write_text(_markdown(results, args))
        print(f"wrote {args.write}")
    return 0


def _markdown(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    when = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    rows = []
    miss_cost = statistics.median(results["on"]["miss"]) - statistics.median(results["off"]["miss"])
    for path in ("miss", "replay"):
        off, on = (statistics.median(results[m][path]) for m in ("off", "on"))
        spread = {m: f"{min(results[m][path]):.0f}-{max(results[m][path]):.0f}" for m in results}
        rows.append(
            f"| {path} | {off:.0f} ({spread['off']}) | {on:.0f} ({spread['on']}) "
            f"| +{on - off:.0f} us |"
        )
    return "\n".join(
        [
            "# What tracing costs",
            "",
            f"Generated by `scripts/bench_tracing.py` on {when} (UTC): CPU time per request of "
            f"the proxy's own code (median of {args.rounds} rounds of {args.requests} "
            "requests; the range in brackets), driven in-process on the memory store and an "
            "upstream that answers at once, so that nothing but the proxy's work is counted. "
            "With tracing, every request carries a `traceparent` and its spans go through the "
            "SDK's batch processor to an exporter that drops them (encoding and sending happen "
            "on the processor's thread and depend on the collector).",
            "",
            "| path | tracing off, us | tracing on, us | cost |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            "The miss path makes five spans (the request, three store calls and the upstream "
            "call), the replay path one. A real proxy process spends about 1.2 ms of CPU on a "
            "miss on this class of machine (sockets, uvicorn, aiohttp, redis-py: see "
            f"benchmarks.md), so tracing adds roughly {miss_cost / 1200:.0%} to it, and the "
            "CPU-bound miss-path throughput drops by about as much. Exporting over OTLP adds "
            "the encoding on the batch processor's thread, in the same process.",
            "",
            "Without tracing configured the proxy holds no tracer: the lifecycle keeps its "
            "untraced methods and the upstream client is not wrapped, so the hot path is the "
            "code it was before tracing existed. Measured with `--off-only` against the "
            "previous commit, the two were within this machine's run-to-run noise.",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
