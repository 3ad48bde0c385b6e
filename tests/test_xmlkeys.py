"""Keys where legacy APIs keep them: XML/SOAP bodies and composite keys (unit level).

A key read from the wrong element, a hostile body that the parser expands, or two
composite keys that join to the same string are each a double charge (or a leak)
waiting to happen. These build `ProxyRequest` objects and call `proxy.keys`,
`proxy.xmlkeys`, `proxy.fingerprint` and the config directly.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from harness import proxy_request

from proxy import xmlkeys
from proxy.config import ConfigError, KeySpec, Settings, load_settings
from proxy.fingerprint import fingerprint
from proxy.keys import COMPOSITE_MARK, extract, join_parts, validate
from proxy.problems import Problem
from proxy.routes import RouteTable
from sample_backend.soap import PAYMENTS_NS, SOAP11_NS, SOAP12_NS, pay_envelope

NAMESPACES = {"soap": [SOAP11_NS, SOAP12_NS], "p": PAYMENTS_NS}
ORDER_PATH = "/soap:Envelope/soap:Body/p:Pay/p:OrderId"
XML_SPEC = KeySpec.model_validate({"from": "xml", "path": ORDER_PATH, "namespaces": NAMESPACES})

BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'.encode()
        for i in range(1, 10)
    )
    + b"]><lolz>&lol9;</lolz>"
)
HOSTILE = {
    "billion-laughs": BILLION_LAUGHS,
    "external-entity": (
        b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><p>&xxe;</p>'
    ),
    "external-dtd": b'<!DOCTYPE p SYSTEM "http://127.0.0.1:9/evil.dtd"><p/>',
    "parameter-entity": (b'<!DOCTYPE p [<!ENTITY % x SYSTEM "file:///etc/passwd"> %x;]><p/>'),
    "undeclared-entity": b"<p>&xxe;</p>",
    "too-deep": b"<a>" * (xmlkeys.MAX_DEPTH + 1) + b"</a>" * (xmlkeys.MAX_DEPTH + 1),
    # A megabyte of tiny elements would cost over a second of CPU to walk in full.
    "too-many-elements": b"<r>" + b"<a/>" * 250_000 + b"</r>",
    "too-many-attributes": b"<r " + b" ".join(b"a%d='1'" % i for i in range(20_000)) + b"/>",
    "malformed": b"<soap:Envelope><p:Pay>",
    "two-roots": b"<a/><b/>",
    "unknown-encoding": b'<?xml version="1.0" encoding="x-nope"?><a/>',
    "not-xml": b'{"order_id": "42"}',
}


def _xml(body: bytes, content_type: str = "text/xml; charset=utf-8") -> Any:
    return proxy_request(body=body, content_type=content_type, path="/soap/payments")


def _problem(exc: pytest.ExceptionInfo[Problem], name: str, status: int) -> Problem:
    assert exc.value.name == name, exc.value.detail
    assert exc.value.status == status
    return exc.value


# --------------------------------------------------------------------------- XML keys


@pytest.mark.parametrize("soap12", [False, True], ids=["soap11", "soap12"])
@pytest.mark.parametrize(
    "content_type", ["text/xml", "application/xml", "application/soap+xml; charset=utf-8"]
)
def test_xml_key_from_a_soap_envelope(soap12: bool, content_type: str) -> None:
    request = _xml(pay_envelope("ord-42", 1250, soap12=soap12, pretty=True), content_type)
    assert extract(request, XML_SPEC, {}, required=True) == "ord-42"


def test_xml_key_ignores_prefix_spelling_and_default_namespaces() -> None:
    body = (
        f'<Envelope xmlns="{SOAP11_NS}"><Body><x:Pay xmlns:x="{PAYMENTS_NS}">'
        "<x:OrderId>\n  ord-7\n</x:OrderId></x:Pay></Body></Envelope>"
    ).encode()
    assert extract(_xml(body), XML_SPEC, {}, required=True) == "ord-7"


def test_xml_key_from_an_attribute_and_a_position() -> None:
    spec = KeySpec.model_validate(
        {"from": "xml", "path": "/o:Orders/o:Order[2]/@id", "namespaces": {"o": "urn:o"}}
    )
    body = b'<Orders xmlns="urn:o"><Order id="first"/><Order id="second"/></Orders>'
    assert extract(_xml(body), spec, {}, required=True) == "second"


def test_xml_key_of_another_namespace_is_missing() -> None:
    body = pay_envelope("ord-1", 10).replace(PAYMENTS_NS.encode(), b"urn:someone-else")
    with pytest.raises(Problem) as exc:
        extract(_xml(body), XML_SPEC, {}, required=True)
    problem = _problem(exc, "key-missing", 400)
    assert ORDER_PATH in (problem.detail or "")
    assert extract(_xml(body), XML_SPEC, {}, required=False) is None


@pytest.mark.parametrize(
    ("body", "name"),
    [
        pytest.param(
            pay_envelope("a", 1).replace(b"</p:Pay>", b"<p:OrderId>b</p:OrderId></p:Pay>"),
            "key-invalid",
            id="twice",
        ),
        pytest.param(
            pay_envelope("a", 1).replace(b"<p:OrderId>a", b"<p:OrderId><p:X>a</p:X>"),
            "key-invalid",
            id="child-elements",
        ),
        pytest.param(pay_envelope("   ", 1), "key-invalid", id="blank"),
    ],
)
def test_ambiguous_or_empty_xml_key_is_refused(body: bytes, name: str) -> None:
    with pytest.raises(Problem) as exc:
        extract(_xml(body), XML_SPEC, {}, required=True)
    _problem(exc, name, 400)


def test_xml_key_needs_an_xml_media_type() -> None:
    with pytest.raises(Problem) as exc:
        extract(_xml(pay_envelope("a", 1), "application/json"), XML_SPEC, {}, required=True)
    _problem(exc, "unsupported-media-type", 415)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_xml_is_a_400_quickly_and_reads_nothing(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(Problem) as exc:
        # No charset parameter: the document's own declaration (x-nope) must be honoured.
        extract(_xml(HOSTILE[name], "text/xml"), XML_SPEC, {}, required=True)
    assert time.monotonic() - started < 1.0
    problem = _problem(exc, "body-invalid", 400)
    assert "root:" not in (problem.detail or "")
    assert "lol" not in (problem.detail or "")
    # The fingerprint falls back to the raw bytes, as for unusable JSON; it never expands.
    assert xmlkeys.canonical(_xml(HOSTILE[name], "text/xml")) is None


# --------------------------------------------------------------------------- XML fingerprint


def _fp(body: bytes, content_type: str = "text/xml") -> str:
    return fingerprint(_xml(body, content_type))


SAME_AS_COMPACT = {
    "pretty": pay_envelope("ord-9", 1250, pretty=True),
    "declaration": b'<?xml version="1.0" encoding="utf-8"?>\n' + pay_envelope("ord-9", 1250),
    "latin-1": (b'<?xml version="1.0" encoding="ISO-8859-1"?>' + pay_envelope("ord-9", 1250)),
    "prefixes": pay_envelope("ord-9", 1250)
    .replace(b"soap:", b"s:")
    .replace(b"xmlns:soap", b"xmlns:s")
    .replace(b"<p:", b"<pay:")
    .replace(b"</p:", b"</pay:")
    .replace(b"xmlns:p=", b"xmlns:pay="),
    "default-namespace": (
        f'<Envelope xmlns="{SOAP11_NS}"><Body><Pay xmlns="{PAYMENTS_NS}"><OrderId>ord-9'
        "</OrderId><Amount>1250</Amount><Currency>EUR</Currency></Pay></Body></Envelope>"
    ).encode(),
    "comment-and-cdata": pay_envelope("ord-9", 1250)
    .replace(b"<p:Pay>", b"<p:Pay><!-- retry -->")
    .replace(b"1250", b"<![CDATA[1250]]>"),
    "padded-text": pay_envelope("ord-9", 1250).replace(b"1250", b"\n   1250  \n"),
    "empty-element-spelling": pay_envelope("ord-9", 1250).replace(
        b"</soap:Body>", b"<p:Note></p:Note></soap:Body>"
    ),
}


@pytest.mark.parametrize("variant", sorted(SAME_AS_COMPACT))
def test_insignificant_xml_differences_are_the_same_request(variant: str) -> None:
    compact = pay_envelope("ord-9", 1250)
    if variant == "empty-element-spelling":
        compact = compact.replace(b"</soap:Body>", b"<p:Note/></soap:Body>")
    assert _fp(SAME_AS_COMPACT[variant]) == _fp(compact)


def test_attribute_order_and_quotes_are_insignificant() -> None:
    a = b"<r xmlns:x='urn:x'><e x:b='2' a=\"1\">t</e></r>"
    b = b'<r xmlns:y="urn:x"><e a="1" y:b="2">t</e></r>'
    assert _fp(a) == _fp(b)


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param(pay_envelope("ord-9", 1251), id="amount"),
        pytest.param(pay_envelope("ord-9", 1250, "USD"), id="currency"),
        pytest.param(pay_envelope("ord-9", 1250, soap12=True), id="soap-version"),
        pytest.param(
            pay_envelope("ord-9", 1250).replace(b"<p:Pay>", b'<p:Pay mode="test">'),
            id="new-attribute",
        ),
        pytest.param(
            pay_envelope("ord-9", 1250).replace(b"1250", b"12 50"),
            id="inner-whitespace",
        ),
    ],
)
def test_a_changed_xml_payment_is_a_different_request(changed: bytes) -> None:
    assert _fp(changed) != _fp(pay_envelope("ord-9", 1250))


def test_the_content_type_charset_overrides_the_default() -> None:
    # RFC 7303: the charset parameter is authoritative; without one, UTF-8 (or the declaration).
    latin = pay_envelope("ord-\u00e9", 5).decode().encode("latin-1")
    utf8 = pay_envelope("ord-\u00e9", 5)
    assert _fp(latin, "text/xml; charset=ISO-8859-1") == _fp(utf8, "text/xml; charset=utf-8")
    assert xmlkeys.canonical(_xml(latin, "text/xml")) is None  # not UTF-8: unusable


def test_unusable_xml_fingerprints_its_raw_bytes() -> None:
    assert _fp(b"<a>") != _fp(b"<a >")
    assert _fp(HOSTILE["billion-laughs"]) == _fp(HOSTILE["billion-laughs"])


# --------------------------------------------------------------------------- composite keys

COMPOSITE = KeySpec.model_validate(
    {
        "parts": [
            {"from": "header", "name": "X-Merchant-Id"},
            {"from": "json", "field": "order_no"},
        ]
    }
)


def _composite(merchant: str | None, order: Any, spec: KeySpec = COMPOSITE) -> Any:
    headers = [(b"x-merchant-id", merchant.encode())] if merchant is not None else []
    body = b"{}" if order is None else f'{{"order_no": {order!r}}}'.replace("'", '"').encode()
    return proxy_request(body=body, content_type="application/json", headers=headers)


def test_composite_key_is_built_from_every_part_in_order() -> None:
    key = extract(_composite("m-1", "o-1"), COMPOSITE, {}, required=True)
    assert key == join_parts(["m-1", "o-1"])
    assert key != extract(_composite("o-1", "m-1"), COMPOSITE, {}, required=True)


def test_composite_join_is_unambiguous() -> None:
    first = extract(_composite("a", "bc"), COMPOSITE, {}, required=True)
    second = extract(_composite("ab", "c"), COMPOSITE, {}, required=True)
    assert first != second
    assert join_parts(["a|b", "c"]) != join_parts(["a", "b|c"])
    assert join_parts(["1:a", "b"]) != join_parts(["1", "a1:b"])


def test_a_composite_key_is_never_a_single_key() -> None:
    key = join_parts(["a", "b"])
    assert key.startswith(COMPOSITE_MARK)
    with pytest.raises(Problem):
        validate(key)  # no header, field or parameter can spell it


@pytest.mark.parametrize(
    ("merchant", "order", "missing"),
    [("m-1", None, "order_no"), (None, "o-secret", "X-Merchant-Id")],
)
def test_missing_part_on_a_required_route_names_the_part_not_the_values(
    merchant: str | None, order: str | None, missing: str
) -> None:
    with pytest.raises(Problem) as exc:
        extract(_composite(merchant, order), COMPOSITE, {}, required=True)
    problem = _problem(exc, "key-missing", 400)
    detail = problem.detail or ""
    assert missing in detail
    assert "part" in detail
    assert "m-1" not in detail and "o-secret" not in detail


def test_optional_composite_key_all_or_nothing() -> None:
    assert extract(_composite(None, None), COMPOSITE, {}, required=False) is None
    with pytest.raises(Problem) as exc:
        extract(_composite("m-1", None), COMPOSITE, {}, required=False)
    _problem(exc, "key-missing", 400)


def test_each_part_follows_its_sources_rules() -> None:
    with pytest.raises(Problem) as exc:
        extract(_composite('"unterminated', "o-1"), COMPOSITE, {}, required=True)
    _problem(exc, "key-invalid", 400)
    # The header's sf-string form and the bare form are one key inside a composite too.
    assert extract(_composite('"m-1"', "o-1"), COMPOSITE, {}, required=True) == extract(
        _composite("m-1", "o-1"), COMPOSITE, {}, required=True
    )
    with pytest.raises(Problem) as exc:
        extract(_composite("m-1", "x" * 256), COMPOSITE, {}, required=True)
    _problem(exc, "key-invalid", 400)


def test_composite_of_two_form_fields_and_of_xml_with_a_path_parameter() -> None:
    spec = KeySpec.model_validate(
        {"parts": [{"from": "form", "field": "merchant"}, {"from": "form", "field": "order"}]}
    )
    request = proxy_request(
        body=b"order=o-1&merchant=m-1", content_type="application/x-www-form-urlencoded"
    )
    assert extract(request, spec, {}, required=True) == join_parts(["m-1", "o-1"])
    mixed = KeySpec.model_validate(
        {"parts": [{"from": "path", "name": "merchant"}, XML_SPEC.model_dump(by_alias=True)]}
    )
    key = extract(_xml(pay_envelope("ord-1", 5)), mixed, {"merchant": "m-2"}, required=True)
    assert key == join_parts(["m-2", "ord-1"])


def test_natural_keys_stay_per_route() -> None:
    assert not KeySpec.model_validate({"from": "header"}).natural
    assert XML_SPEC.natural
    assert COMPOSITE.natural  # one natural part makes the whole key natural
    both_headers = KeySpec.model_validate(
        {"parts": [{"from": "header", "name": "A"}, {"from": "header", "name": "B"}]}
    )
    assert not both_headers.natural


# --------------------------------------------------------------------------- config


def _route(key: Any, path: str = "/soap/payments") -> dict[str, Any]:
    return {"routes": [{"name": "pay", "path": path, "key": key}]}


def test_list_form_is_a_composite_key() -> None:
    settings = Settings.model_validate(
        _route([{"from": "header", "name": "X-Merchant-Id"}, {"from": "json", "field": "o"}])
    )
    key = settings.routes[0].key
    assert key.parts is not None and [p.source for p in key.parts] == ["header", "json"]
    assert (
        settings.routes[0].key
        == Settings.model_validate(_route({"parts": list(key.parts)})).routes[0].key
    )


@pytest.mark.parametrize(
    ("key", "where", "reason"),
    [
        pytest.param({"from": "xml"}, "routes['pay'].key", "path", id="xml-without-path"),
        pytest.param(
            {"from": "xml", "path": "/p:Pay/p:OrderId"},
            "routes['pay'].key",
            "'p' is not declared",
            id="undeclared-prefix",
        ),
        pytest.param(
            {"from": "xml", "path": "p:Pay", "namespaces": {"p": "urn:p"}},
            "routes['pay'].key",
            "absolute",
            id="relative-path",
        ),
        pytest.param(
            {"from": "xml", "path": "//p:Pay", "namespaces": {"p": "urn:p"}},
            "routes['pay'].key",
            "absolute",
            id="descendant-path",
        ),
        pytest.param(
            {"from": "xml", "path": "/p:Pay[0]", "namespaces": {"p": "urn:p"}},
            "routes['pay'].key",
            "element step",
            id="zero-position",
        ),
        pytest.param(
            {"from": "xml", "path": "/a", "field": "x"},
            "routes['pay'].key",
            "'path'",
            id="xml-with-field",
        ),
        pytest.param(
            {"from": "json", "field": "x", "path": "/a"},
            "routes['pay'].key",
            "only for keys from xml",
            id="json-with-path",
        ),
        pytest.param([{"from": "header"}], "routes['pay'].key", "at least two", id="one-part"),
        pytest.param(
            [{"from": "header"}, {"from": "cookie", "name": "x"}],
            "routes['pay'].key[1].from",
            "'xml'",
            id="bad-part-source",
        ),
        pytest.param(
            [{"from": "header", "name": "A"}, {"from": "json"}],
            "routes['pay'].key[1]",
            "field",
            id="part-without-field",
        ),
        pytest.param(
            [{"from": "header"}, [{"from": "header"}, {"from": "header"}]],
            "routes['pay'].key[1]",
            "",
            id="nested-list",
        ),
        pytest.param(
            {"parts": [{"from": "header"}, {"from": "json", "field": "a"}], "from": "json"},
            "routes['pay'].key",
            "nothing else",
            id="parts-and-from",
        ),
    ],
)
def test_bad_key_configs_are_one_line(key: Any, where: str, reason: str, tmp_path: Any) -> None:
    import yaml

    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(_route(key)))
    with pytest.raises(ConfigError) as exc:
        load_settings(str(path), environ={})
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(where), message
    assert reason in message


def test_path_part_not_in_the_template_is_one_line() -> None:
    settings = Settings.model_validate(
        {
            "upstream": "http://127.0.0.1:1",
            **_route(
                [{"from": "header", "name": "A"}, {"from": "path", "name": "order"}],
                path="/v1/{merchant}/pay",
            ),
        }
    )
    with pytest.raises(ConfigError) as exc:
        RouteTable(settings)
    assert str(exc.value).startswith("routes['pay'].key[1].name: 'order'")


# --------------------------------------------------------------------------- JSON lists


def _json_key(body: bytes, field: str, required: bool = True) -> str | None:
    spec = KeySpec.model_validate({"from": "json", "field": field})
    return extract(proxy_request(body=body, content_type="application/json"), spec, {}, required)


def test_a_json_key_inside_a_list_needs_an_explicit_position() -> None:
    body = b'{"payments": [{"order_id": "first"}, {"order_id": "second"}]}'
    assert _json_key(body, "payments[1].order_id") == "second"
    assert _json_key(body, "payments[0].order_id") == "first"
    # Without a position the key would depend on list order: refused, as before.
    with pytest.raises(Problem) as exc:
        _json_key(body, "payments.order_id")
    _problem(exc, "key-missing", 400)
    assert _json_key(body, "payments.order_id", required=False) is None
    with pytest.raises(Problem) as exc:
        _json_key(body, "payments[2].order_id")
    _problem(exc, "key-missing", 400)
    nested = b'{"batches": [[{"id": "a"}], [{"id": "b"}, {"id": "c"}]]}'
    assert _json_key(nested, "batches[1][1].id") == "c"
    # A position on an object is not an index into it.
    with pytest.raises(Problem) as exc:
        _json_key(b'{"payments": {"0": {"order_id": "x"}}}', "payments[0].order_id")
    _problem(exc, "key-missing", 400)


# --------------------------------------------------------------------------- review: namespaces


def _many_namespaces(count: int) -> bytes:
    # One element, each attribute in a namespace of its own: the canonical writer looks
    # every name up among the namespaces in scope, so its cost grows with their square.
    attrs = " ".join(f'xmlns:p{i}="urn:u{i}" p{i}:x="1"' for i in range(count))
    return f"<r {attrs}><k>ord-1</k></r>".encode()


def test_many_namespaces_in_scope_are_a_400_quickly() -> None:
    body = _many_namespaces(9_000)  # 320 kB, under the default body cap
    started = time.monotonic()
    with pytest.raises(Problem) as exc:
        extract(
            _xml(body, "text/xml"),
            KeySpec.model_validate({"from": "xml", "path": "/r/k"}),
            {},
            required=True,
        )
    assert time.monotonic() - started < 1.0
    _problem(exc, "body-invalid", 400)
    started = time.monotonic()
    assert xmlkeys.canonical(_xml(body, "text/xml")) is None
    assert time.monotonic() - started < 1.0


def test_a_namespace_redeclared_on_every_sibling_is_fine() -> None:
    # Some serialisers repeat xmlns on every element: only what is in scope at once counts.
    items = "".join(f'<i xmlns="urn:items{n}">{n}</i>' for n in range(2_000))
    body = f"<r><k>ord-1</k>{items}</r>".encode()
    spec = KeySpec.model_validate({"from": "xml", "path": "/r/k"})
    assert extract(_xml(body, "text/xml"), spec, {}, required=True) == "ord-1"
    assert xmlkeys.canonical(_xml(body, "text/xml")) is not None


XSI = "http://www.w3.org/2001/XMLSchema-instance"


def _typed(prefix: str, uri: str) -> bytes:
    return (
        f'<r xmlns:xsi="{XSI}" xmlns:{prefix}="{uri}"><m xsi:type="{prefix}:Card">1</m></r>'
    ).encode()


def test_an_xsi_type_keeps_the_namespace_its_prefix_names() -> None:
    # The same text, `p:Card`, names two different types: two different requests.
    assert _fp(_typed("p", "urn:cards")) != _fp(_typed("p", "urn:banks"))
    # Another spelling of the same type is the same request, as for element names.
    assert _fp(_typed("p", "urn:cards")) == _fp(_typed("q", "urn:cards"))


def test_an_xml_key_loses_only_xml_whitespace() -> None:
    # XML's whitespace is space, tab, CR and LF. A no-break space (or U+2028) is part of
    # the value a backend reads, so `\u00a0ord-1` is not `ord-1`: it is not a valid key.
    for padding in ("\u00a0", "\u2028", "\u3000"):
        body = pay_envelope(f"{padding}ord-1", 10)
        with pytest.raises(Problem) as exc:
            extract(_xml(body), XML_SPEC, {}, required=True)
        _problem(exc, "key-invalid", 400)
    assert extract(_xml(pay_envelope(" \t\r\nord-1\n", 10)), XML_SPEC, {}, True) == "ord-1"


def test_a_charset_inside_another_quoted_parameter_is_not_the_charset() -> None:
    # SOAP 1.2 carries the action as a quoted parameter; its text is not a charset.
    envelope = pay_envelope("ord-1", 10, soap12=True)
    content_type = 'application/soap+xml; action="urn:Pay;charset=utf-16"; charset=utf-8'
    assert extract(_xml(envelope, content_type), XML_SPEC, {}, required=True) == "ord-1"
    assert _fp(envelope, content_type) == _fp(envelope, "application/soap+xml; charset=utf-8")
    assert xmlkeys._charset(b'text/xml; a="x;charset=utf-16"') is None
    assert xmlkeys._charset(b'text/xml;CharSet="ISO-8859-1"') == "ISO-8859-1"


def test_raw_bytes_never_pass_for_another_bodys_canonical_form() -> None:
    # The canonical form binds no-namespace names to `xmlns:n0=""`, which is not itself
    # well-formed XML: sent as a body, those exact bytes fall back to the raw fingerprint
    # and must not equal that of the document they are the canonical form of.
    document = b"<r><amount> 10 </amount></r>"
    canonical = xmlkeys.canonical(_xml(document, "text/xml"))
    assert canonical is not None
    assert xmlkeys.canonical(_xml(canonical, "text/xml")) is None
    assert _fp(canonical) != _fp(document)
