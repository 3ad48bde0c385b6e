"""Where the idempotency key comes from, whether it is well formed, and whose it is.

The scoped key is a hash of tenant, route namespace and key, wrapped in a Redis
Cluster hash tag: raw client bytes never become Redis key names, and every key
of one record lands in one slot.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from proxy import xmlkeys
from proxy.config import KeySpec
from proxy.problems import Problem, key_invalid, key_missing
from proxy.request import InvalidJSON, ProxyRequest, is_json

MAX_KEY_LENGTH = 255
DEFAULT_TENANT = "default"

# Leads every composite key; validate() refuses control characters in a single key.
COMPOSITE_MARK = "\x1e"

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True, slots=True)
class ScopedKey:
    """The store's name for one record, and a short hash that is safe to log."""

    storage_key: str
    log_hash: str


def validate(key: str) -> str:
    """Reject what the contract rejects: empty, too long, non-printable or non-ASCII."""
    if not key:
        raise key_invalid("the key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise key_invalid(f"the key is longer than {MAX_KEY_LENGTH} characters")
    if not all(" " <= ch <= "~" for ch in key):
        raise key_invalid("the key must be printable ASCII")
    return key


def parse_header(values: list[bytes]) -> str:
    """One key from `Idempotency-Key` header lines: an sf-string (`"abc"`) or bare (`abc`).

    Both forms name the same key; parameters after `;` are ignored; two header
    lines or a comma list are several keys and rejected.
    """
    if len(values) > 1:
        raise key_invalid("several Idempotency-Key headers were sent; send exactly one")
    try:
        raw = values[0].decode("ascii")
    except UnicodeDecodeError:
        raise key_invalid("the key must be printable ASCII") from None
    raw = raw.strip(" \t")
    if raw.startswith('"'):
        key, rest = _sf_string(raw)
        rest = rest.lstrip(" \t")
        if rest.startswith(","):
            raise key_invalid("a list of keys was sent; send exactly one")
        if rest and not rest.startswith(";"):
            raise key_invalid("unexpected characters after the quoted key")
        return validate(key)
    key = raw.split(";", 1)[0].rstrip(" \t")
    if "," in key:
        raise key_invalid("a list of keys was sent; send exactly one")
    if '"' in key or "\\" in key:
        raise key_invalid("quotes and backslashes are only allowed in a quoted key")
    return validate(key)


def _sf_string(raw: str) -> tuple[str, str]:
    """Parse an RFC 8941 string at the start of `raw`; return it and what follows."""
    out: list[str] = []
    i = 1
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            if i + 1 >= len(raw) or raw[i + 1] not in '"\\':
                raise key_invalid("a quoted key may only escape '\"' and '\\'")
            out.append(raw[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), raw[i + 1 :]
        out.append(ch)
        i += 1
    raise key_invalid("the quoted key is not terminated")


def _single(values: list[str] | None, where: str, required: bool) -> str | None:
    if not values:
        if required:
            raise key_missing(where)
        return None
    if len(values) > 1:
        raise key_invalid(f"{where} was sent more than once")
    return values[0]


def _json_field(request: ProxyRequest, dotted: str, required: bool) -> str | None:
    where = f"the JSON field '{dotted}'"
    if not is_json(request.media_type):
        raise Problem(
            "unsupported-media-type",
            415,
            f"send Content-Type: application/json; the key is read from {where}",
        )
    try:
        node: Any = request.json()
    except InvalidJSON:
        raise Problem(
            "body-invalid", 400, f"the body is not valid JSON; the key is read from {where}"
        ) from None
    for name, positions in _json_steps(dotted):
        if not isinstance(node, dict) or name not in node:
            if required:
                raise key_missing(where)
            return None
        node = node[name]
        # A list is only entered at a position the route names (`items[0]`), so a key
        # never depends on list order by accident.
        for position in positions:
            if not isinstance(node, list) or position >= len(node):
                if required:
                    raise key_missing(where)
                return None
            node = node[position]
    if node is None and not required:
        return None
    if isinstance(node, bool) or not isinstance(node, str | int):
        raise key_invalid(f"{where} must be a string or an integer")
    return str(node)


_POSITIONS = re.compile(r"\[(\d+)\]")
_STEP = re.compile(r"^(.+?)((?:\[\d+\])*)$")


@functools.lru_cache(maxsize=256)
def _json_steps(dotted: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """`payments[1].order_id` -> (("payments", (1,)), ("order_id", ()))."""
    steps: list[tuple[str, tuple[int, ...]]] = []
    for part in dotted.split("."):
        found = _STEP.match(part)
        if found is None:
            steps.append((part, ()))
            continue
        name, positions = found.groups()
        steps.append((name, tuple(int(p) for p in _POSITIONS.findall(positions))))
    return tuple(steps)


def _form_field(request: ProxyRequest, name: str, required: bool) -> str | None:
    where = f"the form field '{name}'"
    media_type = request.media_type
    if media_type == "application/x-www-form-urlencoded":
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise Problem("body-invalid", 400, "the form body is not valid UTF-8") from None
        values = parse_qs(text, keep_blank_values=True).get(name)
        return _single(values, where, required)
    if media_type == "multipart/form-data":
        from proxy.multipart import form_values

        return _single(form_values(request, name), where, required)
    raise Problem(
        "unsupported-media-type",
        415,
        f"send a form ({' or '.join(FORM_TYPES)}); the key is read from {where}",
    )


def extract(
    request: ProxyRequest, spec: KeySpec, params: dict[str, str], required: bool
) -> str | None:
    """The validated key for this request, None when optional and absent.

    Raises `Problem` (400 key-missing / key-invalid, 415, 400 body-invalid).
    """
    if spec.parts is not None:
        return _composite(request, spec.parts, params, required)
    return _one(request, spec, params, required)


def _one(
    request: ProxyRequest, spec: KeySpec, params: dict[str, str], required: bool, part: str = ""
) -> str | None:
    name = spec.target
    try:
        if spec.source == "header":
            lines = request.header_values(name.lower().encode("latin-1"))
            if not lines:
                if required:
                    raise key_missing(f"the {name} header")
                return None
            return parse_header(lines)
        if spec.source == "json":
            key = _json_field(request, name, required)
        elif spec.source == "form":
            key = _form_field(request, name, required)
        elif spec.source == "xml":
            key = xmlkeys.key_at(request, _xml_path(spec), required)
        elif spec.source == "query":
            try:
                query = request.query_string.decode("utf-8")
            except UnicodeDecodeError:
                raise key_invalid("the query string is not valid UTF-8") from None
            values = parse_qs(query, keep_blank_values=True).get(name)
            key = _single(values, f"the query parameter '{name}'", required)
        else:
            key = _single(
                [params[name]] if name in params else None,
                f"the path parameter '{name}'",
                required,
            )
        return None if key is None else validate(key)
    except Problem as problem:
        if part and problem.detail:
            problem.detail += f" ({part})"
        raise


def _composite(
    request: ProxyRequest, parts: tuple[KeySpec, ...], params: dict[str, str], required: bool
) -> str | None:
    """Each part by its own source's rules, joined so that no two lists of parts (and no
    single key) give the same string: `a|bc` and `ab|c` stay two keys."""
    values: list[str | None] = []
    for index, spec in enumerate(parts, 1):
        label = f"key part {index} of {len(parts)}"
        values.append(_one(request, spec, params, required, label))
    present = [value for value in values if value is not None]
    if not present:
        return None  # optional route, no part at all: forwarded without a record
    if len(present) < len(values):
        # Half a key names no operation: refuse it rather than guess, even when optional.
        index = values.index(None)
        _one(request, parts[index], params, True, f"key part {index + 1} of {len(parts)}")
        raise key_invalid(f"key part {index + 1} of {len(parts)} is empty")
    return join_parts(present)


def join_parts(parts: list[str]) -> str:
    """The composite key: length-prefixed parts behind a control character that no single
    key may contain, so it can never equal a single key nor another list of parts."""
    return COMPOSITE_MARK + "".join(f"{len(part)}:{part}" for part in parts)


@functools.lru_cache(maxsize=256)
def _compiled(path: str, namespaces: tuple[tuple[str, str | tuple[str, ...]], ...]) -> Any:
    return xmlkeys.compile_path(path, dict(namespaces))


def _xml_path(spec: KeySpec) -> xmlkeys.XmlPath:
    # Compiled (and checked) at start-up by the config; cached here for the hot path.
    namespaces = tuple(sorted((spec.namespaces or {}).items()))
    path: xmlkeys.XmlPath = _compiled(spec.path or "", namespaces)
    return path


def scope(tenant: str, namespace: str, key: str) -> ScopedKey:
    """The record's storage key: tenant + namespace + key, hashed, in a hash tag."""
    material = f"{len(tenant)}:{tenant}|{len(namespace)}:{namespace}|{key}".encode()
    digest = hashlib.sha256(material).hexdigest()
    return ScopedKey(storage_key=f"idem:{{{digest[:32]}}}", log_hash=digest[:12])
