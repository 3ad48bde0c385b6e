"""One typed, frozen settings object, read from YAML, the environment and flags.

Flags beat the environment, which beats the file. Every mistake stops start-up
with one line that names the key and the reason (`ConfigError`), because an
operator reading a crash-looping pod's log should not have to read a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "IDEMPOTENCY_PROXY_"


class ConfigError(Exception):
    """A configuration mistake, explained in one line."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from `250ms`, `10s`, `5m`, `24h`, `1d` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use 250ms, 10s, 5m, 24h or seconds)")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use 250ms, 10s, 5m, 24h or seconds)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"{value!r} is negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from `64KiB`, `1MiB`, `10MB` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size (use 64KiB, 1MiB or bytes)")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size (use 64KiB, 1MiB or bytes)")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size < 0:
        raise ValueError(f"{value!r} is negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HttpStatus = Annotated[int, Field(ge=100, le=599)]

_FROZEN = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Listen(BaseModel):
    model_config = _FROZEN
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class Admin(BaseModel):
    model_config = _FROZEN
    host: str = "0.0.0.0"
    port: int = Field(default=9090, ge=0, le=65535)
    enabled: bool = True


class StoreSettings(BaseModel):
    model_config = _FROZEN
    url: str = "memory://"
    failure_mode: Literal["closed", "open"] = "closed"
    wait_replicas: int = Field(default=0, ge=0)
    wait_timeout: Duration = 0.1
    require_safe: bool = False
    # Redis commands must fail fast: a black-holed store should cost a request
    # milliseconds, and the lease (not the client timeout) decides liveness.
    timeout: Duration = 0.5
    retries: int = Field(default=2, ge=0, le=5)
    max_connections: int = Field(default=64, ge=1)
    # COMPLETED records are immutable until they expire, so each process may keep
    # the hottest ones and answer duplicates without a round trip.
    replay_cache_entries: int = Field(default=4096, ge=0)
    replay_cache_bytes: Size = 16 * 1024 * 1024
    replay_cache_ttl: Duration = 60.0
    # After this many store failures in a row, answer 503 at once for the cooldown.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: Duration = 1.0
    # How often each process reads the canary that reveals a store which lost data.
    canary_interval: Duration = 1.0
    # Wake `in_flight: wait` duplicates when their record settles (Redis pub/sub across
    # replicas) instead of polling every 250 ms; polling stays the fallback (each second).
    wake_waiters: bool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        schemes = ("redis://", "rediss://", "redis+sentinel://", "redis+cluster://", "memory://")
        if not value.startswith(schemes):
            raise ValueError(f"{value!r} must start with one of {', '.join(schemes)}")
        return value


class UpstreamPool(BaseModel):
    model_config = _FROZEN
    client: Literal["aiohttp", "httpx"] = "aiohttp"
    max_connections: int = Field(default=100, ge=1)
    # Below uvicorn's 5 s keep-alive default: a connection the backend closed
    # under us is an ambiguous failure for a POST.
    keepalive_expiry: Duration = 2.0
    connect_timeout: Duration = 2.0
    # Exchanges kept open past the client's timeout to record a late answer
    # (`outcome_wait`) each hold a pooled connection; past this many, a timeout turns the
    # record UNKNOWN at once, as with `outcome_wait: 0`.
    max_held_exchanges: int = Field(default=64, ge=0)


class Tenant(BaseModel):
    model_config = _FROZEN
    header: str | None = None


class Policy(BaseModel):
    """The knobs every route inherits from `defaults` and may override."""

    model_config = _FROZEN
    retention: Duration = 24 * 3600.0
    lease: Duration = 10.0
    upstream_timeout: Duration = 30.0
    # After the upstream timeout the client gets its 504 at once, but the exchange stays
    # open this much longer so that a late answer is recorded and replayed; 0: give up.
    outcome_wait: Duration = 120.0
    max_request_body: Size = 1024 * 1024
    # A client that trickles its body (slow loris) holds a connection and a buffer;
    # uvicorn has no body read timeout, so the proxy bounds the whole read (408).
    max_body_read_time: Duration = 30.0
    max_stored_response: Size = 1024 * 1024
    in_flight: Literal["reject", "wait"] = "reject"
    wait_timeout: Duration = 5.0
    release_statuses: tuple[HttpStatus, ...] = (408, 425, 429)
    failure_mode: Literal["closed", "open"] | None = None
    replay_headers: tuple[str, ...] = ()
    # How the proxy's own answers look: "problem" (RFC 9457), a preset, or a template
    # from `error_formats`; resolved once at start-up (proxy.errorformat).
    error_format: str = "problem"

    @field_validator("lease", "retention")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value


KeyFrom = Literal["header", "json", "form", "query", "path"]


class KeySpec(BaseModel):
    model_config = _FROZEN
    source: KeyFrom = Field(alias="from")
    name: str | None = None
    field: str | None = None

    @model_validator(mode="after")
    def _one_name(self) -> KeySpec:
        if self.name and self.field and self.name != self.field:
            raise ValueError("give either 'name' or 'field', not both")
        if not (self.name or self.field) and self.source != "header":
            raise ValueError(f"key from {self.source} needs a 'field' (or 'name')")
        return self

    @property
    def target(self) -> str:
        """The header, field, parameter or path variable the key is read from."""
        return self.name or self.field or "Idempotency-Key"


class StatusCheck(BaseModel):
    """A read-only request that asks the backend whether an UNKNOWN request executed."""

    model_config = _FROZEN
    method: Literal["GET", "HEAD"] = "GET"
    # Placeholders: {key} (the idempotency key), a path parameter of the route, or a
    # top-level field of the request's JSON or form body; each value is percent-encoded.
    path: str
    executed: tuple[HttpStatus, ...] = (200,)
    not_executed: tuple[HttpStatus, ...] = (404,)
    # What duplicates get once executed: the check's own answer (status, content type,
    # body), or this status with the check's body.
    replay_status: HttpStatus | None = None
    # The first check no sooner than this after the request arrived: longer than the
    # backend may take to act on a request it already holds (a check must not say
    # "not executed" about a request the backend is still working on).
    after: Duration = 60.0
    backoff: Duration = 10.0  # before the 2nd check; doubled for each next one
    max_checks: int = Field(default=6, ge=1, le=100)
    timeout: Duration = 5.0

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        return value

    @model_validator(mode="after")
    def _disjoint(self) -> StatusCheck:
        both = set(self.executed) & set(self.not_executed)
        if both:
            raise ValueError(f"status {min(both)} cannot mean both executed and not executed")
        if self.timeout <= 0 or self.backoff <= 0:
            raise ValueError("timeout and backoff must be greater than zero")
        return self


class RouteSettings(BaseModel):
    model_config = _FROZEN
    name: str
    path: str
    methods: tuple[str, ...] = ("POST",)
    key: KeySpec = KeySpec.model_validate({"from": "header"})
    required: bool = True
    # Routes that share a namespace share their keys: the same key sent to two
    # of them is a reuse (422), not two executions.
    namespace: str | None = None
    retention: Duration | None = None
    lease: Duration | None = None
    upstream_timeout: Duration | None = None
    outcome_wait: Duration | None = None
    max_request_body: Size | None = None
    max_body_read_time: Duration | None = None
    max_stored_response: Size | None = None
    in_flight: Literal["reject", "wait"] | None = None
    wait_timeout: Duration | None = None
    release_statuses: tuple[HttpStatus, ...] | None = None
    failure_mode: Literal["closed", "open"] | None = None
    replay_headers: tuple[str, ...] | None = None
    error_format: str | None = None
    # Resolves this route's UNKNOWN records by asking the backend (proxy/resolution.py).
    status_check: StatusCheck | None = None

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return tuple(str(m).upper() for m in value)
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        return value

    def policy(self, defaults: Policy) -> Policy:
        """This route's policy: its own values over the defaults."""
        own = {
            k: v for k, v in self.model_dump(exclude_none=True).items() if k in Policy.model_fields
        }
        return defaults.model_copy(update=own)


class ErrorTemplate(BaseModel):
    """A named error format: the proxy's own answers in a backend's dialect."""

    model_config = _FROZEN
    content_type: str = "application/json"
    # A JSON object (YAML mapping) or its JSON text; strings carry {placeholders}.
    body: dict[str, Any] | list[Any] | str
    # Per problem type ('*': every other type): the HTTP status, the {code} value,
    # and extra response headers.
    status: dict[str, HttpStatus] = {}
    code: dict[str, str] = {}
    headers: dict[str, dict[str, str]] = {}


class Settings(BaseModel):
    """Everything the proxy reads at start-up; frozen, so the hot path never re-parses."""

    model_config = _FROZEN
    upstream: str | None = None
    listen: Listen = Listen()
    admin: Admin = Admin()
    store: StoreSettings = StoreSettings()
    upstream_pool: UpstreamPool = UpstreamPool()
    tenant: Tenant = Tenant()
    defaults: Policy = Policy()
    routes: tuple[RouteSettings, ...] = ()
    error_formats: dict[str, ErrorTemplate] = {}
    workers: int = Field(default=1, ge=1)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    max_header_bytes: Size = 32 * 1024

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        return value.rstrip("/") if value else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        names = [r.name for r in self.routes]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"routes: the name {name!r} is used twice")
        if self.workers > 1 and self.store.url.startswith("memory://"):
            raise ValueError(
                "workers: the memory store lives in one process; "
                "use --redis-url with more than one worker"
            )
        return self


# Flags and their environment variables; the value is where each lands in the file's shape.
FLAG_PATHS: dict[str, tuple[str, ...]] = {
    "upstream": ("upstream",),
    "host": ("listen", "host"),
    "port": ("listen", "port"),
    "admin_port": ("admin", "port"),
    "redis_url": ("store", "url"),
    "workers": ("workers",),
    "log_level": ("log_level",),
}


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = {}
            tree[part] = child
        tree = child
    tree[path[-1]] = value


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return data


def _describe(error: ValidationError, tree: Mapping[str, Any]) -> str:
    errors = error.errors()
    # A typo (`frm:` for `from:`) also makes the real key "missing"; naming the typo
    # is what lets the operator fix it, so unknown keys are reported first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = list(first["loc"])
    parts: list[str] = []
    node: Any = tree
    for item in loc:
        if isinstance(item, int) and isinstance(node, list | tuple) and item < len(node):
            route = node[item]
            label = route.get("name") if isinstance(route, dict) else None
            parts.append(f"[{label!r}]" if label else f"[{item}]")
            node = route
            continue
        key = str(item)
        if key == "from" or key == "source":
            key = "from"
        parts.append(("." if parts else "") + key)
        node = node.get(item) if isinstance(node, dict) else None
    where = "".join(parts) or "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key"
    if kind == "missing":
        return f"{where}: required key is missing"
    message = str(first["msg"]).removeprefix("Value error, ")
    # Whole-config checks name their keys in the message themselves.
    return f"{where}: {message}" if parts else message


def load_settings(
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge file, environment and flags (in rising precedence) into `Settings`."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    tree: dict[str, Any] = _read_file(config_file) if config_file else {}
    for flag, path in FLAG_PATHS.items():
        env_value = environ.get(ENV_PREFIX + flag.upper())
        if env_value not in (None, ""):
            _set_path(tree, path, env_value)
    for flag, value in (flags or {}).items():
        if value is not None and flag in FLAG_PATHS:
            _set_path(tree, FLAG_PATHS[flag], value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, tree)) from None
