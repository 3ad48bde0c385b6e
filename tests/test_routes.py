"""Which requests are protected, and by which policy.

A route that fails to match lets a payment through unprotected; a route that
matches too much puts a record in front of requests nobody asked to protect.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import Settings
from proxy.routes import ALWAYS_REPLAYED, Route, RouteTable


def _table(**tree: Any) -> RouteTable:
    return RouteTable(Settings.model_validate(tree))


def _match(table: RouteTable, method: str, path: str) -> tuple[str, dict[str, str]] | None:
    found = table.match(method, path)
    if found is None:
        return None
    route, params = found
    return route.name, params


def _route(table: RouteTable, name: str) -> Route:
    return next(r for r in table.routes if r.name == name)


PAY = {"name": "pay", "path": "/v1/orders/pay", "key": {"from": "json", "field": "order_id"}}
CHARGES = {"name": "charges", "path": "/v1/charges"}


# --------------------------------------------------------------------------- matching


def test_first_match_wins() -> None:
    special = {"name": "special", "path": "/v1/orders/special/pay"}
    by_id = {
        "name": "by-id",
        "path": "/v1/orders/{order_id}/pay",
        "key": {"from": "path", "field": "order_id"},
    }
    table = _table(routes=[special, by_id])
    assert _match(table, "POST", "/v1/orders/special/pay") == ("special", {})
    assert _match(table, "POST", "/v1/orders/o-1/pay") == ("by-id", {"order_id": "o-1"})
    reversed_table = _table(routes=[by_id, special])
    assert _match(reversed_table, "POST", "/v1/orders/special/pay") == (
        "by-id",
        {"order_id": "special"},
    )


def test_a_route_that_does_not_match_the_method_lets_a_later_one_match() -> None:
    patch = {"name": "patch-any", "methods": ["PATCH", "POST"], "path": "/v1/{rest:path}"}
    table = _table(routes=[{**PAY, "methods": ["POST"]}, patch])
    assert _match(table, "POST", "/v1/orders/pay") == ("pay", {})
    assert _match(table, "PATCH", "/v1/orders/pay") == ("patch-any", {"rest": "orders/pay"})


def test_methods() -> None:
    table = _table(routes=[{**PAY, "methods": ["post", "Put"]}, CHARGES])
    pay = _route(table, "pay")
    assert pay.methods == frozenset({"POST", "PUT"})
    assert _match(table, "POST", "/v1/orders/pay") == ("pay", {})
    assert _match(table, "PUT", "/v1/orders/pay") == ("pay", {})
    for method in ("GET", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        assert _match(table, method, "/v1/orders/pay") is None, method
    # A route without `methods` protects POST only.
    assert _route(table, "charges").methods == frozenset({"POST"})
    assert _match(table, "PATCH", "/v1/charges") is None
    assert _table(routes=[{**PAY, "methods": "patch"}]).routes[0].methods == frozenset({"PATCH"})


def test_exact_paths_match_exactly() -> None:
    table = _table(routes=[PAY])
    assert _match(table, "POST", "/v1/orders/pay") == ("pay", {})
    for path in ("/v1/orders/pay/", "/v1/orders/pay/x", "/v1/orders", "/v1/orders/payx", "/"):
        assert _match(table, "POST", path) is None, path


def test_path_templates_give_parameters() -> None:
    table = _table(
        routes=[
            {
                "name": "pay-order",
                "path": "/v1/orders/{order_id}/pay",
                "key": {"from": "path", "field": "order_id"},
            },
            {"name": "refund", "path": "/v1/charges/{charge_id:int}/refunds/{refund_id}"},
        ]
    )
    assert _match(table, "POST", "/v1/orders/ord-42/pay") == ("pay-order", {"order_id": "ord-42"})
    assert _match(table, "POST", "/v1/charges/17/refunds/r-1") == (
        "refund",
        {"charge_id": "17", "refund_id": "r-1"},
    )
    # A parameter is one path segment, never empty, never several.
    for path in (
        "/v1/orders//pay",
        "/v1/orders/a/b/pay",
        "/v1/orders/ord-42/pay/",
        "/v1/orders/ord-42",
        "/v1/charges/abc/refunds/r-1",
    ):
        assert _match(table, "POST", path) is None, path
    assert _route(table, "pay-order").key.source == "path"


def test_configured_routes_replace_the_default_rule() -> None:
    table = _table(routes=[PAY])
    assert [r.name for r in table.routes] == ["pay"]
    assert _match(table, "POST", "/v1/charges") is None
    assert _match(table, "PATCH", "/anything") is None


# --------------------------------------------------------------------------- default rule


def test_default_rule_protects_post_and_patch_with_an_optional_header_key() -> None:
    table = _table()
    assert len(table.routes) == 1
    route = table.routes[0]
    assert route.name == "default"
    assert route.namespace == "default"
    assert route.required is False
    assert route.key.source == "header"
    assert route.key.target == "Idempotency-Key"
    for method in ("POST", "PATCH"):
        for path in ("/", "/v1/charges", "/v1/orders/pay", "/a/b/c"):
            found = table.match(method, path)
            assert found is not None, (method, path)
            assert found[0].name == "default"
    for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS"):
        assert table.match(method, "/v1/charges") is None, method


def test_default_rule_uses_the_configured_defaults() -> None:
    table = _table(defaults={"lease": "3s", "release_statuses": [503]}, store={"url": "memory://"})
    route = table.routes[0]
    assert route.policy.lease == 3.0
    assert route.policy.release_statuses == (503,)
    assert route.fail_open is False
    assert _table(store={"failure_mode": "open"}).routes[0].fail_open is True
    assert _table(defaults={"failure_mode": "open"}).routes[0].fail_open is True


# --------------------------------------------------------------------------- policy


def test_route_policy_overrides_defaults_and_inherits_the_rest() -> None:
    table = _table(
        defaults={
            "retention": "1h",
            "lease": "5s",
            "upstream_timeout": "20s",
            "max_request_body": "64KiB",
            "in_flight": "wait",
            "wait_timeout": "2s",
        },
        routes=[
            {
                **PAY,
                "release_statuses": [402, 408, 425, 429],
                "lease": "30s",
                "retention": "48h",
                "in_flight": "reject",
                "max_stored_response": "2MiB",
            },
            CHARGES,
        ],
    )
    pay = _route(table, "pay").policy
    assert pay.release_statuses == (402, 408, 425, 429)
    assert pay.lease == 30.0
    assert pay.retention == 48 * 3600.0
    assert pay.in_flight == "reject"
    assert pay.max_stored_response == 2 * 1024 * 1024
    # Not overridden: from `defaults`, and from the built-in defaults beyond them.
    assert pay.upstream_timeout == 20.0
    assert pay.max_request_body == 64 * 1024
    assert pay.wait_timeout == 2.0
    charges = _route(table, "charges").policy
    assert charges.release_statuses == (408, 425, 429)
    assert charges.lease == 5.0
    assert charges.retention == 3600.0
    assert charges.in_flight == "wait"
    assert charges.max_stored_response == 1024 * 1024


def test_an_empty_release_list_overrides_the_default() -> None:
    table = _table(routes=[{**PAY, "release_statuses": []}, CHARGES])
    assert _route(table, "pay").policy.release_statuses == ()
    assert _route(table, "charges").policy.release_statuses == (408, 425, 429)


@pytest.mark.parametrize(
    ("store_mode", "route_mode", "fail_open"),
    [
        ("closed", None, False),
        ("open", None, True),
        ("closed", "open", True),
        ("open", "closed", False),
    ],
)
def test_failure_mode_per_route(store_mode: str, route_mode: str | None, fail_open: bool) -> None:
    route: dict[str, Any] = dict(PAY)
    if route_mode:
        route["failure_mode"] = route_mode
    table = _table(store={"failure_mode": store_mode}, routes=[route])
    assert table.routes[0].fail_open is fail_open


def test_required_and_key_spec_per_route() -> None:
    table = _table(routes=[PAY, {**CHARGES, "required": False}])
    pay = _route(table, "pay")
    assert pay.required is True
    assert (pay.key.source, pay.key.target) == ("json", "order_id")
    charges = _route(table, "charges")
    assert charges.required is False
    assert (charges.key.source, charges.key.target) == ("header", "Idempotency-Key")


def test_replay_headers_always_include_the_contract_set() -> None:
    table = _table(
        defaults={"replay_headers": ["X-Default-Extra"]},
        routes=[{**PAY, "replay_headers": [" X-Charge-Id "]}, CHARGES],
    )
    pay = _route(table, "pay").replay_headers
    assert set(ALWAYS_REPLAYED) <= pay
    assert b"x-charge-id" in pay
    assert b"x-default-extra" not in pay
    charges = _route(table, "charges").replay_headers
    assert b"x-default-extra" in charges
    for never in (b"set-cookie", b"x-request-id", b"connection", b"date"):
        assert never not in pay
        assert never not in charges


# --------------------------------------------------------------------------- namespace


def test_header_keys_share_one_namespace_and_natural_keys_stay_per_route() -> None:
    """A client-generated header key names one request of the tenant, whatever endpoint it
    is sent to; `order_id` of /pay and of /refund are two operations on one order."""
    table = _table(
        routes=[
            PAY,
            CHARGES,
            {"name": "refunds", "path": "/v1/refunds"},
            {"name": "by-query", "path": "/v1/q", "key": {"from": "query", "field": "k"}},
        ]
    )
    assert _route(table, "pay").namespace == "pay"
    assert _route(table, "by-query").namespace == "by-query"
    assert _route(table, "charges").namespace == _route(table, "refunds").namespace
    # The same namespace the default rule (no routes) uses.
    assert _route(table, "charges").namespace == _table().routes[0].namespace
    composite = _table(
        routes=[
            {
                "name": "headers-only",
                "path": "/v1/a",
                "key": [{"from": "header", "name": "X-Merchant-Id"}, {"from": "header"}],
            },
            {
                "name": "merchant-order",
                "path": "/v1/b",
                "key": [
                    {"from": "header", "name": "X-Merchant-Id"},
                    {"from": "json", "field": "n"},
                ],
            },
        ]
    )
    assert _route(composite, "headers-only").namespace == _route(table, "charges").namespace
    assert _route(composite, "merchant-order").namespace == "merchant-order"


def test_routes_may_share_a_namespace() -> None:
    table = _table(
        routes=[
            {**PAY, "namespace": "payments"},
            {**CHARGES, "namespace": "payments"},
            {"name": "refunds", "path": "/v1/refunds"},
        ]
    )
    assert _route(table, "pay").namespace == "payments"
    assert _route(table, "charges").namespace == "payments"
    # No namespace given, keyed by the header: the tenant's one namespace of header keys.
    assert _route(table, "refunds").namespace == "default"
