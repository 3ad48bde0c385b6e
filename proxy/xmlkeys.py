"""XML and SOAP bodies: the key at a namespaced path, and the canonical form for the fingerprint.

Bodies are parsed once per request by defusedxml's parser with DTDs forbidden, so no entity is
ever declared, expanded or fetched: a billion-laughs or external-entity body fails at its
DOCTYPE, before any expansion. Nesting is capped. The same pass feeds a tree (for the key) and
a C14N 2.0 writer (for the fingerprint), so a body is never parsed twice.

What the canonical form makes equal: whitespace-only text between elements, leading and
trailing whitespace of text, attribute order and quoting, namespace prefix spelling (also a
default namespace versus a prefix), empty-element spelling, CDATA versus escaped text,
character references, comments, the XML declaration and the document's encoding.
What it keeps distinct: any other text (amounts, ids), element order, attribute values, the
namespace an `xsi:type` names (its prefix is resolved), and prefixes that appear inside text
or other attribute values (compared as written; the namespace they are bound to is not).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from proxy import problems
from proxy.problems import key_invalid, key_missing
from proxy.request import ProxyRequest

# Deeper than any envelope a payment API sends; a bound on the parser's stacks.
MAX_DEPTH = 64
# Elements plus attributes. Each costs Python-level work (tree, canonical writer): a
# megabyte of `<a/>` would be over a second of CPU; this bound keeps the worst body
# to tens of milliseconds, far above any payment envelope's few dozen nodes.
MAX_NODES = 10_000
# Namespace declarations in scope at once. The canonical writer looks each name up among
# them, so its cost is nodes times this: 9,000 namespaced attributes on one element were
# 17 s of CPU. A payment envelope declares a handful; siblings may each redeclare theirs.
MAX_NAMESPACES = 64
# The standard attribute whose value is a QName: its prefix is resolved, so that
# `p:Card` with p bound to two different URIs is two different requests.
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"

XML_MEDIA_TYPES = ("text/xml", "application/xml", "application/soap+xml")


def is_xml(media_type: str) -> bool:
    return media_type in XML_MEDIA_TYPES or media_type.endswith("+xml")


# --------------------------------------------------------------------------- paths

_NAME = r"[A-Za-z_][\w.\-]*"
_STEP = re.compile(rf"^(?:({_NAME}):)?({_NAME})(?:\[([1-9]\d{{0,5}})\])?$")
_ATTRIBUTE = re.compile(rf"^@(?:({_NAME}):)?({_NAME})$")


@dataclass(frozen=True, slots=True)
class Step:
    """One element step: the names it matches (Clark notation, `{uri}local`) and, when the
    path gives one, its 1-based position among its siblings of that name."""

    names: frozenset[str]
    index: int | None


@dataclass(frozen=True, slots=True)
class XmlPath:
    """A compiled key path: element steps from the root, then maybe one attribute."""

    text: str
    steps: tuple[Step, ...]
    attribute: frozenset[str] | None


def _uris(prefix: str | None, namespaces: Mapping[str, str | Sequence[str]]) -> list[str]:
    if prefix is None:
        return [""]  # an unprefixed name is in no namespace, as in XPath
    if prefix not in namespaces:
        raise ValueError(f"the prefix {prefix!r} is not declared in 'namespaces'")
    declared = namespaces[prefix]
    uris = [declared] if isinstance(declared, str) else list(declared)
    if not uris or not all(isinstance(u, str) and u for u in uris):
        raise ValueError(f"namespaces.{prefix} must be a URI or a list of URIs")
    return uris


def _clark(uri: str, local: str) -> str:
    return f"{{{uri}}}{local}" if uri else local


def compile_path(path: str, namespaces: Mapping[str, str | Sequence[str]]) -> XmlPath:
    """Compile `/soap:Envelope/soap:Body/p:Pay/p:OrderId` (or `.../p:Order/@id`, or with a
    position, `p:Item[2]`); ValueError with a one-line reason when it is not one."""
    if not path.startswith("/") or path.startswith("//"):
        raise ValueError(f"{path!r} must be an absolute path from the root element, '/a/b'")
    raw_steps = path[1:].split("/")
    attribute: frozenset[str] | None = None
    if raw_steps and raw_steps[-1].startswith("@"):
        found = _ATTRIBUTE.match(raw_steps.pop())
        if found is None:
            raise ValueError(f"{path!r}: the attribute step must be '@name' or '@prefix:name'")
        prefix, local = found.groups()
        attribute = frozenset(_clark(uri, local) for uri in _uris(prefix, namespaces))
    if not raw_steps:
        raise ValueError(f"{path!r} names no element")
    steps: list[Step] = []
    for raw in raw_steps:
        found = _STEP.match(raw)
        if found is None:
            raise ValueError(
                f"{path!r}: {raw!r} is not an element step ('name', 'prefix:name' or 'name[2]')"
            )
        prefix, local, index = found.groups()
        names = frozenset(_clark(uri, local) for uri in _uris(prefix, namespaces))
        steps.append(Step(names, int(index) if index else None))
    return XmlPath(path, tuple(steps), attribute)


# --------------------------------------------------------------------------- parsing


class XmlRefused(ValueError):
    """The body cannot be used as XML: malformed, declares a DTD or entities, or too deep."""


class _Tee:
    """Parser target feeding the tree builder and the canonical writer from one pass."""

    def __init__(self) -> None:
        self.tree = ET.TreeBuilder()
        self.out: list[str] = []
        self.c14n = ET.C14NWriterTarget(
            self.out.append,
            strip_text=True,
            rewrite_prefixes=True,
            qname_aware_attrs={_XSI_TYPE},
        )
        self.depth = 0
        self.nodes = 0
        # Declarations in scope: those of the next element, and per open element its own.
        self.namespaces = 0
        self.declared = 0
        self.declared_stack: list[int] = []

    def start_ns(self, prefix: str, uri: str) -> None:
        self.declared += 1
        self.namespaces += 1
        if self.namespaces > MAX_NAMESPACES:
            raise XmlRefused(
                f"the XML body has more than {MAX_NAMESPACES} namespace declarations in scope"
            )
        self.c14n.start_ns(prefix, uri)

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise XmlRefused(f"the XML body is nested deeper than {MAX_DEPTH} levels")
        self.nodes += 1 + len(attrs)
        if self.nodes > MAX_NODES:
            raise XmlRefused(f"the XML body has more than {MAX_NODES} elements and attributes")
        self.declared_stack.append(self.declared)
        self.declared = 0
        self.tree.start(tag, attrs)
        self.c14n.start(tag, attrs)

    def end(self, tag: str) -> None:
        self.depth -= 1
        self.namespaces -= self.declared_stack.pop()
        self.tree.end(tag)
        self.c14n.end(tag)

    def data(self, text: str) -> None:
        self.tree.data(text)
        self.c14n.data(text)

    def pi(self, target: str, data: str | None = None) -> None:
        self.c14n.pi(target, data or "")

    def close(self) -> ET.Element:
        return self.tree.close()


@dataclass(frozen=True, slots=True)
class ParsedXml:
    root: ET.Element
    canonical: bytes


def parse(body: bytes, charset: str | None = None) -> ParsedXml:
    """Parse with DTDs, entity declarations and external references forbidden.

    `charset` is the Content-Type's parameter, which overrides the document's own
    declaration (RFC 7303); without it the declaration, BOM or UTF-8 applies.
    """
    tee = _Tee()
    try:
        parser = DefusedXMLParser(
            target=tee,
            encoding=charset,
            forbid_dtd=True,
            forbid_entities=True,
            forbid_external=True,
        )
    except (ValueError, LookupError):
        raise XmlRefused("the Content-Type names an unknown charset") from None
    try:
        parser.feed(body)
        root = parser.close()
    except XmlRefused:
        raise
    except DefusedXmlException:
        raise XmlRefused("XML bodies that declare a DTD or entities are refused") from None
    except (ET.ParseError, ValueError, LookupError, TypeError):
        raise XmlRefused("the body is not well-formed XML") from None
    if not isinstance(root, ET.Element):
        raise XmlRefused("the body is not well-formed XML")
    return ParsedXml(root, "".join(tee.out).encode("utf-8"))


def parsed(request: ProxyRequest) -> ParsedXml:
    """The request's body parsed (or the reason it cannot be), at most once per request."""
    cached: Any = request._xml
    if cached is None:
        try:
            cached = parse(request.body, _charset(request.header(b"content-type")))
        except XmlRefused as exc:
            cached = exc
        request._xml = cached
    if isinstance(cached, XmlRefused):
        raise cached
    result: ParsedXml = cached
    return result


# One `; name=value` parameter, the value a token or a quoted string (which may itself
# hold `;charset=`: SOAP 1.2's `action="..."` is one).
_PARAMETER = re.compile(rb'\s*;\s*([^\s;=]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_CHARSET_NAME = re.compile(rb"[A-Za-z0-9._:-]+")


def _charset(content_type: bytes | None) -> str | None:
    """The Content-Type's charset parameter, read parameter by parameter from the left."""
    value = content_type or b""
    position = value.find(b";")
    while position >= 0:
        found = _PARAMETER.match(value, position)
        if found is None:  # a stray `;` or a bare word: skip to the next parameter
            position = value.find(b";", position + 1)
            continue
        name, raw = found.groups()
        if name.lower() == b"charset":
            charset = raw.strip().strip(b'"')
            return charset.decode("ascii") if _CHARSET_NAME.fullmatch(charset) else None
        position = found.end()
    return None


def canonical(request: ProxyRequest) -> bytes | None:
    """The body's canonical bytes for the fingerprint, None when it is not usable XML."""
    try:
        return parsed(request).canonical
    except XmlRefused:
        return None


# --------------------------------------------------------------------------- the key


def _select(root: ET.Element, steps: Sequence[Step]) -> list[ET.Element]:
    first = steps[0]
    if root.tag not in first.names or (first.index or 1) != 1:
        return []
    nodes = [root]
    for step in steps[1:]:
        found: list[ET.Element] = []
        for node in nodes:
            children = [child for child in node if child.tag in step.names]
            if step.index is None:
                found += children
            elif step.index <= len(children):
                found.append(children[step.index - 1])
        nodes = found
    return nodes


def key_at(request: ProxyRequest, path: XmlPath, required: bool) -> str | None:
    """The text (or attribute) at `path`, without surrounding XML whitespace; None when
    optional and absent.

    Raises `Problem`: 415 when the body is not XML, 400 body-invalid when it cannot be
    parsed safely, 400 key-missing / key-invalid.
    """
    where = f"the XML element '{path.text}'"
    if not is_xml(request.media_type):
        raise problems.unsupported_media_type(
            f"send Content-Type: {' or '.join(XML_MEDIA_TYPES)}; the key is read from {where}"
        )
    try:
        document = parsed(request)
    except XmlRefused as exc:
        raise problems.body_invalid(f"{exc}; the key is read from {where}") from None
    nodes = _select(document.root, path.steps)
    if path.attribute is not None:
        values = [
            value for node in nodes for name, value in node.attrib.items() if name in path.attribute
        ]
    else:
        values = []
        for node in nodes:
            if len(node):
                raise key_invalid(f"{where} has child elements; the key must be its text")
            values.append(node.text or "")
    if not values:
        if required:
            raise key_missing(where)
        return None
    if len(values) > 1:
        # Like a key from a JSON list: the first of several would depend on element order.
        raise key_invalid(f"{where} occurs more than once; name one with a position, [1]")
    # XML's whitespace only: a no-break space is part of the value the backend reads.
    return values[0].strip(" \t\r\n")
