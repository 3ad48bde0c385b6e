"""`Stack`: Redis, the sample backend and proxy replicas as one set of children.

What `idempotency-proxy demo` and `make loadtest-smoke` start: every child in its own
process group, all started side by side and then awaited, all stopped by close().
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from devstack.processes import HOST, ManagedProcess, stop_all
from devstack.servers import BackendServer, ProxyServer, RedisServer

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0

# The routes every replica protects: the natural key on pay-an-order (what stops a double
# click: the client's own random keys would be two keys, two charges), the header elsewhere.
ROUTES: list[dict[str, Any]] = [
    {
        "name": "pay",
        "methods": ["POST"],
        "path": "/v1/orders/pay",
        "key": {"from": "json", "field": "order_id"},
        "required": True,
        # When the backend resets after it may have charged, ask its ledger instead of an
        # operator. (In production `after` exceeds the backend's longest processing time.)
        "status_check": {
            "path": "/v1/orders/{order_id}/status",
            "after": "500ms",
            "backoff": "250ms",
        },
    },
    {
        "name": "charges",
        "methods": ["POST"],
        "path": "/v1/charges",
        "key": {"from": "header", "name": "Idempotency-Key"},
        "required": True,
    },
    # A legacy SOAP gateway: the order id inside the envelope is the key (SOAP 1.1 or 1.2).
    {
        "name": "soap-pay",
        "methods": ["POST"],
        "path": "/soap/payments",
        "key": {
            "from": "xml",
            "path": "/soap:Envelope/soap:Body/p:Pay/p:OrderId",
            "namespaces": {
                "soap": [
                    "http://schemas.xmlsoap.org/soap/envelope/",
                    "http://www.w3.org/2003/05/soap-envelope",
                ],
                "p": "urn:idempotency-proxy:sample:payments",
            },
        },
        "required": True,
    },
]


class Stack:
    """Redis, the sample backend and proxy replicas as child processes, stopped by close()."""

    def __init__(self, workdir: Path | None = None, *, error_format: str = "problem") -> None:
        self._own_dir = workdir is None
        # The replicas' format for their own answers.
        self.error_format = error_format
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="idempotency-demo-")) if workdir is None else workdir
        )
        self.children: list[ManagedProcess] = []
        # Launched but not yet seen ready.
        self._pending: list[ManagedProcess] = []
        self.redis_url: str | None = None
        self.backend_url = ""
        self.proxy_urls: list[str] = []
        self.observer_urls: list[str] = []
        self.observer_admin_urls: list[str] = []

    def _launch(self, child: ManagedProcess) -> None:
        self.children.append(child)
        child.launch()
        self._pending.append(child)

    def start_redis(self) -> str:
        """A private redis-server, data in the work dir."""
        server = RedisServer(self.workdir / "redis", ready_timeout=READY_TIMEOUT)
        self._launch(server)
        self.redis_url = server.url
        return server.url

    def start_backend(self) -> str:
        """The sample backend with its own SQLite ledger in the work dir."""
        server = BackendServer(
            self.workdir / "backend",
            db=self.workdir / "ledger.sqlite3",
            args=["--log-level", "warning"],
            ready_timeout=READY_TIMEOUT,
        )
        self._launch(server)
        self.backend_url = server.url
        return server.url

    def start_proxies(
        self, count: int, *, upstream: str, redis_url: str, mode: str = "enforce"
    ) -> list[str]:
        """`count` replicas of `python -m proxy run`, all on one Redis and the demo routes
        (in `mode: observe`, the observers, whose admin URLs are kept for their metrics)."""
        observe = mode == "observe"
        defaults = {"error_format": self.error_format, "mode": mode}
        urls: list[str] = []
        for index in range(count):
            name = f"observe-{index + 1}" if observe else f"proxy-{index + 1}"
            server = ProxyServer(
                self.workdir / name,
                upstream=upstream,
                redis_url=redis_url,
                config={"defaults": defaults, "routes": ROUTES},
                log_level="warning",
                ready_timeout=READY_TIMEOUT,
                wait_readyz=True,
                name=name,
            )
            self._launch(server)
            urls.append(server.url)
            if observe:
                self.observer_admin_urls.append(server.admin_url)
        if observe:
            self.observer_urls += urls
        else:
            self.proxy_urls += urls
        return urls

    def start_replicated(self, replicas: int, observers: int = 0) -> None:
        """Redis, backend, `replicas` proxies and `observers` observe-mode proxies, ready."""
        redis_url = self.start_redis()
        upstream = self.start_backend()
        # Redis starts in milliseconds; the proxies then find it at their start-up check.
        self.wait_ready()
        self.start_proxies(replicas, upstream=upstream, redis_url=redis_url)
        if observers:
            self.start_proxies(observers, upstream=upstream, redis_url=redis_url, mode="observe")
        self.wait_ready()

    def wait_ready(self) -> None:
        """Block until everything launched so far serves (fails early if a child exits)."""
        pending, self._pending = self._pending, []
        for child in pending:
            child.ready()

    def describe(self) -> str:
        parts = []
        if self.redis_url:
            parts.append(f"redis {self.redis_url}")
        parts.append(f"backend {self.backend_url}")
        if self.proxy_urls:
            parts.append(f"replicas {' '.join(self.proxy_urls)}")
        if self.observer_urls:
            parts.append(f"observing {' '.join(self.observer_urls)}")
        return " | ".join(parts)

    def close(self) -> None:
        try:
            stop_all(self.children, STOP_TIMEOUT)
        finally:
            if self._own_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["HOST", "READY_TIMEOUT", "ROUTES", "STOP_TIMEOUT", "Stack"]
