"""Prometheus metrics. Labels are route names and outcomes only: never keys, order ids,
raw paths or client addresses, which would leak data and explode cardinality."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
