# syntax=docker/dockerfile:1
# The idempotency proxy as a small, non-root image.
#   docker build -t idempotency-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 idempotency-proxy:0.1.0 \
#       run --upstream http://payments:9000 --redis-url redis://redis:6379/0
# Configuration: flags, IDEMPOTENCY_PROXY_* variables or --config FILE (docs/configuration.md).
# No secret is baked in: the store URL comes from the environment at run time.

# --- builder: build the wheel and install it with its dependencies into a venv
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY sample_backend ./sample_backend

# Every runtime dependency ships manylinux wheels, so no compiler is needed. The `tracing`
# extra (OpenTelemetry) is in the image; it stays off unless OTEL_* asks for traces.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && for wheel in /wheels/*.whl; do /opt/venv/bin/pip install --no-cache-dir "${wheel}[tracing]"; done

# --- runtime: the same Python, the venv, nothing else
FROM python:3.11-slim

LABEL org.opencontainers.image.title="idempotency-proxy" \
      org.opencontainers.image.description="Makes an HTTP payment backend idempotent: one execution per key, replays for duplicates." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=builder /opt/venv /opt/venv

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

# 8080 traffic, 9090 admin (/livez /readyz /metrics).
EXPOSE 8080 9090

# Exec form: the proxy is PID 1 and receives SIGTERM itself, which starts the graceful drain.
ENTRYPOINT ["idempotency-proxy"]
CMD ["run"]
