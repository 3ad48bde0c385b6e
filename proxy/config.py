"""One typed, frozen settings object, read from YAML, the environment and flags.

Flags beat the environment, which beats the file. Every mistake stops start-up
with one line that names the key and the reason (`ConfigError`), because an
operator reading a crash-looping pod's log should not have to read a traceback.

Longer than the other modules on purpose: it is the whole operator interface, every key
with its default and its check, in one file that reads alongside docs/configuration.md,
so that a renamed or re-defaulted key is caught in one place.
"""

from __future__ import annotations

import base64
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

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
    if not math.isfinite(seconds):
        # `.inf` for "forever" cannot become a TTL or a timer: refused, not a traceback.
        raise ValueError(f"{value!r} is not a finite duration")
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


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HttpStatus = Annotated[int, Field(ge=100, le=599)]

_FROZEN = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


@dataclass(frozen=True, slots=True)
class UpstreamURL:
    """The upstream's fixed parts. Every forwarded URL is these plus a client's path and
    query, so no request target can name another host."""

    scheme: str
    authority: str  # host[:port] as written (IPv6 in brackets), without credentials
    host: str
    port: int
    prefix: str  # path prefix without a trailing '/' ('' for none), percent-encoded
    # `Authorization: Basic` from credentials in the URL, sent on every forwarded request.
    authorization: bytes | None = None

    @property
    def origin(self) -> str:
        """scheme://host:port/prefix: the upstream as it may be logged."""
        return f"{self.scheme}://{self.authority}{self.prefix}"


def parse_upstream(url: str) -> UpstreamURL:
    """Split the upstream URL into its fixed parts; errors never repeat the credentials."""
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise ValueError("is not a valid URL (check the host and port)") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not host:
        raise ValueError("names no host")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("must not carry a query or a fragment (only a path prefix)")
    authority = parts.netloc.rpartition("@")[2]
    authorization = None
    if "@" in parts.netloc:
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        authorization = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
    return UpstreamURL(
        scheme=parts.scheme,
        authority=authority,
        host=host,
        port=port or (443 if parts.scheme == "https" else 80),
        prefix=parts.path.rstrip("/"),
        authorization=authorization,
    )


def redact_url(url: str) -> str:
    """The URL without its userinfo, for logs and errors."""
    try:
        return parse_upstream(url).origin
    except ValueError:
        return "<invalid URL>"


class Listen(BaseModel):
    model_config = _FROZEN
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class Admin(BaseModel):
    model_config = _FROZEN
    host: str = "0.0.0.0"
    port: int = Field(default=9090, ge=0, le=65535)
    enabled: bool = True


class StoreTLS(BaseModel):
    """TLS to Redis (and to the sentinels): on with a `rediss` scheme or `enabled: true`."""

    model_config = _FROZEN
    enabled: bool = False
    # PEM files; without ca_file the system's trust store verifies the server.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Verify the server's certificate chain, and that its name matches the host dialled.
    verify: bool = True
    check_hostname: bool = True

    @model_validator(mode="after")
    def _files(self) -> StoreTLS:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate)")
        if self.check_hostname and not self.verify:
            raise ValueError("check_hostname needs verify: true")
        return self


class SentinelAuth(BaseModel):
    """Credentials for the sentinels themselves (the master's are store.username/password)."""

    model_config = _FROZEN
    username: str | None = None
    password: str | None = Field(default=None, repr=False)


STORE_SCHEMES = (
    "redis://",
    "rediss://",
    "redis+sentinel://",
    "rediss+sentinel://",
    "redis+cluster://",
    "rediss+cluster://",
    "memory://",
)


class StoreSettings(BaseModel):
    model_config = _FROZEN
    url: str = "memory://"
    # Credentials for the Redis nodes (an ACL user, or only a password for requirepass);
    # they override any in the URL. Secrets: `password_file` reads a mounted file.
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls: StoreTLS = StoreTLS()
    sentinel: SentinelAuth = SentinelAuth()
    failure_mode: Literal["closed", "open"] = "closed"
    wait_replicas: int = Field(default=0, ge=0)
    wait_timeout: Duration = 0.1
    require_safe: bool = False
    # Redis commands must fail fast: a black-holed store should cost a request
    # milliseconds, and the lease (not the client timeout) decides liveness.
    timeout: Duration = 0.5
    retries: int = Field(default=2, ge=0, le=5)

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        return _positive(value)

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
    # The memory store's caps: when either is reached, new keys get 503 store-unavailable
    # until records expire (as Redis does with maxmemory-policy noeviction).
    memory_max_entries: int = Field(default=1_000_000, ge=1)
    memory_max_bytes: Size = 256 * 1024 * 1024
    # Wake `in_flight: wait` duplicates when their record settles (Redis pub/sub across
    # replicas) instead of polling every 250 ms; polling stays the fallback (each second).
    wake_waiters: bool = True

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(STORE_SCHEMES):
            shown = _mask_url(value)
            raise ValueError(f"{shown!r} must start with one of {', '.join(STORE_SCHEMES)}")
        scheme, _, rest = value.partition("://")
        if scheme.endswith("+sentinel") and not rest.partition("/")[2].strip("/"):
            raise ValueError(f"{scheme}:// needs the master's name: {scheme}://h:p[,h:p]/mymaster")
        return value

    @property
    def tls_on(self) -> bool:
        return self.tls.enabled or self.url.startswith("rediss")

    def connection_options(self) -> dict[str, Any]:
        """redis-py keyword arguments for credentials and TLS, the same on every topology."""
        options: dict[str, Any] = {}
        if self.username is not None:
            options["username"] = self.username
        if self.password is not None:
            options["password"] = self.password
        if self.tls_on:
            options.update(
                ssl=True,
                ssl_ca_certs=self.tls.ca_file,
                ssl_certfile=self.tls.cert_file,
                ssl_keyfile=self.tls.key_file,
                ssl_cert_reqs="required" if self.tls.verify else "none",
                ssl_check_hostname=self.tls.check_hostname,
            )
        return options

    def sentinel_options(self) -> dict[str, Any]:
        """Keyword arguments for the connections to the sentinels: TLS like the nodes'."""
        options = {k: v for k, v in self.connection_options().items() if k.startswith("ssl")}
        if self.sentinel.username is not None:
            options["username"] = self.sentinel.username
        if self.sentinel.password is not None:
            options["password"] = self.sentinel.password
        return options


class UpstreamPool(BaseModel):
    model_config = _FROZEN
    client: Literal["builtin", "aiohttp", "httpx"] = "builtin"
    max_connections: int = Field(default=100, ge=1)
    # Pass-through (unprotected) traffic has its own pool, so that it cannot take the
    # connections protected routes need.
    passthrough_max_connections: int = Field(default=100, ge=1)
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
    # observe: forward every request as if the proxy were not there, but claim and record
    # first requests and count what enforcement would have done with each duplicate.
    mode: Literal["enforce", "observe"] = "enforce"

    # A zero upstream_timeout is no "no timeout": each request would time out after being
    # sent, and become UNKNOWN.
    @field_validator("lease", "retention", "upstream_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        return _positive(value)


KeyFrom = Literal["header", "json", "form", "query", "path", "xml"]


class KeySpec(BaseModel):
    """Where a route's key comes from: one source, or (`parts`) several in order."""

    model_config = _FROZEN
    source: KeyFrom | None = Field(default=None, alias="from")
    name: str | None = None
    field: str | None = None
    # from: xml: an absolute element path with prefixes declared in `namespaces`.
    path: str | None = None
    namespaces: dict[str, str | tuple[str, ...]] | None = None
    # A composite key: each part is read by its own source's rules, then joined.
    parts: tuple[KeySpec, ...] | None = None

    @model_validator(mode="after")
    def _one_name(self) -> KeySpec:
        if self.parts is not None:
            return self._composite()
        if self.source is None:
            raise ValueError("give 'from' (header, json, form, query, path, xml) or parts")
        if self.name and self.field and self.name != self.field:
            raise ValueError("give either 'name' or 'field', not both")
        if self.source == "xml":
            if self.name or self.field:
                raise ValueError("a key from xml takes a 'path', not a 'name' or 'field'")
            if not self.path:
                raise ValueError("key from xml needs a 'path' such as /soap:Envelope/soap:Body/...")
            from proxy.xmlkeys import compile_path

            compile_path(self.path, self.namespaces or {})
            return self
        if self.path is not None or self.namespaces is not None:
            raise ValueError("'path' and 'namespaces' are only for keys from xml")
        if not (self.name or self.field) and self.source != "header":
            raise ValueError(f"key from {self.source} needs a 'field' (or 'name')")
        return self

    def _composite(self) -> KeySpec:
        assert self.parts is not None
        if self.source or self.name or self.field or self.path or self.namespaces:
            raise ValueError("a composite key is a list of parts and nothing else")
        if len(self.parts) < 2:
            raise ValueError("a composite key needs at least two parts")
        for part in self.parts:
            if part.parts is not None:
                raise ValueError("the parts of a composite key cannot be composite themselves")
        return self

    @property
    def target(self) -> str:
        """The header, field, parameter, path variable or XML path the key is read from."""
        if self.parts is not None:
            return " + ".join(part.target for part in self.parts)
        if self.source == "xml":
            return self.path or ""
        return self.name or self.field or "Idempotency-Key"

    @property
    def natural(self) -> bool:
        """True when any part comes from the request itself (body, path, query) rather than
        a client-made header: such a key names an operation of one route."""
        if self.parts is not None:
            return any(part.natural for part in self.parts)
        return self.source != "header"

    @property
    def sources(self) -> tuple[KeySpec, ...]:
        """The single-source specs this key is built from, in order."""
        return self.parts if self.parts is not None else (self,)


def _key_shape(value: Any) -> Any:
    # The list form, `key: [{from: header, ...}, {from: json, ...}]`, is a composite key.
    return {"parts": value} if isinstance(value, list | tuple) else value


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
    key: Annotated[KeySpec, BeforeValidator(_key_shape)] = KeySpec.model_validate(
        {"from": "header"}
    )
    required: bool = True
    # Routes that share a namespace share their keys: the same key sent to two
    # of them is a reuse (422), not two executions. Unset: header keys share one
    # namespace per tenant, natural keys are per route (routes._namespace).
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
    mode: Literal["enforce", "observe"] | None = None
    error_format: str | None = None
    # Resolves this route's UNKNOWN records by asking the backend (proxy/resolution.py).
    status_check: StatusCheck | None = None

    # A route's own values are not validated again as a Policy (policy() copies them in).
    @field_validator("lease", "retention", "upstream_timeout")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        return None if value is None else _positive(value)

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
    # Connections plus requests in flight on the traffic port before new requests get 503
    # `overloaded` (uvicorn's limit_concurrency); 0: no cap.
    max_concurrency: int = Field(default=1000, ge=0)
    # A request head that takes longer gets 408; a connection that sends nothing is closed.
    header_read_timeout: Duration = 10.0

    # Keys the `key_hash` in the logs (docs/security.md). repr=False: never printed.
    key_hash_secret: str | None = Field(default=None, repr=False)
    key_hash_secret_file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _secret_from_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("key_hash_secret_file"):
            return data
        path = data["key_hash_secret_file"]
        if data.get("key_hash_secret"):
            raise ValueError("key_hash_secret and key_hash_secret_file: set one of them, not both")
        try:
            secret = Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ValueError(f"key_hash_secret_file: cannot read {path}: {reason}") from None
        if not secret:
            raise ValueError(f"key_hash_secret_file: {path} is empty")
        return {**data, "key_hash_secret": secret}

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parse_upstream(value)  # the reason, never the credentials, on a bad URL
        return value.rstrip("/")

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
    # Environment only: a secret on the command line is visible to every local user.
    "key_hash_secret": ("key_hash_secret",),
    "key_hash_secret_file": ("key_hash_secret_file",),
    "mode": ("defaults", "mode"),
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
            # Routes are named by their name; a key's parts (which have `name`s too) by index.
            named = bool(parts) and parts[-1] == "routes"
            label = route.get("name") if named and isinstance(route, dict) else None
            parts.append(f"[{label!r}]" if label else f"[{item}]")
            node = route
            continue
        key = str(item)
        if key == "parts" and isinstance(node, list):
            continue  # the list form of a composite key: `key[1]`, not `key.parts[1]`
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


# Settings that are secrets: never printed, and each may instead be read from a file
# (`<name>_file`, e.g. a mounted Kubernetes Secret) wherever it appears in the tree.
SECRET_FIELDS = ("password", "key_hash_secret")


def _resolve_secret_files(tree: dict[str, Any], where: str = "") -> None:
    """Replace every `<secret>_file: PATH` by `<secret>: <the file's text>`, in place."""
    for key in list(tree):
        value = tree[key]
        if isinstance(value, dict):
            _resolve_secret_files(value, f"{where}{key}.")
            continue
        stem = key.removesuffix("_file") if isinstance(key, str) else None
        if stem is None or stem == key or stem not in SECRET_FIELDS:
            continue
        if value is None:
            del tree[key]
            continue
        if tree.get(stem) is not None:
            raise ConfigError(f"{where}{key}: give either {stem} or {key}, not both")
        try:
            secret = Path(str(value)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(f"{where}{key}: cannot read {value}: {reason}") from None
        # Files written by editors and `echo` end with a newline that is not the secret.
        secret = secret.rstrip("\r\n")
        if not secret:
            raise ConfigError(f"{where}{key}: {value} is empty")
        del tree[key]
        tree[stem] = secret


def _env_value(raw: str) -> Any:
    """An environment value: a YAML list or mapping when it looks like one, else the string
    (pydantic converts it: `5` to 5, `true` to True), so a password `no` stays `no`."""
    if raw.lstrip().startswith(("[", "{")):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
    return raw


def env_paths(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any]]:
    """Settings from `IDEMPOTENCY_PROXY_<SECTION>__<KEY>` (nested, any depth) and
    `IDEMPOTENCY_PROXY_<TOP_LEVEL_KEY>` variables; the flags' own variables are not here."""
    flags = {ENV_PREFIX + flag.upper() for flag in FLAG_PATHS}
    top = set(Settings.model_fields) | {f"{name}_file" for name in SECRET_FIELDS}
    found: list[tuple[tuple[str, ...], Any]] = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in flags or environ[name] == "":
            continue
        rest = name.removeprefix(ENV_PREFIX).lower()
        path = tuple(rest.split("__"))
        if any(not part for part in path):
            continue  # e.g. IDEMPOTENCY_PROXY__WORKER_DIR, internal to the workers
        if len(path) == 1 and path[0] not in top:
            continue  # IDEMPOTENCY_PROXY_CONFIG and other non-settings
        found.append((path, _env_value(environ[name])))
    return found


def load_settings(
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge file, environment and flags (in rising precedence) into `Settings`.

    Within the environment, the flags' variables (`IDEMPOTENCY_PROXY_REDIS_URL`) beat the
    nested ones (`IDEMPOTENCY_PROXY_STORE__URL`). Secrets may come from files (`*_file`).
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    tree: dict[str, Any] = _read_file(config_file) if config_file else {}
    for path, value in env_paths(environ):
        _set_path(tree, path, value)
    for flag, path in FLAG_PATHS.items():
        env_value = environ.get(ENV_PREFIX + flag.upper())
        if env_value not in (None, ""):
            _set_path(tree, path, env_value)
    for flag, value in (flags or {}).items():
        if value is not None and flag in FLAG_PATHS:
            _set_path(tree, FLAG_PATHS[flag], value)
    _resolve_secret_files(tree)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, tree)) from None


def _mask_url(url: str) -> str:
    """The URL with any password in it replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, hosts = authority.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}://{masked}@{hosts}{slash}{tail}"


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, every secret replaced by ***."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: "***" if key in SECRET_FIELDS and value is not None else walk(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    data: dict[str, Any] = walk(settings.model_dump(mode="json", by_alias=True))
    data["store"]["url"] = _mask_url(settings.store.url)
    return data
