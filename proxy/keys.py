"""Where the idempotency key comes from, whether it is well formed, and whose it is.

The scoped key is a hash of tenant, route namespace and key, wrapped in a Redis
Cluster hash tag: raw client bytes never become Redis key names, and every key
of one record lands in one slot.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from proxy import problems, xmlkeys
from proxy.config import KeySpec
from proxy.problems import Problem, key_invalid, key_missing
from proxy.request import InvalidJSON, ProxyRequest, is_json

MAX_KEY_LENGTH = 255
# The one tenant of a deployment without a tenant header (the record names it had before
# tenants were configurable stay the same).
DEFAULT_TENANT = "default"

# Leads every composite key; validate() refuses control characters in a single key.
COMPOSITE_MARK = "\x1e"

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True, slots=True)
class ScopedKey:
    """The store's name for one record, and (computed only when a log line needs it) the
    keyed hash that is safe to log."""

    storage_key: str
    digest: bytes = field(repr=False)
    hasher: KeyHasher = field(repr=False, compare=False)

    @property
    def log_hash(self) -> str:
        return self.hasher.permute(self.digest).hex()


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
    """One key from the key header's lines (`Idempotency-Key` or a route's own header):
    an sf-string (`"abc"`) or bare (`abc`).

    Both forms name the same key; parameters after `;` are ignored; two header
    lines or a comma list are several keys and rejected.
    """
    if len(values) > 1:
        raise key_invalid("the key header was sent more than once; send exactly one")
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
        raise problems.unsupported_media_type(
            f"send Content-Type: application/json; the key is read from {where}"
        )
    try:
        node: Any = request.json()
    except InvalidJSON:
        raise problems.body_invalid(
            f"the body is not valid JSON; the key is read from {where}"
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
            raise problems.body_invalid("the form body is not valid UTF-8") from None
        values = parse_qs(text, keep_blank_values=True).get(name)
        return _single(values, where, required)
    if media_type == "multipart/form-data":
        from proxy.multipart import form_values

        return _single(form_values(request, name), where, required)
    raise problems.unsupported_media_type(
        f"send a form ({' or '.join(FORM_TYPES)}); the key is read from {where}"
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


_STORAGE_KEY = re.compile(r"idem:\{([0-9a-f]{32})\}")
_LOG_HASH = re.compile(r"[0-9a-f]{32}")
_ROUNDS = 4


class KeyHasher:
    """Storage keys, and the `key_hash` the logs show, under a deployment secret.

    The storage key is an unkeyed hash (records must survive a change of secret). The log
    hash is that storage digest through a keyed permutation: a four-round Feistel network
    whose round function is HMAC-SHA256 under the secret. Without the secret nobody can
    test a guessed key (`ord-73519`) against a log line; with it, `records show --hash`
    inverts the permutation and finds the record directly, with no scan of the store.
    """

    __slots__ = ("_rounds", "keyed")

    def __init__(self, secret: str | bytes | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self.keyed = bool(secret)
        # One HMAC per round, keyed once here and copied per use: copying a keyed HMAC
        # is several times cheaper than keying one per call (the log line pays for it).
        self._rounds = [
            hmac.new(
                hmac.digest(secret or b"", b"idempotency-proxy key_hash round %d" % i, "sha256"),
                digestmod=hashlib.sha256,
            )
            for i in range(_ROUNDS)
        ]

    def _round(self, i: int, half: int) -> int:
        mac = self._rounds[i].copy()
        mac.update(half.to_bytes(8, "big"))
        return int.from_bytes(mac.digest()[:8], "big")

    def permute(self, block: bytes) -> bytes:
        left, right = int.from_bytes(block[:8], "big"), int.from_bytes(block[8:], "big")
        for i in range(_ROUNDS):
            left, right = right, left ^ self._round(i, right)
        return left.to_bytes(8, "big") + right.to_bytes(8, "big")

    def _unpermute(self, block: bytes) -> bytes:
        left, right = int.from_bytes(block[:8], "big"), int.from_bytes(block[8:], "big")
        for i in reversed(range(_ROUNDS)):
            left, right = right ^ self._round(i, left), left
        return left.to_bytes(8, "big") + right.to_bytes(8, "big")

    def scope(self, tenant: str | None, namespace: str, key: str) -> ScopedKey:
        """The record's storage key: tenant + namespace + key, hashed, in a hash tag.

        `None` is the caller without a tenant (the tenant header is configured but was not
        sent): its own scope, which no header value can name, since every named tenant is
        length-prefixed and so starts with a digit.
        """
        owner = "-" if tenant is None else f"{len(tenant)}:{tenant}"
        material = f"{owner}|{len(namespace)}:{namespace}|{key}".encode()
        digest = hashlib.sha256(material).digest()[:16]
        return ScopedKey(f"idem:{{{digest.hex()}}}", digest, self)

    def log_hash(self, storage_key: str) -> str:
        """The `key_hash` the logs show for a record."""
        match = _STORAGE_KEY.fullmatch(storage_key)
        if match is None:
            raise ValueError("not a record's storage key")
        return self.permute(bytes.fromhex(match.group(1))).hex()

    def storage_key(self, log_hash: str) -> str:
        """The record a log line's `key_hash` names (under the same secret)."""
        if _LOG_HASH.fullmatch(log_hash) is None:
            raise ValueError("a key_hash is 32 lower-case hex digits")
        return f"idem:{{{self._unpermute(bytes.fromhex(log_hash)).hex()}}}"


_UNKEYED = KeyHasher()


def scope(tenant: str | None, namespace: str, key: str) -> ScopedKey:
    """The scoped key without a key-hash secret (storage keys never depend on the secret)."""
    return _UNKEYED.scope(tenant, namespace, key)
