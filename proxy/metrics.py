"""Prometheus metrics. Labels are route names and outcomes only: never keys, order ids,
raw paths or client addresses, which would leak data and explode cardinality."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__

# The `_created` series double every counter and histogram and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        # Which build is running, for dashboards and alerts across a rollout.
        Gauge(
            "idempotency_proxy_build_info",
            "The running version (always 1).",
            ["version", "python"],
            registry=self.registry,
        ).labels(__version__, platform.python_version()).set(1)
        self.requests = Counter(
            "idempotency_proxy_requests_total",
            "Requests answered, by route and outcome.",
            ["route", "outcome"],
            registry=self.registry,
        )
        self.upstream_seconds = Histogram(
            "idempotency_proxy_upstream_seconds",
            "Time from sending a request upstream to having its response.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "idempotency_proxy_store_seconds",
            "Time of one store operation.",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "idempotency_proxy_in_flight_requests",
            "Protected requests this process is forwarding now.",
            registry=self.registry,
        )
        self.store_errors = Counter(
            "idempotency_proxy_store_errors_total",
            "Store operations that failed or timed out.",
            ["operation"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "idempotency_proxy_record_transitions_total",
            "Record state changes made by this process.",
            ["to"],
            registry=self.registry,
        )
        self.fenced = Counter(
            "idempotency_proxy_fenced_total",
            "Transitions refused because another owner holds the record.",
            ["operation"],
            registry=self.registry,
        )
        self.corrupt_records = Counter(
            "idempotency_proxy_store_corrupt_records_total",
            "Claims that found a record they could not read (answered 409, left as it is).",
            registry=self.registry,
        )
        self.replayed_bytes = Counter(
            "idempotency_proxy_replayed_bytes_total",
            "Body bytes answered from stored responses.",
            registry=self.registry,
        )
        self.held_exchanges = Gauge(
            "idempotency_proxy_held_exchanges",
            "Exchanges kept open past the client's timeout, waiting for a late answer.",
            registry=self.registry,
        )
        self.resolutions = Counter(
            "idempotency_proxy_outcome_resolutions_total",
            "How timed-out or ambiguous exchanges ended: via late_answer or status_check, "
            "by result (executed, released, unknown, ...).",
            ["via", "result"],
            registry=self.registry,
        )
        self.observed = Counter(
            "idempotency_proxy_observed_total",
            "Observe mode: duplicates forwarded that enforcement would have answered itself, "
            "by what it would have done.",
            ["route", "would"],
            registry=self.registry,
        )
        self.health = StoreHealth()
        self.registry.register(self.health)
        # labels() takes a lock and builds a key on every call; the label sets are few
        # and fixed, so resolve each child once.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count(self, route: str, outcome: str) -> None:
        self._child(self.requests, route, outcome).inc()

    def transition(self, to: str) -> None:
        self._child(self.transitions, to).inc()

    def fence(self, operation: str) -> None:
        self._child(self.fenced, operation).inc()

    def resolution(self, via: str, result: str) -> None:
        self._child(self.resolutions, via, result).inc()

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        self._child(self.store_seconds, operation).observe(seconds)
        if failed:
            self._child(self.store_errors, operation).inc()

    def upstream_call(self, route: str, seconds: float) -> None:
        self._child(self.upstream_seconds, route).observe(seconds)

    def observe(self, route: str, would: str) -> None:
        self._child(self.observed, route, would).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StoreHealth(Collector):
    """Store and replay-cache state, read at scrape time from the objects that keep it, so
    the hot path pays nothing for it. Every family is exported from the start (zeros
    until a store is attached), so dashboards and alerts never read a missing series."""

    def __init__(self) -> None:
        self.store: Any = None
        self.cache: Any = None

    def attach(self, store: Any, cache: Any) -> None:
        self.store = store
        self.cache = cache

    def collect(self) -> Iterator[Metric]:
        store, cache = self.store, self.cache
        # The memory store has no breaker, canary or replicas: its families stay at 0.
        breaker = getattr(store, "breaker", None)
        watch = getattr(store, "watch", None)
        yield _gauge(
            "idempotency_proxy_store_circuit_open",
            "1 while the store circuit breaker is open (claims answered 503 at once).",
            bool(breaker is not None and breaker.is_open),
        )
        yield _counter(
            "idempotency_proxy_store_circuit_opened",
            "Times the store circuit breaker opened after a run of failures.",
            getattr(breaker, "opened", 0),
        )
        yield _gauge(
            "idempotency_proxy_store_safe_mode",
            "1 while claims fail closed because the store lost data (canary gone).",
            bool(watch is not None and watch.active),
        )
        yield _counter(
            "idempotency_proxy_store_data_losses",
            "Store data losses detected through the canary key.",
            getattr(watch, "losses", 0),
        )
        yield _counter(
            "idempotency_proxy_store_wait_shortfalls",
            "Writes that fewer replicas acknowledged than wait_replicas asks for.",
            getattr(store, "replica_shortfalls", 0),
        )
        yield _counter(
            "idempotency_proxy_replay_cache_hits",
            "Duplicates answered from this process's replay cache, without the store.",
            getattr(cache, "hits", 0),
        )
        yield _counter(
            "idempotency_proxy_replay_cache_misses",
            "Replay cache look-ups that went on to the store.",
            getattr(cache, "misses", 0),
        )
        yield _gauge(
            "idempotency_proxy_replay_cache_entries",
            "Stored responses held in this process's replay cache.",
            len(cache) if cache is not None else 0,
        )
        yield _gauge(
            "idempotency_proxy_replay_cache_bytes",
            "Bytes held in this process's replay cache.",
            getattr(cache, "bytes", 0),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(value))
