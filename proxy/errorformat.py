"""The shape of the answers the proxy makes itself: RFC 9457 problems, or the backend's dialect.

Clients in front of a payment or legacy API were written for that API's errors. A
route may therefore answer the proxy's own decisions (409 in progress, 422 key
reused, 503, ...) in a template of its choosing: a status per problem type, a
content type, and a JSON body whose strings carry placeholders. Everything is
compiled once at start-up; a request only fills the placeholders in.

Whatever the body, every proxy-made answer keeps `Cache-Control: no-store`, its
`Retry-After` and the request id. The placeholders only ever carry the proxy's
own texts and the request id: never the key, never a body.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.problems import TITLES, TYPE_BASE, Problem

REQUEST_ID = b"x-request-id"
_REPLAYED = b"idempotent-replayed"

PLACEHOLDERS = frozenset(
    {"type", "type_uri", "title", "detail", "status", "retry_after", "request_id", "code"}
)
# `{name}` is a placeholder; `{{` and `}}` are literal braces.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# What a header value may carry; anything else a placeholder brings in becomes '?'.
_NOT_HEADER_TEXT = re.compile(r"[^\x20-\x7e]")
# Statuses that carry no body: a template's document could not be sent with them.
_NO_BODY = frozenset({204, 205, 304})
# Headers the proxy sets itself on every answer; a template cannot replace them.
_RESERVED = frozenset(
    {"content-type", "content-length", "cache-control", "date", "retry-after", "x-request-id"}
    | {"connection", "transfer-encoding", "idempotent-replayed"}
)


def problem_types() -> frozenset[str]:
    return frozenset(TITLES)


class ErrorFormat:
    """RFC 9457 problem+json, the default: only the request id header is added."""

    name = "problem"

    def render(
        self,
        problem: Problem,
        headers: list[tuple[bytes, bytes]],
        request_id: bytes,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes | None]:
        """Status, headers and body (None: keep the problem document already built)."""
        headers.append((REQUEST_ID, request_id))
        return problem.status, headers, None


PROBLEM = ErrorFormat()


# A compiled string: literal pieces and placeholder names, or one whole placeholder
# (which keeps its JSON type: `"{status}"` renders as a number).
_Part = tuple[str, bool]  # (text, is_placeholder)


@dataclass(frozen=True, slots=True)
class _Text:
    parts: tuple[_Part, ...]
    whole: str | None


_Node = Any  # a JSON tree whose strings are _Text


def _compile_text(text: str) -> _Text | str:
    parts: list[_Part] = []
    last = 0
    for found in _TOKEN.finditer(text):
        if found.start() > last:
            parts.append((text[last : found.start()], False))
        token = found.group(0)
        if token in ("{{", "}}"):
            parts.append((token[0], False))
        else:
            name = found.group(1).strip()
            if name not in PLACEHOLDERS:
                raise ValueError(
                    f"unknown placeholder {{{name}}} (use {', '.join(sorted(PLACEHOLDERS))})"
                )
            parts.append((name, True))
        last = found.end()
    if last < len(text):
        parts.append((text[last:], False))
    if not any(is_name for _, is_name in parts):
        return "".join(text for text, _ in parts)
    if len(parts) == 1:
        return _Text((), parts[0][0])
    return _Text(tuple(parts), None)


def _compile_node(node: Any) -> _Node:
    if isinstance(node, str):
        return _compile_text(node)
    if isinstance(node, Mapping):
        return {str(k): _compile_node(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_compile_node(v) for v in node]
    if isinstance(node, int) and not isinstance(node, bool) and not -(2**63) <= node < 2**64:
        raise ValueError(f"integers in a body template must fit in 64 bits, not {node}")
    if node is None or isinstance(node, bool | int | float):
        return node
    raise ValueError(f"{type(node).__name__} values cannot appear in a body template")


def _fill(node: _Node, values: Mapping[str, object]) -> Any:
    if isinstance(node, _Text):
        if node.whole is not None:
            return values[node.whole]
        return "".join(
            ("" if values[text] is None else str(values[text])) if is_name else text
            for text, is_name in node.parts
        )
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


class TemplateFormat(ErrorFormat):
    """A status per problem type, a content type and a JSON body template."""

    def __init__(
        self,
        name: str,
        *,
        body: Any,
        content_type: str = "application/json",
        status: Mapping[str, int] | None = None,
        code: Mapping[str, str] | None = None,
        headers: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.name = name
        if isinstance(body, str):
            try:
                body = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"body is not valid JSON ({exc})") from None
        if not isinstance(body, Mapping | list | tuple):
            raise ValueError("body must be a JSON object or array")
        self._body = _compile_node(body)
        if not content_type or any(not 32 <= ord(c) < 127 for c in content_type):
            raise ValueError(f"content_type {content_type!r} is not a printable ASCII value")
        self._content_type = content_type.encode("ascii")
        known = problem_types() | {"*"}
        for what, table in (("status", status), ("code", code), ("headers", headers)):
            for key in table or {}:
                if key not in known:
                    raise ValueError(
                        f"{what}: {key!r} is not a problem type "
                        f"(use '*' or one of {', '.join(sorted(problem_types()))})"
                    )
        for code_value in (status or {}).values():
            if not 200 <= code_value <= 599:
                raise ValueError(f"status: {code_value} is not an error status")
            if code_value in _NO_BODY:
                raise ValueError(f"status: {code_value} cannot carry the template's body")
        self._status = dict(status or {})
        self._code = dict(code or {})
        # Extra headers per type, '*' merged under each type's own; values may carry
        # placeholders too (the request id, say), which are all printable ASCII.
        compiled: dict[str, dict[bytes, _Text | str]] = {}
        for key, extra in (headers or {}).items():
            own = compiled.setdefault(key, {})
            for header, value in extra.items():
                lowered = header.strip().lower()
                if not _HEADER_NAME.match(lowered) or lowered in _RESERVED:
                    raise ValueError(f"headers: {header!r} cannot be set by a template")
                if any(not 32 <= ord(c) < 127 for c in value):
                    raise ValueError(f"headers: the value of {header!r} is not printable ASCII")
                own[lowered.encode("ascii")] = _compile_text(value)
        star = compiled.get("*", {})
        self._headers = {key: tuple({**star, **own}.items()) for key, own in compiled.items()}
        # A template that cannot render is found now, not on the first 409.
        sample = Problem("request-in-progress", 409, 'a "detail" \\ with\nescapes', retry_after=1)
        self.render(sample, [], b"sample-request-id")

    def render(
        self,
        problem: Problem,
        headers: list[tuple[bytes, bytes]],
        request_id: bytes,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes | None]:
        name = problem.name
        status = self._status.get(name) or self._status.get("*") or problem.status
        title = TITLES.get(name, name)
        values: dict[str, object] = {
            "type": name,
            "type_uri": TYPE_BASE + name,
            "title": title,
            "detail": problem.detail or title,
            "status": status,
            "retry_after": problem.retry_after,
            "request_id": request_id.decode("ascii"),
            "code": self._code.get(name) or self._code.get("*") or name,
        }
        # orjson escapes every string it writes: quotes, backslashes, control characters.
        body = orjson.dumps(_fill(self._body, values))
        out: list[tuple[bytes, bytes]] = [
            (b"content-type", self._content_type),
            (b"cache-control", b"no-store"),
        ]
        for header, value in headers:
            # Date, Retry-After, Connection: close and the replay marker stay as the
            # problem set them; the body's own headers are replaced.
            if header in (b"date", b"retry-after", b"connection", _REPLAYED):
                out.append((header, value))
        for header, text in self._headers.get(name) or self._headers.get("*") or ():
            filled = _fill(text, values)
            # A `code` from the config may hold anything; a header value never splits.
            shown = "" if filled is None else _NOT_HEADER_TEXT.sub("?", str(filled))
            out.append((header, shown.encode("ascii")))
        out.append((b"content-length", str(len(body)).encode("ascii")))
        out.append((REQUEST_ID, request_id))
        return status, out, body


def _stripe() -> TemplateFormat:
    # Stripe's SDKs read `error.type`: `idempotency_error` on 400 is IdempotencyError,
    # other 400s are InvalidRequestError; a 409 is retried by the SDK, as is any 5xx.
    # `Stripe-Should-Retry: false` stops the retry where it could only get the same answer.
    # Request-Id is where the SDK reads the id its exceptions report.
    request_id = {"Request-Id": "{request_id}"}
    no_retry = {"Stripe-Should-Retry": "false"}
    return TemplateFormat(
        "stripe",
        body={
            "error": {
                "type": "{code}",
                "code": "{type}",
                "message": "{detail}",
                "request_id": "{request_id}",
            }
        },
        status={
            "key-reused": 400,
            "body-too-large": 400,
            "headers-too-large": 400,
            "unsupported-media-type": 400,
        },
        code={
            "key-reused": "idempotency_error",
            "request-in-progress": "idempotency_error",
            "key-missing": "invalid_request_error",
            "key-invalid": "invalid_request_error",
            "tenant-invalid": "invalid_request_error",
            "body-too-large": "invalid_request_error",
            "body-invalid": "invalid_request_error",
            "body-timeout": "invalid_request_error",
            "header-timeout": "invalid_request_error",
            "unsupported-media-type": "invalid_request_error",
            "headers-too-large": "invalid_request_error",
            "target-invalid": "invalid_request_error",
            "request-invalid": "invalid_request_error",
            "*": "api_error",
        },
        headers={"*": request_id, "outcome-unknown": no_retry, "replay-unavailable": no_retry},
    )


def _gocardless() -> TemplateFormat:
    # GoCardless's error document: `error.type` picks the SDK's exception class,
    # `error.errors[].reason` refines it; `code` repeats the HTTP status.
    return TemplateFormat(
        "gocardless",
        body={
            "error": {
                "type": "{code}",
                "code": "{status}",
                "message": "{detail}",
                "documentation_url": "{type_uri}",
                "request_id": "{request_id}",
                "errors": [{"reason": "{type}", "message": "{detail}"}],
            }
        },
        status={"key-reused": 409},
        code={
            "key-reused": "invalid_state",
            "request-in-progress": "invalid_state",
            "replay-unavailable": "invalid_state",
            "key-missing": "invalid_api_usage",
            "key-invalid": "invalid_api_usage",
            "tenant-invalid": "invalid_api_usage",
            "body-too-large": "invalid_api_usage",
            "body-invalid": "invalid_api_usage",
            "body-timeout": "invalid_api_usage",
            "header-timeout": "invalid_api_usage",
            "unsupported-media-type": "invalid_api_usage",
            "headers-too-large": "invalid_api_usage",
            "target-invalid": "invalid_api_usage",
            "request-invalid": "invalid_api_usage",
            "*": "gocardless",
        },
    )


PRESETS: dict[str, Callable[[], ErrorFormat]] = {
    "problem": lambda: PROBLEM,
    "stripe": _stripe,
    "gocardless": _gocardless,
}


def problem_name(content_type: str, body: bytes) -> str:
    """The proxy's problem name in an answer of the problem format or a preset, else ''.

    For clients that must tell the proxy's answers apart (the demo, the load tests)
    whichever format the proxy was given.
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    if not media_type.endswith("json"):
        return ""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(document, dict):
        return ""
    if media_type == "application/problem+json":
        name = str(document.get("type", "")).rsplit("/", 1)[-1]
    else:
        error = document.get("error")
        if not isinstance(error, dict):
            return ""
        name = str(error.get("code", ""))  # stripe
        reasons = error.get("errors")
        if isinstance(reasons, list) and reasons and isinstance(reasons[0], dict):
            name = str(reasons[0].get("reason", ""))  # gocardless
    return name if name in TITLES else ""
