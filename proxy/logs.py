"""JSON-lines logging. Keys, bodies and tokens are never logged: a request is named by a
short hash of its scoped key and a request id."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

logger = logging.getLogger("idempotency_proxy")
access = logging.getLogger("idempotency_proxy.requests")

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


# Credentials that error messages can carry: a password in a URL, `password=...` style
# pairs, bearer tokens. Masked wherever an error's text is logged.
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_PAIR = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|authorization)(\s*[=:]\s*)[^\s,;&]+"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[a-z0-9._~+/=-]+")
# Extras that may hold an error's text.
_MASKED_FIELDS = ("reason", "error_message")


def mask(text: str) -> str:
    """`text` with credentials replaced by `***`."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _BEARER.sub(r"\1 ***", text)
    return _PAIR.sub(r"\1\2***", text)


def describe(exc: BaseException) -> str:
    """An exception's class and message, and those of its cause, masked: what an operator
    needs to tell a timeout from a refused connection or a bad password."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        text += f" (caused by {type(cause).__name__}: {cause})" if str(cause) else ""
    return mask(text)


def _timestamp(created: float) -> str:
    """ISO-8601 in UTC with milliseconds, e.g. 2026-05-04T09:15:02.123Z."""
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                document[key] = value
        for key in _MASKED_FIELDS:
            if isinstance(document.get(key), str):
                document[key] = mask(document[key])
        if record.exc_info and record.exc_info[0] is not None:
            document["error"] = record.exc_info[0].__name__
            if record.exc_info[1] is not None:
                document["error_message"] = describe(record.exc_info[1])
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
