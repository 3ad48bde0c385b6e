"""What 'the same request' means: a retry must match, a different payment must not.

A false match replays the wrong payment's response (and never charges the second
one); a false mismatch turns an honest retry into 422.
"""

from __future__ import annotations

import re

import pytest
from harness import proxy_request

from proxy.fingerprint import fingerprint


def _fp(
    body: bytes = b"",
    *,
    method: str = "POST",
    path: str = "/v1/orders/pay",
    query: bytes = b"",
    content_type: str | None = "application/json",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> str:
    request = proxy_request(
        body=body,
        content_type=content_type,
        query=query,
        headers=extra_headers,
        method=method,
        path=path,
    )
    return fingerprint(request)


PAY = b'{"order_id": "ord-1", "amount": 1000, "currency": "EUR"}'


def test_fingerprint_is_a_sha256_hex_digest() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", _fp(PAY))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"order_id":"ord-1","amount":1000,"currency":"EUR"}', id="compact"),
        pytest.param(
            b'{\n  "currency": "EUR",\n  "amount": 1000,\n  "order_id": "ord-1"\n}\n',
            id="pretty-reordered",
        ),
        pytest.param(b'  {"amount":1000 ,"currency":"EUR","order_id":"ord-1"}\t', id="spaces"),
        pytest.param(
            b'{"order_id": "ord\\u002d1", "amount": 1000, "currency": "EUR"}', id="escape"
        ),
    ],
)
def test_json_whitespace_and_key_order_do_not_matter(body: bytes) -> None:
    assert _fp(body) == _fp(PAY)


def test_nested_key_order_does_not_matter() -> None:
    a = b'{"payment": {"order_id": "o", "card": {"last4": "4242", "brand": "visa"}}}'
    b = b'{"payment": {"card": {"brand": "visa", "last4": "4242"}, "order_id": "o"}}'
    assert _fp(a) == _fp(b)


def test_json_media_type_parameters_do_not_matter() -> None:
    assert _fp(PAY, content_type="application/json; charset=utf-8") == _fp(PAY)
    assert _fp(PAY, content_type="Application/JSON") == _fp(PAY)


def test_other_headers_do_not_matter() -> None:
    noisy = [(b"x-request-id", b"r-1"), (b"user-agent", b"retrying-client/2"), (b"date", b"now")]
    assert _fp(PAY, extra_headers=noisy) == _fp(PAY)


OTHER_PAYMENTS = {
    "amount": b'{"order_id": "ord-1", "amount": 1001, "currency": "EUR"}',
    "currency": b'{"order_id": "ord-1", "amount": 1000, "currency": "USD"}',
    "type": b'{"order_id": "ord-1", "amount": "1000", "currency": "EUR"}',
    "field-dropped": b'{"order_id": "ord-1", "amount": 1000}',
    "array": b'[{"order_id": "ord-1", "amount": 1000, "currency": "EUR"}]',
}


@pytest.mark.parametrize(
    "kwargs",
    [
        *(pytest.param({"body": body}, id=name) for name, body in OTHER_PAYMENTS.items()),
        pytest.param({"method": "PATCH"}, id="method"),
        pytest.param({"path": "/v1/charges"}, id="path"),
        pytest.param({"path": "/v1/orders/pay/"}, id="trailing-slash"),
        pytest.param({"query": b"dry_run=1"}, id="query-added"),
        pytest.param({"content_type": "application/vnd.pay+json"}, id="media-type"),
        pytest.param({"content_type": None}, id="no-media-type"),
    ],
)
def test_a_different_request_has_a_different_fingerprint(kwargs: dict[str, object]) -> None:
    base = {"body": PAY}
    assert _fp(**{**base, **kwargs}) != _fp(PAY)  # type: ignore[arg-type]


def test_query_values_matter_and_order_does_not() -> None:
    assert _fp(PAY, query=b"a=1&b=2") == _fp(PAY, query=b"b=2&a=1")
    # Repeated parameters keep their order: a last-wins backend reads another amount.
    assert _fp(PAY, query=b"amount=100&amount=1") != _fp(PAY, query=b"amount=1&amount=100")
    assert _fp(PAY, query=b"a=1&b=2&a=3") == _fp(PAY, query=b"b=2&a=1&a=3")
    assert _fp(PAY, query=b"a=1&b=2&a=3") != _fp(PAY, query=b"a=3&b=2&a=1")
    assert _fp(PAY, query=b"a=1&b=2") != _fp(PAY, query=b"a=1&b=3")
    assert _fp(PAY, query=b"a=1") != _fp(PAY, query=b"a=1&a=1")
    assert _fp(PAY, query=b"a=1") != _fp(PAY)


def test_fields_cannot_bleed_into_each_other() -> None:
    # Length-prefixed parts: moving bytes from path to query is another request.
    assert _fp(PAY, path="/v1/a", query=b"b=1") != _fp(PAY, path="/v1/ab", query=b"=1")
    assert _fp(b"x", content_type="text/plain") != _fp(b"", content_type="text/plainx")


def test_huge_integers_are_exact() -> None:
    small = b'{"order_id": "o", "amount": 123456789012345678901234567890}'
    plus_one = b'{"amount": 123456789012345678901234567891, "order_id": "o"}'
    reordered = b'{"amount":123456789012345678901234567890,"order_id":"o"}'
    assert _fp(small) == _fp(reordered)
    assert _fp(small) != _fp(plus_one)
    # Just past 64 bits, where a float would round both to the same value.
    assert _fp(b'{"amount": 18446744073709551616}') != _fp(b'{"amount": 18446744073709551617}')
    assert _fp(b'{"amount": -9223372036854775809}') != _fp(b'{"amount": -9223372036854775810}')


def test_non_json_bodies_are_raw_bytes() -> None:
    form = "application/x-www-form-urlencoded"
    assert _fp(b"a=1&b=2", content_type=form) != _fp(b"b=2&a=1", content_type=form)
    assert _fp(b"a=1&b=2", content_type=form) == _fp(b"a=1&b=2", content_type=form)
    assert _fp(b"amount=10", content_type="text/plain") != _fp(
        b"amount=10 ", content_type="text/plain"
    )
    blob = bytes(range(256))
    assert _fp(blob, content_type="application/octet-stream") == _fp(
        blob, content_type="application/octet-stream"
    )


def test_invalid_json_is_fingerprinted_raw() -> None:
    # A body that claims JSON but does not parse is compared byte for byte.
    assert _fp(b'{"a": 1') == _fp(b'{"a": 1')
    assert _fp(b'{"a": 1') != _fp(b'{"a":  1')
    assert _fp(b"\xff\xfe") != _fp(b"\xff\xfd")


def test_json_body_without_json_media_type_is_raw() -> None:
    spaced = b'{"a": 1, "b": 2}'
    compact = b'{"b":2,"a":1}'
    assert _fp(spaced) == _fp(compact)
    assert _fp(spaced, content_type="text/plain") != _fp(compact, content_type="text/plain")


@pytest.mark.parametrize(
    "values",
    [
        [b"NaN", b"Infinity", b"-Infinity", b"null", b"1e400", b"-1e400"],
    ],
)
def test_non_finite_numbers_never_share_a_fingerprint(values: list[bytes]) -> None:
    prints = {_fp(b'{"order_id": "ord-1", "amount": %s}' % value) for value in values}
    assert len(prints) == len(values)


def _fp_target(raw_path: bytes, query: bytes = b"") -> str:
    from urllib.parse import unquote

    from proxy.request import ProxyRequest

    request = ProxyRequest(
        method="POST",
        path=unquote(raw_path.decode("latin-1")),  # as the server decodes it
        raw_path=raw_path,
        query_string=query,
        headers=[(b"content-type", b"application/json")],
        body=PAY,
    )
    return fingerprint(request)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((b"/v1/a/b", b""), (b"/v1/a%2Fb", b"")),
        ((b"/v1/a", b"note=a;b=2"), (b"/v1/a", b"note=a%3Bb=2")),
        ((b"/v1/a", b"note=a+b"), (b"/v1/a", b"note=a%20b")),
        ((b"/v1/a", b"flag"), (b"/v1/a", b"flag=")),
    ],
    ids=["encoded-slash", "semicolon", "plus", "flag"],
)
def test_targets_are_fingerprinted_as_sent(
    first: tuple[bytes, bytes], second: tuple[bytes, bytes]
) -> None:
    # The backend gets these bytes, and may read them differently (a raw-path router, a
    # `;`-splitting query parser): never one fingerprint. A client that re-encodes its own
    # target between retries gets 422, the safe direction.
    assert _fp_target(*first) != _fp_target(*second)
    assert _fp_target(b"/v1/a%2Fb", b"b=2&a=1") == _fp_target(b"/v1/a%2Fb", b"a=1&b=2")
    # Empty segments are nothing to any parser, nor is an escaped unreserved character.
    assert _fp_target(b"/v1/a", b"a=1&&b=2&") == _fp_target(b"/v1/a", b"a=1&b=2")
    assert _fp_target(b"/v1/a", b"a=%41") == _fp_target(b"/v1/a", b"a=A")
    # To a parser that splits on `;` too, the second reads another (last) `a`.
    assert _fp_target(b"/v1/a", b"x=1;a=1&a=2") != _fp_target(b"/v1/a", b"a=2&x=1;a=1")


def test_paths_that_differ_only_in_non_utf8_escapes_are_different_requests() -> None:
    """`%FF` and `%FE` both decode to U+FFFD in the server's decoded path; the backend sees
    two different paths, so the fingerprint must too (the raw target decides)."""
    from proxy.request import ProxyRequest

    def fp(raw_path: bytes) -> str:
        return fingerprint(
            ProxyRequest(
                method="POST",
                path="/v1/items/\ufffd",
                raw_path=raw_path,
                query_string=b"",
                headers=[(b"content-type", b"application/json")],
                body=PAY,
            )
        )

    assert fp(b"/v1/items/%FF") != fp(b"/v1/items/%FE")
    # An escape of an unreserved character is the same path to every backend.
    assert fp(b"/v1/items/%41") == fp(b"/v1/items/A")


def test_an_escaped_slash_is_not_a_slash() -> None:
    """`/a%2Fb` is one path segment to many backends, `/a/b` two: not the same request."""
    from proxy.request import ProxyRequest

    def fp(raw_path: bytes) -> str:
        return fingerprint(
            ProxyRequest(
                method="POST",
                path="/a/b",
                raw_path=raw_path,
                query_string=b"",
                headers=[],
                body=b"",
            )
        )

    assert fp(b"/a%2Fb") != fp(b"/a/b")
    assert fp(b"/a%2fb") == fp(b"/a%2Fb")
