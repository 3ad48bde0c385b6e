"""The admin port of a real proxy process: health, readiness and Prometheus metrics.

Metrics are what operators alert on, so they must count the right things, and their labels
must never carry a key, an order id, a tenant, a raw path or a client address: those would
leak payment data into the monitoring system and explode its cardinality.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from harness import (
    REPO_ROOT,
    BackendServer,
    ProxyFactory,
    charges_route,
    pay_route,
    wait_for_http,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics

CONFIG: dict[str, Any] = {
    "tenant": {"header": "X-Tenant-Id"},
    "routes": [pay_route(), charges_route()],
}

# Values that must never show up in /metrics.
ORDER_ID = "ord-secret-7f3a91"
KEY = "key-secret-c4e1d2"
TENANT = "tenant-secret-55b0"
CLIENT_ADDRESS = "127.0.0.1"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> tuple[Samples, set[str]]:
    """Every sample of the proxy's own metrics by (name, labels), and the family names."""
    samples: Samples = {}
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("idempotency_proxy_"):
            continue
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, families


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_health_and_metrics_without_leaking_request_data(
    ledger_backend: BackendServer,
    redis_url: str,
    proxy_factory: ProxyFactory,
    client: httpx.AsyncClient,
) -> None:
    proxy = proxy_factory(ledger_backend.url, redis_url, config=CONFIG)
    wait_for_http(f"{proxy.admin_url}/readyz", 15.0)
    live = await client.get(f"{proxy.admin_url}/livez")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    ready = await client.get(f"{proxy.admin_url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

    tenant = {"X-Tenant-Id": TENANT}
    order = {"order_id": ORDER_ID, "amount": 1250, "currency": "EUR"}

    first = await client.post(f"{proxy.url}/v1/orders/pay", json=order, headers=tenant)
    assert first.status_code == 201
    replay = await client.post(f"{proxy.url}/v1/orders/pay", json=order, headers=tenant)
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    charge = await client.post(
        f"{proxy.url}/v1/charges",
        json={"amount": 300, "currency": "EUR"},
        headers={**tenant, "Idempotency-Key": KEY},
    )
    assert charge.status_code == 201
    lookup = await client.get(f"{proxy.url}/v1/orders/{ORDER_ID}", headers=tenant)
    assert lookup.status_code == 200

    # The admin paths on the traffic port are ordinary traffic: passed through to the
    # backend (which has no such routes), never answered by the proxy's admin app.
    for path in ("/metrics", "/livez", "/readyz"):
        passed = await client.get(f"{proxy.url}{path}")
        assert passed.status_code == 404, path
        assert b"idempotency_proxy_" not in passed.content
        assert passed.headers.get("content-type", "").startswith("application/")
    ledger = ledger_backend.ledger()
    assert ledger["orders"] == {ORDER_ID: 1}

    response = await client.get(f"{proxy.admin_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples, families = _samples(text)

    requests = "idempotency_proxy_requests_total"
    assert _value(samples, requests, route="pay", outcome="forwarded") == 1
    assert _value(samples, requests, route="pay", outcome="replayed") == 1
    assert _value(samples, requests, route="charges", outcome="forwarded") == 1
    # The order lookup and the three admin-looking paths, all unprotected traffic.
    assert _value(samples, requests, route="-", outcome="passthrough") == 4

    for route in ("pay", "charges"):
        assert _value(samples, "idempotency_proxy_upstream_seconds_count", route=route) == 1
        assert (
            _value(samples, "idempotency_proxy_upstream_seconds_bucket", route=route, le="+Inf")
            == 1
        )
    for operation in ("claim", "mark_sent", "complete"):
        count = _value(samples, "idempotency_proxy_store_seconds_count", operation=operation)
        assert count is not None and count >= 2, operation
    assert _value(samples, "idempotency_proxy_in_flight_requests") == 0

    transitions = "idempotency_proxy_record_transitions_total"
    for state in ("CLAIMED", "SENT", "COMPLETED"):
        assert _value(samples, transitions, to=state) == 2, state
    assert _value(samples, transitions, to="UNKNOWN") is None
    assert _value(samples, "idempotency_proxy_replayed_bytes_total") == len(replay.content)
    # Families the dashboard and the alerts read exist before their first increment.
    assert {
        "idempotency_proxy_store_errors",
        "idempotency_proxy_fenced",
    } <= families

    # No request data anywhere in the exposition, labels or otherwise.
    for secret in (ORDER_ID, KEY, TENANT, CLIENT_ADDRESS, "/v1/", "/metrics"):
        assert secret not in text, secret
    label_names = {
        name
        for metric, labels in samples
        if metric != "idempotency_proxy_build_info"
        for name, _ in labels
    }
    assert label_names <= {"route", "outcome", "operation", "to", "le"}
    # The build's own labels: constant, and about the build only.
    build = [dict(labels) for metric, labels in samples if metric == "idempotency_proxy_build_info"]
    assert [set(b) for b in build] == [{"version", "python"}]
    route_values = {v for _, labels in samples for k, v in labels if k == "route"}
    assert route_values <= {"pay", "charges", "-"}


def test_dashboard_reads_metrics_the_proxy_exports() -> None:
    """A renamed metric must not leave the dashboard silently empty."""
    exported: set[str] = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        exported.update(family.name + s for s in suffixes.get(family.type, ()))
    dashboard = json.loads((REPO_ROOT / "dashboards" / "idempotency-proxy.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"idempotency_proxy_\w+", expr)}
    assert used
    assert used <= exported, used - exported


def test_dashboard_shows_store_health_and_observe_mode() -> None:
    """The store's health, outcome resolution and observe mode's counts each have a panel."""
    dashboard = json.loads((REPO_ROOT / "dashboards" / "idempotency-proxy.json").read_text())
    exprs = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    for name in (
        "idempotency_proxy_store_circuit_open",
        "idempotency_proxy_store_circuit_opened_total",
        "idempotency_proxy_store_safe_mode",
        "idempotency_proxy_store_data_losses_total",
        "idempotency_proxy_store_wait_shortfalls_total",
        "idempotency_proxy_replay_cache_hits_total",
        "idempotency_proxy_replay_cache_misses_total",
        "idempotency_proxy_replay_cache_entries",
        "idempotency_proxy_replay_cache_bytes",
        "idempotency_proxy_observed_total",
        "idempotency_proxy_outcome_resolutions_total",
        "idempotency_proxy_held_exchanges",
        "idempotency_proxy_store_corrupt_records_total",
    ):
        assert name in exprs, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
