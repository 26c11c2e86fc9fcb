"""Request bodies as Auth0 reads them: `application/x-www-form-urlencoded` or JSON, flat string parameters."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from starlette.requests import Request

from server.emulator.errors import invalid_request


async def read_fields(request: Request) -> dict[str, str]:
    """The parameters of a form or JSON body. Raises OAuthError 400 `invalid_request`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if content_type == "application/json":
        return json_fields(body)
    if content_type in ("application/x-www-form-urlencoded", ""):
        return form_fields(body)
    raise invalid_request(f"Unsupported content type: {content_type}")


def json_fields(body: bytes) -> dict[str, str]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise invalid_request("The body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise invalid_request("The JSON body must be an object.")
    fields: dict[str, str] = {}
    for name, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise invalid_request(f"Parameter {name} must be a string.")
        fields[name] = str(value)
    return fields


def form_fields(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request("The form body is malformed.") from exc
    fields: dict[str, str] = {}
    for name, value in pairs:
        # RFC 6749 §3.2: request parameters must not be repeated.
        if name in fields:
            raise invalid_request(f"Parameter {name} was sent more than once.")
        fields[name] = value
    return fields
