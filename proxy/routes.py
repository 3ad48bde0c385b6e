"""Which requests are protected, and by what policy: method + path template, first match wins."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from starlette.convertors import IntegerConvertor
from starlette.routing import compile_path

from proxy.config import ConfigError, KeySpec, Policy, RouteSettings, Settings, StatusCheck
from proxy.errorformat import PRESETS, PROBLEM, ErrorFormat, TemplateFormat

# The default rule's methods: those that create or change something. GET, PUT and
# DELETE are idempotent by definition and pass straight through.
DEFAULT_METHODS = frozenset({"POST", "PATCH"})
# Where client-generated header keys live unless a route names a namespace: one per
# tenant across endpoints, so one key sent to two endpoints is a reuse (422), never two
# executions. The no-routes rule uses it too, which keeps that rule's record names.
HEADER_NAMESPACE = "default"
# A record must outlive its request: retention at least this many times the longest a
# request can hold its record before it settles (lease + upstream_timeout).
RETENTION_FACTOR = 2
ALWAYS_REPLAYED = (b"content-type", b"content-encoding", b"location", b"etag", b"link")


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route: everything the request's story needs, resolved at start-up."""

    name: str
    namespace: str
    methods: frozenset[str]
    path: str
    key: KeySpec
    required: bool
    policy: Policy
    # The policy's lease and retention in the store's unit, computed once.
    lease_ms: int
    retention_ms: int
    fail_open: bool
    observe: bool
    replay_headers: frozenset[bytes]
    _regex: re.Pattern[str] | None
    _convertors: dict[str, Any]
    # The shape of the proxy's own answers on this route, compiled at start-up.
    error_format: ErrorFormat = PROBLEM
    status_check: StatusCheck | None = None

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """Path parameters when this route protects the request, else None."""
        if method not in self.methods:
            return None
        if self._regex is None:
            return {}
        found = self._regex.match(path)
        if found is None:
            return None
        return {
            name: _convert(self._convertors[name], value)
            for name, value in found.groupdict().items()
        }


def _convert(convertor: Any, value: str) -> str:
    """A path parameter in its type's canonical form (`{id:int}`: `007` is `7`)."""
    if isinstance(convertor, IntegerConvertor):
        # str(int(value)) for the convertor's [0-9]+, without int()'s limit on digits
        # (5000 digits raised ValueError: a 500).
        return value.lstrip("0") or "0"
    converted = convertor.convert(value)
    if isinstance(converted, float) and not math.isfinite(converted):
        return value  # too large for a float: every such number would be "inf", one key
    return str(converted)


class RouteTable:
    """The configured routes in order, or the default rule when none are configured."""

    def __init__(self, settings: Settings) -> None:
        formats = _Formats(settings)
        # For answers made before a route matched (431) or on pass-through traffic;
        # checked first, so that a bad default is reported as the default's mistake.
        self.default_error_format = formats.get(settings.defaults.error_format, "defaults")
        self.routes: tuple[Route, ...] = tuple(_compile(settings, formats))
        formats.check_unused()

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            params = route.match(method, path)
            if params is not None:
                return route, params
        return None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _replay_headers(policy: Policy) -> frozenset[bytes]:
    extra = (h.strip().lower().encode("latin-1") for h in policy.replay_headers)
    return frozenset((*ALWAYS_REPLAYED, *extra))


def _check_retention(where: str, policy: Policy) -> None:
    """One line at start-up when a record could expire while its request is still running
    (including the wait for a late answer): a duplicate would then find no record and
    execute again."""
    request_s = policy.lease + policy.upstream_timeout + policy.outcome_wait
    if policy.retention < RETENTION_FACTOR * request_s:
        raise ConfigError(
            f"{where}.retention: {policy.retention:g}s is too short; records must outlive "
            f"their requests, so it must be at least {RETENTION_FACTOR} x (lease + "
            f"upstream_timeout + outcome_wait) = {RETENTION_FACTOR * request_s:g}s"
        )


def _namespace(spec: RouteSettings) -> str:
    if spec.namespace:
        return spec.namespace
    # A natural key (order_id in the body, path or query, or any composite key with such
    # a part) names an operation on one object, and /pay and /refund of one order are
    # two operations: per route. Keys made of headers alone are the client's own.
    parts = spec.key.parts if spec.key.parts is not None else (spec.key,)
    return HEADER_NAMESPACE if all(p.source == "header" for p in parts) else spec.name


class _Formats:
    """The presets and the configured templates; a bad one is reported by the first route
    that uses it, so the start-up error names the route."""

    def __init__(self, settings: Settings) -> None:
        self.formats: dict[str, ErrorFormat] = {name: make() for name, make in PRESETS.items()}
        self.broken: dict[str, str] = {}
        for name, template in settings.error_formats.items():
            if name in PRESETS:
                self.broken[name] = f"{name!r} is a preset's name; choose another"
                continue
            try:
                self.formats[name] = TemplateFormat(name, **template.model_dump())
            except ValueError as exc:
                self.broken[name] = str(exc)

    def get(self, name: str, where: str) -> ErrorFormat:
        if name in self.broken:
            raise ConfigError(f"{where}.error_format: error_formats[{name!r}]: {self.broken[name]}")
        found = self.formats.get(name)
        if found is None:
            known = ", ".join(sorted(self.formats))
            raise ConfigError(f"{where}.error_format: unknown format {name!r} (use {known})")
        return found

    def check_unused(self) -> None:
        for name, reason in self.broken.items():
            raise ConfigError(f"error_formats[{name!r}]: {reason}")


def _compile(settings: Settings, formats: _Formats) -> list[Route]:
    store_fail_open = settings.store.failure_mode == "open"
    if not settings.routes:
        policy = settings.defaults
        _check_retention("defaults", policy)
        fail_open = (policy.failure_mode or settings.store.failure_mode) == "open"
        return [
            Route(
                name="default",
                namespace=HEADER_NAMESPACE,
                methods=DEFAULT_METHODS,
                path="/{path:path}",
                key=KeySpec.model_validate({"from": "header", "name": "Idempotency-Key"}),
                required=False,
                policy=policy,
                lease_ms=_ms(policy.lease),
                retention_ms=_ms(policy.retention),
                fail_open=fail_open,
                observe=policy.mode == "observe",
                replay_headers=_replay_headers(policy),
                _regex=None,
                _convertors={},
                error_format=formats.get(policy.error_format, "defaults"),
            )
        ]
    compiled = []
    for spec in settings.routes:
        policy = spec.policy(settings.defaults)
        _check_retention(f"routes[{spec.name!r}]", policy)
        regex, _, convertors = compile_path(spec.path)
        for index, part in enumerate(spec.key.sources):
            if part.source == "path" and part.target not in convertors:
                where = f"[{index}]" if spec.key.parts is not None else ""
                raise ConfigError(
                    f"routes[{spec.name!r}].key{where}.name: {part.target!r} is not a parameter "
                    f"of the path {spec.path!r}"
                )
        fail_open = (policy.failure_mode == "open") if policy.failure_mode else store_fail_open
        if spec.status_check is not None:
            _check_placeholders(spec, set(convertors))
        compiled.append(
            Route(
                name=spec.name,
                namespace=_namespace(spec),
                methods=frozenset(spec.methods),
                path=spec.path,
                key=spec.key,
                required=spec.required,
                policy=policy,
                lease_ms=_ms(policy.lease),
                retention_ms=_ms(policy.retention),
                fail_open=fail_open,
                observe=policy.mode == "observe",
                replay_headers=_replay_headers(policy),
                _regex=regex,
                _convertors=convertors,
                error_format=formats.get(policy.error_format, f"routes[{spec.name!r}]"),
                status_check=spec.status_check,
            )
        )
    return compiled


_PLACEHOLDER = re.compile(r"{([^{}]*)}")


def _check_placeholders(spec: RouteSettings, params: set[str]) -> None:
    """A status-check placeholder must name the key, a path parameter, or (on a route
    whose key comes from the body) a body field, which can only be checked per request."""
    assert spec.status_check is not None
    route, key = spec.name, spec.key
    for name in _PLACEHOLDER.findall(spec.status_check.path):
        if name == "key" or name in params:
            continue
        if not name.isidentifier():
            raise ConfigError(f"routes[{route!r}].status_check.path: bad placeholder {{{name}}}")
        if not any(part.source in ("json", "form") for part in key.sources):
            raise ConfigError(
                f"routes[{route!r}].status_check.path: {{{name}}} is neither {{key}} nor a "
                f"parameter of the path {spec.path!r}"
            )
