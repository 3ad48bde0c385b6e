#!/usr/bin/env python3
"""The benchmark's trivial backend: one Starlette worker that answers 201 with a small JSON
body, so what a proxy scenario adds is the proxy's own cost, not the backend's.

It keeps the one number the benchmark's validity check needs, the charges it executed
(`GET /v1/ledger`, `POST /v1/ledger/reset`), in memory. The SOAP route answers 200, as
the sample backend's does.

    python scripts/bench_backend.py --port P
"""

from __future__ import annotations

import argparse
import itertools

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_ids = itertools.count(1)
_ledger = {"charges": 0}


async def charge(request: Request) -> Response:
    await request.body()
    _ledger["charges"] += 1
    return JSONResponse({"id": f"ch_{next(_ids)}", "status": "succeeded"}, status_code=201)


async def soap_pay(request: Request) -> Response:
    await request.body()
    _ledger["charges"] += 1
    return Response(
        "<ok/>", status_code=200, media_type="text/xml; charset=utf-8"
    )  # the sample backend's SOAP route answers 200 as well


async def ledger(request: Request) -> Response:
    return JSONResponse({"charges": _ledger["charges"]})


async def ledger_reset(request: Request) -> Response:
    _ledger["charges"] = 0
    return Response(status_code=204)


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[
        Route("/v1/charges", charge, methods=["POST"]),
        Route("/v1/orders/pay", charge, methods=["POST"]),
        Route("/soap/payments", soap_pay, methods=["POST"]),
        Route("/v1/ledger", ledger, methods=["GET"]),
        Route("/v1/ledger/reset", ledger_reset, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        workers=1,
    )


if __name__ == "__main__":
    main()
