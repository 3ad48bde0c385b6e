"""JSON-lines logging. Keys, bodies and tokens are never logged: a request is named by a
short hash of its scoped key and a request id."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson

logger = logging.getLogger("idempotency_proxy")
access = logging.getLogger("idempotency_proxy.requests")

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                document[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            document["error"] = record.exc_info[0].__name__
        return orjson.dumps(document, default=str).decode()


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The proxy writes its own request line; uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
