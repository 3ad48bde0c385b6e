# syntax=docker/dockerfile:1
# The idempotency proxy as a small, non-root image.
#   docker build -t idempotency-proxy:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 idempotency-proxy:0.1.0 \
#       run --upstream http://payments:9000 --redis-url redis://redis:6379/0
# Configuration: flags, IDEMPOTENCY_PROXY_* variables or --config FILE (docs/configuration.md).
# No secret is baked in: the store URL comes from the environment at run time.
#
# Supply chain: the runtime dependencies are installed from requirements.lock, every
# file checked against its sha256 (--require-hashes); the project's own wheel is
# installed without dependencies. Refresh the lock with `make lock` (docs/operations.md).
#
# Base image: pin it by digest for a reproducible build, and move the pin on purpose:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # the index digest
#   then write FROM python:3.11-slim-bookworm@sha256:<digest> in both stages below.
# The tag names the Debian release (bookworm) so a tag move cannot change the OS.

# --- builder: install the locked dependencies and the wheel into a venv
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# The lock alone first: this layer is rebuilt only when the dependencies change.
COPY requirements.lock ./
# Every runtime dependency ships manylinux wheels, so no compiler is needed.
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r requirements.lock

COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
COPY sample_backend ./sample_backend

# The `tracing` extra (OpenTelemetry) is in the image and in the lock; it stays off unless
# OTEL_* asks for traces.
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl

# --- runtime: the same Python, the venv, nothing else
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="idempotency-proxy" \
      org.opencontainers.image.description="Makes an HTTP payment backend idempotent: one execution per key, replays for duplicates." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY --from=builder /opt/venv /opt/venv
COPY LICENSE /usr/share/doc/idempotency-proxy/LICENSE

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

# 8080 traffic, 9090 admin (/livez /readyz /metrics).
EXPOSE 8080 9090

# Exec form: the proxy is PID 1 and receives SIGTERM itself, which starts the graceful drain.
ENTRYPOINT ["idempotency-proxy"]
CMD ["run"]
