"""A SOAP/XML payment endpoint, exactly as non-idempotent as the JSON one, on the same ledger.

``POST /soap/payments`` takes a SOAP 1.1 (``text/xml``) or 1.2 (``application/soap+xml``)
envelope whose body holds ``<p:Pay>`` with ``OrderId``, ``Amount`` and ``Currency`` in the
:data:`PAYMENTS_NS` namespace, charges every time it is called, and answers a ``PayResponse``
in the same SOAP version. An unusable request is a SOAP fault (1.1: HTTP 500 ``soap:Client``;
1.2: HTTP 400 ``env:Sender``), as legacy gateways answer.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
PAYMENTS_NS = "urn:idempotency-proxy:sample:payments"

_CONTENT_TYPES = {
    SOAP11_NS: "text/xml; charset=utf-8",
    SOAP12_NS: "application/soap+xml; charset=utf-8",
}


class SoapFault(ValueError):
    """The request cannot be charged; answered as a SOAP fault, nothing charged."""

    def __init__(self, message: str, envelope_ns: str = SOAP11_NS) -> None:
        super().__init__(message)
        self.envelope_ns = envelope_ns


def parse_pay(body: bytes) -> tuple[str, dict[str, Any]]:
    """The envelope's namespace and ``{order_id, amount, currency}`` (strings as sent)."""
    try:
        root = fromstring(body, forbid_dtd=True)
    except DefusedXmlException:
        raise SoapFault("DTDs and entities are not accepted") from None
    except ET.ParseError:
        raise SoapFault("the body is not well-formed XML") from None
    envelope_ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if root.tag not in (f"{{{SOAP11_NS}}}Envelope", f"{{{SOAP12_NS}}}Envelope"):
        raise SoapFault("the body is not a SOAP 1.1 or 1.2 envelope")
    pay = root.find(f"{{{envelope_ns}}}Body/{{{PAYMENTS_NS}}}Pay")
    if pay is None:
        raise SoapFault("the SOAP body holds no Pay element", envelope_ns)
    fields: dict[str, Any] = {}
    for name, key in (("OrderId", "order_id"), ("Amount", "amount"), ("Currency", "currency")):
        element = pay.find(f"{{{PAYMENTS_NS}}}{name}")
        if element is None or not (element.text or "").strip():
            raise SoapFault(f"Pay/{name} is missing", envelope_ns)
        fields[key] = (element.text or "").strip()
    try:
        fields["amount"] = int(fields["amount"])
    except ValueError:
        raise SoapFault("Amount must be an integer number of minor units", envelope_ns) from None
    return envelope_ns, fields


def _envelope(envelope_ns: str, body: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<soap:Envelope xmlns:soap="{envelope_ns}"><soap:Body>{body}</soap:Body></soap:Envelope>'
    ).encode()


def pay_response(envelope_ns: str, charge: dict[str, Any]) -> tuple[bytes, str]:
    """The PayResponse envelope for one charge, and its content type."""
    items = "".join(
        f"<p:{name}>{escape(str(charge[key]))}</p:{name}>"
        for name, key in (
            ("ChargeId", "charge_id"),
            ("OrderId", "order_id"),
            ("Amount", "amount"),
            ("Currency", "currency"),
            ("ChargedAt", "charged_at"),
        )
    )
    body = f'<p:PayResponse xmlns:p="{PAYMENTS_NS}">{items}</p:PayResponse>'
    return _envelope(envelope_ns, body), _CONTENT_TYPES[envelope_ns]


def fault_response(fault: SoapFault) -> tuple[int, bytes, str]:
    """Status, envelope and content type of a client fault in the request's SOAP version."""
    message = escape(str(fault))
    if fault.envelope_ns == SOAP12_NS:
        body = (
            "<soap:Fault><soap:Code><soap:Value>soap:Sender</soap:Value></soap:Code>"
            f'<soap:Reason><soap:Text xml:lang="en">{message}</soap:Text></soap:Reason>'
            "</soap:Fault>"
        )
        return 400, _envelope(SOAP12_NS, body), _CONTENT_TYPES[SOAP12_NS]
    body = (
        "<soap:Fault><faultcode>soap:Client</faultcode>"
        f"<faultstring>{message}</faultstring></soap:Fault>"
    )
    return 500, _envelope(SOAP11_NS, body), _CONTENT_TYPES[SOAP11_NS]


def pay_envelope(
    order_id: str, amount: int, currency: str = "EUR", *, soap12: bool = False, pretty: bool = False
) -> bytes:
    """A client's Pay request (tests, the demo and the load tests send this)."""
    envelope_ns = SOAP12_NS if soap12 else SOAP11_NS
    gap = "\n    " if pretty else ""
    return (
        f'<soap:Envelope xmlns:soap="{envelope_ns}" xmlns:p="{PAYMENTS_NS}">{gap}<soap:Body>'
        f"{gap}<p:Pay>{gap}<p:OrderId>{escape(order_id)}</p:OrderId>{gap}"
        f"<p:Amount>{amount}</p:Amount>{gap}<p:Currency>{escape(currency)}</p:Currency>"
        f"{gap}</p:Pay>{gap}</soap:Body>\n</soap:Envelope>"
    ).encode()
