"""The incoming request as the proxy's story sees it, read once from the ASGI scope."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

_UNPARSED: Any = object()
_LONG_DIGITS = re.compile(rb"\d{19,}")


class InvalidJSON(ValueError):
    """The body claims to be JSON and is not (bad syntax or invalid UTF-8)."""


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def parse_json(body: bytes) -> Any:
    """Parse JSON strictly (UTF-8 only); integers beyond 64 bits are kept exactly.

    NaN, Infinity and numbers beyond a double (1e400) are refused: each would become one
    value (`null` once re-encoded) and different requests would look the same.
    """
    # orjson silently turns integers wider than 64 bits into floats, so two different
    # huge amounts would fingerprint alike; any 19+ digit run takes the exact parser.
    if not _LONG_DIGITS.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    # The standard library keeps every integer exact.
    # RecursionError: nesting deeper than the interpreter's stack, an abuse, not a 500.
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_not_a_number, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidJSON("the body is not valid UTF-8 JSON") from None


def is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


@dataclass(slots=True)
class ProxyRequest:
    """Method, target, raw headers and the fully read body of one request."""

    method: str
    path: str
    raw_path: bytes
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    # Where it came from, for X-Forwarded-For/Proto when (and only when) it is forwarded.
    client: str | None = None
    scheme: str = "http"
    # Validated or generated (proxy.app); forwarded upstream in place of the client's.
    request_id: bytes = b""
    _json: Any = field(default=_UNPARSED, repr=False)
    # An XML body parsed once (proxy.xmlkeys): its tree and canonical form, or why not.
    _xml: Any = field(default=None, repr=False)

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of a header, in order; `name` must be lower case."""
        return [value for key, value in self.headers if key == name]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def media_type(self) -> str:
        """The Content-Type without parameters, lower case ('' when absent)."""
        value = self.header(b"content-type")
        if not value:
            return ""
        return value.split(b";", 1)[0].strip().lower().decode("latin-1")

    def json(self) -> Any:
        """The parsed JSON body, parsed at most once per request."""
        if self._json is _UNPARSED:
            self._json = parse_json(self.body)
        return self._json
