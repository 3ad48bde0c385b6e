"""The proxy's ASGI app in this process, over an in-memory transport: no subprocess, no port.

`InProcessProxy` builds a `ProxyApp` on the memory store, runs its lifespan (start-up
opens the upstream pools; shutdown drains them) and is reached through
`httpx.ASGITransport` mounted on a made-up origin (`url`), so a test speaks to it with
the same client and URLs as to a proxy process. The backend stays a real process: the
proxy's upstream client needs a real socket. What needs a real server (the bounded HTTP
parser, keep-alive, a client's socket closing, replicas) stays on processes.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn

from devstack.processes import free_port, wait_for_port
from proxy import logs
from proxy.app import ProxyApp
from proxy.config import Settings

_ids = itertools.count(1)


class InProcessProxy:
    """One ProxyApp with its lifespan; `url` routes to it through `mounts()`."""

    def __init__(self, config: Mapping[str, Any], upstream: str, name: str = "inproc") -> None:
        settings = Settings.model_validate(
            {**config, "upstream": upstream, "store": {"url": "memory://"}, "log_level": "warning"}
        )
        self.app = ProxyApp(settings)
        self.name = f"{name}-{next(_ids)}"
        self.url = f"http://{self.name}.inproc"
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> InProcessProxy:
        """Run the lifespan's start-up, as uvicorn does with `lifespan="on"`."""
        logs.configure("warning")
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self.app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        message = await asyncio.wait_for(self._outbox.get(), 30)
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"{self.name}: start-up failed: {message}")
        return self

    async def stop(self) -> None:
        """The lifespan's shutdown: in-flight work finishes, pools close."""
        if self._task is None:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self._outbox.get(), 60)
        await self._task
        self._task = None

    def transport(self) -> httpx.ASGITransport:
        # The peer a socket would show: the proxy appends it to X-Forwarded-For.
        return httpx.ASGITransport(app=self.app, client=("127.0.0.1", 50000))

    def log_tail(self, limit: int = 0) -> str:
        return f"--- {self.name}: in-process, its log is pytest's captured output ---"


def mounts(proxies: list[InProcessProxy]) -> dict[str, httpx.AsyncBaseTransport]:
    """httpx mounts sending each proxy's `url` to its app (everything else: the network)."""
    return {f"{proxy.url}": proxy.transport() for proxy in proxies}


@asynccontextmanager
async def serve_on_uvicorn(app: Any, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """`app` on a real uvicorn server in this event loop (lifespan on), for as long as the
    block runs: a real socket where a test needs one, without a subprocess."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started or task.done():
            break
        await asyncio.sleep(0.025)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task


class ThreadedUpstream:
    """A bare ASGI app (`_app`, written by the subclass) on uvicorn in a thread of its own:
    a real HTTP server that answers any method and path, for tests whose event loop must
    stay free (the proxy runs as a process; this stands where its backend would)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        config = uvicorn.Config(
            self._app,
            host=host,
            port=self.port,
            interface="asgi3",
            lifespan="off",
            log_level="warning",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name=type(self).__name__, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        wait_for_port(self.host, self.port, timeout=10)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise NotImplementedError
