"""Prometheus metrics. Labels are route names and outcomes only: never keys, order ids,
raw paths or client addresses, which would leak data and explode cardinality."""

from __future__ import annotations

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
        self._requests_by_label: dict[tuple[str, str], Counter] = {}

    def count(self, route: str, outcome: str) -> None:
        child = self._requests_by_label.get((route, outcome))
        if child is None:
            child = self.requests.labels(route, outcome)
            self._requests_by_label[(route, outcome)] = child
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
