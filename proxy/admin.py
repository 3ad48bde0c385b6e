"""The admin port, apart from traffic: /livez, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.app import ProxyApp


def create_admin_app(proxy: ProxyApp, shutting_down: Callable[[], bool]) -> Starlette:
    async def livez(request: Request) -> Response:
        # The process answers; nothing else. A restart cannot fix Redis.
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        # Serving and not draining. A store outage is answered per request (503),
        # so readiness does not flap with it.
        if proxy.ready and not proxy.draining and not shutting_down():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "draining" if proxy.ready else "starting"}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(proxy.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/livez", livez),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )
