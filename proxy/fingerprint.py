"""The canonical fingerprint of a request: what 'the same request' means.

sha256 over method, path, query (sorted by parameter name, repeated parameters in
their order), media type and body. Path and query are the bytes the backend gets, not
a decoding of them: backends decode differently (`%2F` is not `/` to a router on the
raw path, `;` separates parameters to some query parsers), so two targets whose bytes
differ are two requests, beyond the order of parameters and RFC 3986 equivalences
(escaped unreserved characters). A JSON body is canonicalised
(parsed, keys sorted, compact) so whitespace and key order do not make a retry look like a
different payment; an XML body likewise (C14N 2.0, see proxy.xmlkeys for what is
and is not made equal). A JSON body the canonical form cannot hold exactly (NaN,
Infinity, 1e400: not finite numbers) is fingerprinted by its raw bytes instead.
Only the digest is ever stored: request bodies may carry card data.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import orjson

from proxy import xmlkeys
from proxy.request import InvalidJSON, ProxyRequest, is_json
from proxy.xmlkeys import is_xml


def canonical_json(value: Any) -> bytes:
    """Compact JSON with sorted keys; the same document always gives the same bytes."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # Integers wider than 64 bits, or a lone surrogate escape ("\udc00", which the
        # standard library's parser accepts): the standard library keeps them exact, and
        # surrogatepass gives a lone surrogate bytes no real character has.
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.encode("utf-8", "surrogatepass")


def canonical_query(query_string: bytes) -> bytes:
    if not query_string:
        return b""
    # Never percent-decoded (beyond escapes of unreserved characters, as the path):
    # decoding would make `;` and `%3B`, or `+` and `%20`, one request. Some parsers
    # split on `;` as well as `&`, so with a `;` in it the order is kept as sent:
    # `x=1;a=1&a=2` and `a=2&x=1;a=1` are another `a` to them.
    if b";" in query_string:
        return _ESCAPE.sub(_unescape_unreserved, query_string)
    # Sorted by name only (a stable sort): the values of a repeated parameter keep their
    # order, because a last-wins backend reads `amount=100&amount=1` as another amount.
    # Empty segments are nothing to any parser.
    pairs = [_ESCAPE.sub(_unescape_unreserved, pair) for pair in query_string.split(b"&") if pair]
    ordered = sorted(pairs, key=_name)
    return b"&".join(ordered)


def _name(pair: bytes) -> bytes:
    return pair.split(b"=", 1)[0]


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _unescape_unreserved(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + match.group(1).upper()


def canonical_path(request: ProxyRequest) -> bytes:
    """The path as the backend gets it, normalised only where RFC 3986 says two spellings
    are the same (escaped unreserved characters, the case of an escape's hex digits).

    Not the server's decoded path: it turns every byte that is not UTF-8 (`%FF`, `%FE`)
    into U+FFFD and `%2F` into `/`, which would make different requests look alike.
    """
    if not request.raw_path:
        return request.path.encode("utf-8", "surrogateescape")
    return _ESCAPE.sub(_unescape_unreserved, request.raw_path)


def canonical_body(request: ProxyRequest, media_type: str) -> bytes:
    if request.body and is_json(media_type):
        try:
            return canonical_json(request.json())
        except (InvalidJSON, RecursionError):
            # Too deep to re-encode (orjson stops at 255 levels, json at the stack): the
            # raw bytes still tell different requests apart.
            pass
    elif request.body and is_xml(media_type):
        # Unusable XML (malformed, a DTD) keeps its raw bytes, as unusable JSON does. Each
        # form is tagged: the canonical form is not itself well-formed XML (`xmlns:n0=""`),
        # so a body made of another body's canonical bytes would otherwise share its print.
        xml = xmlkeys.canonical(request)
        return b"c" + xml if xml is not None else b"r" + request.body
    return request.body


def fingerprint(request: ProxyRequest) -> str:
    media_type = request.media_type
    digest = hashlib.sha256()
    for part in (
        request.method.encode("ascii"),
        canonical_path(request),
        canonical_query(request.query_string),
        media_type.encode("latin-1"),
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(canonical_body(request, media_type))
    return digest.hexdigest()
