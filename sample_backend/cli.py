"""Command line entry point: ``sample-backend`` / ``python -m sample_backend``.

Every option can also come from an environment variable ``SAMPLE_BACKEND_<OPTION>`` so that
containers, CI jobs and test fixtures can configure it without building argument lists; an
explicit option wins over the environment.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from types import FrameType

import orjson
import uvicorn

from sample_backend.app import create_app

ENV_PREFIX = "SAMPLE_BACKEND_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
GRACEFUL_SHUTDOWN_SECONDS = 3
"""Bound on shutdown, so a request sleeping on a long ``delay`` cannot hold the process."""


def _env(option: str, default: str | None) -> str | None:
    return os.environ.get(ENV_PREFIX + option.upper().replace("-", "_"), default)


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {raw!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def _delay(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"delay must be >= 0 seconds, got {raw!r}")
    return value


def _log_level(raw: str) -> str:
    value = raw.lower()
    if value not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; string defaults come from the environment when set."""
    parser = argparse.ArgumentParser(
        prog="sample-backend",
        description=(
            "A deliberately NOT idempotent payment API with a SQLite ledger: every POST to "
            "/v1/orders/pay or /v1/charges charges again, so retries show up as double "
            "charges in GET /v1/ledger. Each option may also be set with the environment "
            "variable SAMPLE_BACKEND_<OPTION> (for example SAMPLE_BACKEND_PORT); an explicit "
            "option wins."
        ),
    )
    parser.add_argument(
        "--host",
        default=_env("host", "127.0.0.1"),
        help="address to listen on (env SAMPLE_BACKEND_HOST; default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=_env("port", "9000"),
        help="TCP port to listen on, 0 for any free port; the port actually used is in the "
        "start message (env SAMPLE_BACKEND_PORT; default 9000)",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=_env("db", None),
        help="SQLite ledger file, created if missing, or ':memory:' (env SAMPLE_BACKEND_DB; "
        "default: ledger.sqlite3 in a new temporary directory, removed on exit)",
    )
    parser.add_argument(
        "--delay",
        metavar="SECONDS",
        type=_delay,
        default=_env("delay", "0"),
        help="seconds to wait after each charge is committed, before answering; a request's "
        "own delay parameter or X-Sample-Delay header replaces it (env SAMPLE_BACKEND_DELAY; "
        "default 0)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        default=_env("log-level", "warning"),
        help=f"uvicorn log level, one of {', '.join(LOG_LEVELS)}; requests are never logged "
        "(env SAMPLE_BACKEND_LOG_LEVEL; default warning)",
    )
    return parser


class _AnnouncingServer(uvicorn.Server):
    """uvicorn server that prints one JSON line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, announcement: dict[str, object]) -> None:
        super().__init__(config)
        self.announcement = announcement

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            sys.stderr.write(orjson.dumps(self.announcement).decode() + "\n")
            sys.stderr.flush()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options and serve until SIGINT/SIGTERM."""
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully, then re-raises the signal; turning that into SystemExit
        # (instead of dying from it) lets the temporary ledger directory be removed.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _exit_cleanly)
    with ExitStack() as stack:
        db: str = args.db
        if db is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sample-backend-"))
            db = os.path.join(tmp, "ledger.sqlite3")
        app = create_app(db, default_delay=args.delay)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            workers=1,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        # Binding here rather than in uvicorn tells us the real port when --port is 0.
        sock = config.bind_socket()
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        announcement: dict[str, object] = {
            "event": "sample_backend.started",
            "url": f"http://{url_host}:{port}",
            "host": host,
            "port": port,
            "db": db,
            "delay": args.delay,
            "pid": os.getpid(),
        }
        _AnnouncingServer(config, announcement).run(sockets=[sock])
