"""Where the idempotency key comes from, what a well-formed key is, and whose it is.

Unit level: these build `ProxyRequest` objects directly and call `proxy.keys`.
A wrongly accepted key is a duplicate charge waiting to happen (two spellings of
one key must be one key); a wrongly scoped key leaks one tenant's payment to another.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from harness import proxy_request

from proxy.config import KeySpec
from proxy.keys import extract, parse_header, scope, validate
from proxy.problems import Problem

HEADER_SPEC = KeySpec.model_validate({"from": "header", "name": "Idempotency-Key"})


def _spec(source: str, target: str) -> KeySpec:
    return KeySpec.model_validate({"from": source, "field": target})


def _problem(exc: pytest.ExceptionInfo[Problem], name: str, status: int) -> Problem:
    problem = exc.value
    assert problem.name == name, problem.detail
    assert problem.status == status
    return problem


def _header_key(*values: bytes) -> str | None:
    headers = [(b"idempotency-key", value) for value in values]
    return extract(proxy_request(headers=headers), HEADER_SPEC, {}, required=True)


# --------------------------------------------------------------------------- header


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"abc", "abc"),
        (b'"abc"', "abc"),
        (b'  "abc"  ', "abc"),
        (b"  abc\t", "abc"),
        (b'"abc";foo=1', "abc"),
        (b'"abc" ; foo=1;bar', "abc"),
        (b"abc;foo=1", "abc"),
        (b'"a\\"b"', 'a"b'),
        (b'"a\\\\b"', "a\\b"),
        (b'"with space"', "with space"),
        (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ],
)
def test_header_forms_give_the_key(raw: bytes, expected: str) -> None:
    assert _header_key(raw) == expected


def test_quoted_and_bare_header_are_the_same_key() -> None:
    quoted = _header_key(b'"order-42"')
    bare = _header_key(b"order-42")
    assert quoted == bare == "order-42"
    assert scope("default", "pay", quoted or "") == scope("default", "pay", bare or "")


def test_max_length_key_is_accepted() -> None:
    key = "k" * 255
    assert _header_key(key.encode()) == key
    assert _header_key(f'"{key}"'.encode()) == key


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([b""], id="empty"),
        pytest.param([b'""'], id="empty-quoted"),
        pytest.param([b"   "], id="blank"),
        pytest.param([b";foo=1"], id="only-parameters"),
        pytest.param([b"k" * 256], id="256-chars"),
        pytest.param([b'"' + b"k" * 256 + b'"'], id="256-chars-quoted"),
        pytest.param([b"ab\x01cd"], id="control-char"),
        pytest.param([b"ab\x7fcd"], id="del-char"),
        pytest.param([b'"ab\x01cd"'], id="control-char-quoted"),
        pytest.param([b"ab\tcd"], id="inner-tab"),
        pytest.param(["caf\u00e9".encode()], id="non-ascii-utf8"),
        pytest.param([b"caf\xe9"], id="non-ascii-latin1"),
        pytest.param([b'"abc'], id="unterminated"),
        pytest.param([b'"abc\\"'], id="unterminated-after-escape"),
        pytest.param([b'"a\\nb"'], id="bad-escape"),
        pytest.param([b'"abc\\'], id="dangling-backslash"),
        pytest.param([b'"abc"def'], id="junk-after-quotes"),
        pytest.param([b'ab"c'], id="bare-quote"),
        pytest.param([b"ab\\c"], id="bare-backslash"),
        pytest.param([b"abc", b"abc"], id="two-lines-same"),
        pytest.param([b"abc", b"def"], id="two-lines"),
        pytest.param([b'"a", "b"'], id="quoted-list"),
        pytest.param([b'"a",'], id="quoted-trailing-comma"),
        pytest.param([b"a, b"], id="bare-list"),
        pytest.param([b"a,b"], id="bare-list-tight"),
    ],
)
def test_malformed_header_is_key_invalid(values: list[bytes]) -> None:
    with pytest.raises(Problem) as exc:
        _header_key(*values)
    _problem(exc, "key-invalid", 400)


def test_parse_header_rejects_several_lines_directly() -> None:
    with pytest.raises(Problem) as exc:
        parse_header([b"a", b"b"])
    _problem(exc, "key-invalid", 400)


def test_header_missing_is_key_missing_or_none() -> None:
    request = proxy_request(headers=[(b"x-other", b"1")])
    with pytest.raises(Problem) as exc:
        extract(request, HEADER_SPEC, {}, required=True)
    problem = _problem(exc, "key-missing", 400)
    assert "Idempotency-Key" in (problem.detail or "")
    assert extract(request, HEADER_SPEC, {}, required=False) is None


def test_header_name_is_case_insensitive_and_configurable() -> None:
    spec = KeySpec.model_validate({"from": "header", "name": "X-Request-Key"})
    request = proxy_request(headers=[(b"x-request-key", b"abc")])
    assert extract(request, spec, {}, required=True) == "abc"


@pytest.mark.parametrize("key", ["", "k" * 256, "a\x00b", "caf\u00e9", "tab\there"])
def test_validate_rejects(key: str) -> None:
    with pytest.raises(Problem) as exc:
        validate(key)
    _problem(exc, "key-invalid", 400)


def test_problem_detail_never_echoes_the_key() -> None:
    secret = "ab\x01-secret-key-material"
    with pytest.raises(Problem) as exc:
        _header_key(secret.encode())
    assert "secret-key-material" not in (exc.value.detail or "")
    assert b"secret-key-material" not in exc.value.body()


# --------------------------------------------------------------------------- json


def _json_key(body: bytes, field: str = "order_id", *, required: bool = True, **kw: Any) -> Any:
    content_type = kw.pop("content_type", "application/json")
    request = proxy_request(body=body, content_type=content_type)
    return extract(request, _spec("json", field), {}, required=required)


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        (b'{"order_id": "ord-1", "amount": 10}', "order_id", "ord-1"),
        (b'{"order_id": 12345}', "order_id", "12345"),
        (b'{"order_id": -7}', "order_id", "-7"),
        (b'{"order_id": 123456789012345678901234567890}', "order_id", "1234567890" * 3),
        (b'{"payment": {"order_id": "ord-2"}}', "payment.order_id", "ord-2"),
        (b'{"payment": {"order_id": 99}}', "payment.order_id", "99"),
        (b'{"a": {"b": {"c": "deep"}}}', "a.b.c", "deep"),
    ],
)
def test_json_field(body: bytes, field: str, expected: str) -> None:
    assert _json_key(body, field) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/vnd.pay+json",
    ],
)
def test_json_media_types_accepted(content_type: str) -> None:
    assert _json_key(b'{"order_id": "x"}', content_type=content_type) == "x"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"order_id": true}', id="bool"),
        pytest.param(b'{"order_id": false}', id="false"),
        pytest.param(b'{"order_id": null}', id="null"),
        pytest.param(b'{"order_id": {"id": 1}}', id="object"),
        pytest.param(b'{"order_id": [1]}', id="array"),
        pytest.param(b'{"order_id": 1.5}', id="float"),
        pytest.param(b'{"order_id": ""}', id="empty-string"),
        pytest.param(b'{"order_id": "' + b"k" * 256 + b'"}', id="too-long"),
        pytest.param('{"order_id": "caf\u00e9"}'.encode(), id="non-ascii"),
    ],
)
def test_json_field_with_bad_value_is_key_invalid(body: bytes) -> None:
    with pytest.raises(Problem) as exc:
        _json_key(body)
    _problem(exc, "key-invalid", 400)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"amount": 10}', "order_id"),
        (b"[1, 2]", "order_id"),
        (b'"just a string"', "order_id"),
        (b'{"payment": {"amount": 1}}', "payment.order_id"),
        (b'{"payment": "ord-1"}', "payment.order_id"),
        (b"{}", "payment.order_id"),
    ],
)
def test_json_field_missing_is_key_missing_naming_the_field(body: bytes, field: str) -> None:
    with pytest.raises(Problem) as exc:
        _json_key(body, field)
    problem = _problem(exc, "key-missing", 400)
    assert field in (problem.detail or "")
    assert _json_key(body, field, required=False) is None


def test_optional_json_null_is_none() -> None:
    assert _json_key(b'{"order_id": null}', required=False) is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"order_id": ', id="truncated"),
        pytest.param(b"not json", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"order_id": "a",}', id="trailing-comma"),
    ],
)
def test_malformed_json_is_body_invalid_naming_the_field(body: bytes) -> None:
    with pytest.raises(Problem) as exc:
        _json_key(body)
    problem = _problem(exc, "body-invalid", 400)
    assert "order_id" in (problem.detail or "")


def test_invalid_utf8_json_is_body_invalid() -> None:
    with pytest.raises(Problem) as exc:
        _json_key(b'{"order_id": "ab\xff\xfe"}')
    _problem(exc, "body-invalid", 400)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_json_route_with_other_media_type_is_415(content_type: str | None) -> None:
    with pytest.raises(Problem) as exc:
        _json_key(b'{"order_id": "x"}', content_type=content_type)
    _problem(exc, "unsupported-media-type", 415)


# --------------------------------------------------------------------------- form


def _multipart(fields: list[tuple[str, str]], boundary: str = "b0undary") -> tuple[bytes, str]:
    parts = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        )
    parts.append(
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="receipt"; filename="r.txt"\r\n'
        "Content-Type: text/plain\r\n\r\nfile contents\r\n"
    )
    parts.append(f"--{boundary}--\r\n")
    return "".join(parts).encode(), f"multipart/form-data; boundary={boundary}"


def test_urlencoded_form_field() -> None:
    request = proxy_request(
        body=b"amount=10&order_id=ord%2D7&currency=EUR",
        content_type="application/x-www-form-urlencoded",
    )
    assert extract(request, _spec("form", "order_id"), {}, required=True) == "ord-7"


def test_urlencoded_form_field_missing_or_repeated() -> None:
    spec = _spec("form", "order_id")
    missing = proxy_request(body=b"amount=10", content_type="application/x-www-form-urlencoded")
    with pytest.raises(Problem) as exc:
        extract(missing, spec, {}, required=True)
    assert "order_id" in (_problem(exc, "key-missing", 400).detail or "")
    assert extract(missing, spec, {}, required=False) is None
    twice = proxy_request(
        body=b"order_id=a&order_id=b", content_type="application/x-www-form-urlencoded"
    )
    with pytest.raises(Problem) as exc:
        extract(twice, spec, {}, required=True)
    _problem(exc, "key-invalid", 400)


def test_urlencoded_form_with_invalid_utf8_is_body_invalid() -> None:
    request = proxy_request(body=b"order_id=\xff", content_type="application/x-www-form-urlencoded")
    with pytest.raises(Problem) as exc:
        extract(request, _spec("form", "order_id"), {}, required=True)
    _problem(exc, "body-invalid", 400)


def test_multipart_form_field() -> None:
    body, content_type = _multipart([("amount", "10"), ("order_id", "ord-9")])
    request = proxy_request(body=body, content_type=content_type)
    assert extract(request, _spec("form", "order_id"), {}, required=True) == "ord-9"


def test_multipart_form_field_missing() -> None:
    body, content_type = _multipart([("amount", "10")])
    request = proxy_request(body=body, content_type=content_type)
    with pytest.raises(Problem) as exc:
        extract(request, _spec("form", "order_id"), {}, required=True)
    _problem(exc, "key-missing", 400)
    assert extract(request, _spec("form", "order_id"), {}, required=False) is None


def test_form_route_with_json_body_is_415() -> None:
    request = proxy_request(body=b'{"order_id": "x"}', content_type="application/json")
    with pytest.raises(Problem) as exc:
        extract(request, _spec("form", "order_id"), {}, required=True)
    _problem(exc, "unsupported-media-type", 415)


# --------------------------------------------------------------------------- query / path


def test_query_parameter() -> None:
    spec = _spec("query", "order_id")
    request = proxy_request(query=b"currency=EUR&order_id=ord%2012")
    assert extract(request, spec, {}, required=True) == "ord 12"
    absent = proxy_request(query=b"currency=EUR")
    with pytest.raises(Problem) as exc:
        extract(absent, spec, {}, required=True)
    assert "order_id" in (_problem(exc, "key-missing", 400).detail or "")
    assert extract(absent, spec, {}, required=False) is None
    with pytest.raises(Problem) as exc:
        extract(proxy_request(query=b"order_id=a&order_id=b"), spec, {}, required=True)
    _problem(exc, "key-invalid", 400)
    with pytest.raises(Problem) as exc:
        extract(proxy_request(query=b"order_id="), spec, {}, required=True)
    _problem(exc, "key-invalid", 400)


def test_path_parameter() -> None:
    spec = _spec("path", "order_id")
    request = proxy_request(path="/v1/orders/ord-5/pay")
    assert extract(request, spec, {"order_id": "ord-5"}, required=True) == "ord-5"
    with pytest.raises(Problem) as exc:
        extract(request, spec, {}, required=True)
    _problem(exc, "key-missing", 400)
    assert extract(request, spec, {}, required=False) is None
    with pytest.raises(Problem) as exc:
        extract(request, spec, {"order_id": "caf\u00e9"}, required=True)
    _problem(exc, "key-invalid", 400)


# --------------------------------------------------------------------------- scope


STORAGE_KEY = re.compile(r"^idem:\{[0-9a-f]{32}\}$")


def test_scope_shape_and_no_raw_key_bytes() -> None:
    raw = "order-RAW-KEY-MATERIAL-123"
    scoped = scope("tenant-a", "pay", raw)
    assert STORAGE_KEY.match(scoped.storage_key), scoped.storage_key
    assert re.fullmatch(r"[0-9a-f]{32}", scoped.log_hash)
    for fragment in (raw, "RAW-KEY", "tenant-a", "pay"):
        assert fragment not in scoped.storage_key
        assert fragment not in scoped.log_hash
    # Hostile bytes (a hash tag of their own, Redis glob characters) stay out as well.
    hostile = scope("t", "n", "}{evil*?[x]")
    assert STORAGE_KEY.match(hostile.storage_key)


def test_scope_is_stable() -> None:
    assert scope("t", "pay", "k") == scope("t", "pay", "k")


def test_scope_separates_tenants_namespaces_and_keys() -> None:
    scoped = {
        scope("tenant-a", "pay", "k1").storage_key,
        scope("tenant-b", "pay", "k1").storage_key,
        scope("tenant-a", "charges", "k1").storage_key,
        scope("tenant-a", "pay", "k2").storage_key,
        # Separators in the parts cannot make two scopes collide.
        scope("a|b", "c", "d").storage_key,
        scope("a", "b|c", "d").storage_key,
        scope("a", "b", "c|d").storage_key,
        scope("ab", "", "k").storage_key,
        scope("a", "b", "k").storage_key,
    }
    assert len(scoped) == 9


def test_an_absent_tenant_is_a_scope_no_tenant_value_can_name() -> None:
    anonymous = scope(None, "default", "k").storage_key
    for value in ("default", "", "-", "None", "0:", "-|"):
        assert scope(value, "default", "k").storage_key != anonymous, value
    assert scope(None, "default", "k") == scope(None, "default", "k")
