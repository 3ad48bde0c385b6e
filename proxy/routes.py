"""Which requests are protected, and by what policy: method + path template, first match wins."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from starlette.routing import compile_path

from proxy.config import ConfigError, KeySpec, Policy, RouteSettings, Settings, StatusCheck
from proxy.errorformat import PRESETS, PROBLEM, ErrorFormat, TemplateFormat

# The default rule's methods: those that create or change something. GET, PUT and
# DELETE are idempotent by definition and pass straight through.
DEFAULT_METHODS = frozenset({"POST", "PATCH"})
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
            name: str(self._convertors[name].convert(value))
            for name, value in found.groupdict().items()
        }


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
        fail_open = (policy.failure_mode or settings.store.failure_mode) == "open"
        return [
            Route(
                name="default",
                namespace="default",
                methods=DEFAULT_METHODS,
                path="/{path:path}",
                key=KeySpec.model_validate({"from": "header", "name": "Idempotency-Key"}),
                required=False,
                policy=policy,
                lease_ms=_ms(policy.lease),
                retention_ms=_ms(policy.retention),
                fail_open=fail_open,
                replay_headers=_replay_headers(policy),
                _regex=None,
                _convertors={},
                error_format=formats.get(policy.error_format, "defaults"),
            )
        ]
    compiled = []
    for spec in settings.routes:
        policy = spec.policy(settings.defaults)
        regex, _, convertors = compile_path(spec.path)
        if spec.key.source == "path" and spec.key.target not in convertors:
            raise ConfigError(
                f"routes[{spec.name!r}].key.name: {spec.key.target!r} is not a parameter "
                f"of the path {spec.path!r}"
            )
        fail_open = (policy.failure_mode == "open") if policy.failure_mode else store_fail_open
        if spec.status_check is not None:
            _check_placeholders(spec, set(convertors))
        compiled.append(
            Route(
                name=spec.name,
                namespace=spec.namespace or spec.name,
                methods=frozenset(spec.methods),
                path=spec.path,
                key=spec.key,
                required=spec.required,
                policy=policy,
                lease_ms=_ms(policy.lease),
                retention_ms=_ms(policy.retention),
                fail_open=fail_open,
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
        if key.source not in ("json", "form"):
            raise ConfigError(
                f"routes[{route!r}].status_check.path: {{{name}}} is neither {{key}} nor a "
                f"parameter of the path {spec.path!r}"
            )
