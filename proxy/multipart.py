"""Reading one field of a multipart/form-data body, for routes keyed on a form field."""

from __future__ import annotations

import io
from typing import Any

from python_multipart import parse_form
from python_multipart.exceptions import FormParserError

from proxy import problems
from proxy.request import ProxyRequest


def form_values(request: ProxyRequest, name: str) -> list[str]:
    """Every value of the text field `name`; files are ignored, never kept."""
    wanted = name.encode("utf-8")
    values: list[str] = []

    def on_field(field: Any) -> None:
        if field.field_name == wanted and field.value is not None:
            values.append(field.value.decode("utf-8"))

    def on_file(file: Any) -> None:
        file.close()

    content_type = request.header(b"content-type") or b""
    try:
        parse_form({"Content-Type": content_type}, io.BytesIO(request.body), on_field, on_file)
    except (FormParserError, ValueError, UnicodeDecodeError):
        raise problems.body_invalid("the multipart form body cannot be parsed") from None
    return values
