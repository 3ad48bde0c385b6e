"""Running the proxy: the traffic server and the admin server on one event loop (several
workers: proxy/workers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

from proxy import tracing
from proxy.admin import create_admin_app
from proxy.app import ProxyApp
from proxy.config import Settings
from proxy.workers import run_workers

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _TrafficServer(uvicorn.Server):
    """Owns SIGTERM/SIGINT. A signal asks for a graceful drain, and a drained process exits 0:
    uvicorn's own handler raises the captured signal again once serve() returns, which would
    end the process with 143 before the admin server shut down and the logs were flushed."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _EXIT_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class _AdminServer(uvicorn.Server):
    """The admin server follows the traffic server's lifetime instead of owning the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _uvicorn_options(settings: Settings) -> dict[str, Any]:
    """What every uvicorn server of the proxy shares."""
    return {
        "log_config": None,
        "log_level": settings.log_level,
        "access_log": False,
        "server_header": False,
        # The proxy appends the real peer to X-Forwarded-For itself; uvicorn's rewrite of the
        # client from a trusted X-Forwarded-For would make it append the client twice.
        "proxy_headers": False,
        # The proxy sets Date itself: the backend's passes through, replays get a fresh one.
        "date_header": False,
        # httptools with the request head bounded in bytes and time (proxy/protocol.py).
        "http": "proxy.protocol:BoundedHttpToolsProtocol",
        "limit_concurrency": settings.max_concurrency or None,
        "loop": "uvloop",
        "timeout_graceful_shutdown": 30,
        "backlog": 2048,
    }


def uvicorn_config(
    app: Any, host: str, port: int, settings: Settings, **extra: Any
) -> uvicorn.Config:
    """A server of the proxy's (also the demo's in-process replicas); `extra` overrides."""
    return uvicorn.Config(app, host=host, port=port, **{**_uvicorn_options(settings), **extra})


async def serve(settings: Settings) -> None:
    proxy = ProxyApp(settings, tracing=tracing.from_environment())
    traffic = _TrafficServer(
        uvicorn_config(
            proxy,
            settings.listen.host,
            settings.listen.port,
            settings,
            lifespan="on",
        )
    )
    admin_task = None
    admin = None
    if settings.admin.enabled:
        admin_app = create_admin_app(proxy, lambda: traffic.should_exit)
        admin = _AdminServer(
            uvicorn_config(
                admin_app,
                settings.admin.host,
                settings.admin.port,
                settings,
                lifespan="off",
            )
        )
        admin_task = asyncio.create_task(admin.serve())
    try:
        await traffic.serve()
    finally:
        if admin is not None and admin_task is not None:
            admin.should_exit = True
            await admin_task


def run(settings: Settings) -> None:
    if settings.workers > 1:
        run_workers(settings, _uvicorn_options(settings))
        return
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings))
