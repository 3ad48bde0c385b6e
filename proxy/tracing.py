"""Optional OpenTelemetry tracing, configured only through the standard `OTEL_*` environment.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter other than `none`, or when an
OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`);
`OTEL_SDK_DISABLED=true` turns it off. The OpenTelemetry packages are the `tracing` extra:
without them, and without that environment, nothing here is imported.

When it is off the proxy holds no `Tracing` object and the hot path is the untraced code
itself (the lifecycle swaps its methods once at start-up), so it costs nothing.

Spans carry the route, the outcome, whether the answer was a replay, and the key's keyed
hash; never the key, a body or a header's value.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from proxy.config import ConfigError
from proxy.upstream import Headers, UpstreamClient, UpstreamResponse

_TRACE_HEADERS = (b"traceparent", b"tracestate")
_EXPORTERS = ("otlp", "console")
INSTALL_HINT = "pip install 'idempotency-proxy[tracing]'"


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the `OTEL_*` environment asks for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    names = [
        name.strip().lower()
        for name in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")
        if name.strip() and name.strip().lower() != "none"
    ]
    for name in names:
        if name not in _EXPORTERS:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not supported (use otlp, console or none)"
            )
    if "otlp" in names:
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol.strip().lower() != "http/protobuf":
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (use http/protobuf)"
            )
    return names


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError (one line) when tracing is asked for but cannot work."""
    env = os.environ if environ is None else environ
    if not configured(env):
        return
    _exporter_names(env)
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise ConfigError(
            "OTEL_*: tracing is configured but the OpenTelemetry packages are not installed "
            f"({INSTALL_HINT}, or unset OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT)"
        ) from None


def from_environment(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """A `Tracing` exporting as the `OTEL_*` environment says, or None when it is off."""
    env = os.environ if environ is None else environ
    if not configured(env):
        return None
    check_environment(env)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "idempotency-proxy"}))
    # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=resource)
    for name in _exporter_names(env):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return Tracing(provider)


class Tracing:
    """The proxy's spans, on a given OpenTelemetry tracer provider."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("idempotency-proxy")
        # W3C Trace Context, whatever OTEL_PROPAGATORS says: the contract is `traceparent`.
        self.propagator = TraceContextTextMapPropagator()
        self._kind = trace.SpanKind
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._in_context = trace.set_span_in_context

    def request_span(
        self, method: str, route: str, headers: list[tuple[bytes, bytes]]
    ) -> AbstractContextManager[Any]:
        """The span of one request on a protected route, continuing an incoming trace."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in _TRACE_HEADERS
        }
        span: AbstractContextManager[Any] = self.tracer.start_as_current_span(
            f"{method} {route}",
            context=self.propagator.extract(carrier) if carrier else None,
            kind=self._kind.SERVER,
            attributes={"http.request.method": method, "idempotency.route": route},
        )
        return span

    def finish(self, span: Any, *, outcome: str, status: int, replayed: bool, key_hash: str) -> str:
        """Describe the answer on the request's span; the trace id for the log line."""
        span.set_attribute("idempotency.outcome", outcome)
        span.set_attribute("idempotency.replayed", replayed)
        span.set_attribute("http.response.status_code", status)
        if key_hash:
            span.set_attribute("idempotency.key_hash", key_hash)
        if status >= 500:
            span.set_status(self._error)
        return f"{span.get_span_context().trace_id:032x}"

    def store_span(self, operation: str) -> _Child:
        """A store call's span, child of the request's. Leaf spans are never made current:
        attaching and detaching the context would double their cost."""
        return _Child(
            self.tracer.start_span(
                f"store {operation}",
                kind=self._kind.CLIENT,
                attributes={"idempotency.store.operation": operation},
            )
        )

    def wrap(self, upstream: UpstreamClient) -> UpstreamClient:
        return TracedUpstream(upstream, self)

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        self.provider.shutdown()


class TracedUpstream:
    """An upstream client whose calls are spans, and whose requests carry a `traceparent`
    naming that span as the parent (any incoming trace headers are replaced by it)."""

    def __init__(self, inner: UpstreamClient, tracing: Tracing) -> None:
        self.inner = inner
        self.tracing = tracing

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def send(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterable[bytes],
        *,
        timeout: float,
        read_limit: int | None,
    ) -> UpstreamResponse:
        tracing = self.tracing
        span = tracing.tracer.start_span(
            "upstream", kind=tracing._kind.CLIENT, attributes={"http.request.method": method}
        )
        with _Child(span):
            carrier: dict[str, str] = {}
            tracing.propagator.inject(carrier, context=tracing._in_context(span))
            forward = [(k, v) for k, v in headers if k not in _TRACE_HEADERS]
            forward += _encoded(carrier)
            response = await self.inner.send(
                method, target, forward, body, timeout=timeout, read_limit=read_limit
            )
            span.set_attribute("http.response.status_code", response.status)
            return response


class _Child:
    """Ends a span that was not made current; an exception marks it failed."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def __enter__(self) -> Any:
        return self.span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if exc is not None:
            from opentelemetry.trace import Status, StatusCode

            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        self.span.end()


def _encoded(carrier: Mapping[str, str]) -> Iterator[tuple[bytes, bytes]]:
    for name, value in carrier.items():
        yield name.encode("latin-1"), value.encode("latin-1")
