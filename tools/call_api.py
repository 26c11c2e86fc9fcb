"""`call_api`: call a provider's API with a brokered token the caller never sees (SPEC §8)."""

from __future__ import annotations

import json as jsonlib
import re
from typing import Annotated, Literal

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field, JsonValue, field_validator, model_validator

from server.api_calls import ApiCall
from server.clock import rfc3339
from server.provider import ProviderRequest
from tools.fields import ConnectionName, ScopeList
from tools.registry import Invocation, StrictInput, ToolSpec

MAX_BODY = 256 * 1024  # bytes of a request body (text as UTF-8, or the JSON as sent)
MAX_HEADERS = 20
# The broker sets these itself, or they would let an agent smuggle a second request or reroute this one.
FORBIDDEN_HEADERS = frozenset(
    {"authorization", "cookie", "host", "proxy-authorization", "content-length", "transfer-encoding", "connection"}
)
FORBIDDEN_PREFIXES = ("x-forwarded-", "proxy-")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e\x80-\uffff]{0,4096}$")

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


class CallApiInput(StrictInput):
    connection: ConnectionName = Field(description="Auth0 connection of the provider, e.g. github")
    scopes: ScopeList = Field(
        description="Provider scopes the call needs (1-20); a holding with an API must cover all of them"
    )
    method: Method = Field(description="HTTP method; the listing says which it allows (default GET and HEAD)")
    url: Annotated[str, Field(min_length=1, max_length=8192)] = Field(
        description="Absolute URL under one of the listing's API base URLs (list_market shows `api`)"
    )
    headers: dict[str, str] | None = Field(
        None,
        description=(
            "Extra request headers (at most 20), e.g. Accept; the broker sets Authorization itself. Cookie, "
            "Host, Content-Length, Transfer-Encoding, Connection, Proxy-* and X-Forwarded-* are refused"
        ),
    )
    json_body: JsonValue | None = Field(
        None,
        alias="json",
        description="A JSON request body (sent as application/json, at most 256 KiB); not with `body`",
    )
    body: Annotated[str, Field(max_length=MAX_BODY)] | None = Field(
        None, description="A text request body (at most 256 KiB as UTF-8); not with `json`"
    )
    purpose: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="Why you make this call (1-500 characters); recorded in the audit log"
    )
    login_hint: Annotated[str, Field(min_length=1, max_length=320)] | None = Field(
        None, description="Which connected account to use when you have several (e.g. an email)"
    )

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, headers: dict[str, str] | None) -> dict[str, str] | None:
        if headers is None:
            return None
        if len(headers) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        seen: set[str] = set()
        for name, value in headers.items():
            key = name.lower()
            if not _HEADER_NAME.match(name):
                raise ValueError("a header name must be 1-64 token characters")
            if key in FORBIDDEN_HEADERS or key.startswith(FORBIDDEN_PREFIXES):
                raise ValueError(f"header {key} is set by the broker or not allowed")
            if key in seen:
                raise ValueError(f"header {key} appears twice")
            seen.add(key)
            if not _HEADER_VALUE.match(value):
                raise ValueError(f"header {key}: a value of at most 4096 characters with no control characters")
        return headers

    @model_validator(mode="after")
    def _one_body(self) -> CallApiInput:
        if self.json_body is not None and self.body is not None:
            raise ValueError("give json or body, not both")
        if len(self.content() or b"") > MAX_BODY:
            raise ValueError(f"the request body is over {MAX_BODY // 1024} KiB")
        return self

    def content(self) -> bytes | None:
        """The request body as sent."""
        if self.json_body is not None:
            return jsonlib.dumps(self.json_body, separators=(",", ":"), ensure_ascii=False).encode()
        return None if self.body is None else self.body.encode()


class CallApiOutput(BaseModel):
    status: int = Field(description="The provider's HTTP status (4xx and 5xx are answers too)")
    headers: dict[str, str] = Field(
        description="The provider's content-type, content-length, etag, last-modified, link, location, "
        "retry-after and rate-limit headers"
    )
    body: str = Field(description="The provider's answer body (base64 when body_encoding is base64)")
    body_encoding: Literal["text", "base64"] = Field(description="text, or base64 for a body that is not text")
    truncated: bool = Field(description="Whether the body was cut at the broker's size limit")
    grant_id: str = Field(description="The grant this call used; calls with the same terms reuse it")
    grant_expires_at: str = Field(description="When the grant ends (RFC 3339, UTC)")
    token_id: str = Field(description="Fingerprint of the brokered token in the audit log (not the token)")
    units_remaining: int = Field(description="Units left in the holding that paid for the grant")
    elapsed_ms: float = Field(description="How long the provider took")


async def run(inv: Invocation, params: CallApiInput) -> CallApiOutput:
    headers = dict(params.headers or {})
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    content = params.content()
    if params.json_body is not None:
        content_type = content_type or "application/json"
    elif params.body is not None:
        content_type = content_type or "text/plain; charset=utf-8"
    else:
        content_type = None  # no body: a Content-Type would describe nothing
    request = ProviderRequest(params.method, params.url, tuple(headers.items()), content, content_type)
    api = ApiCall(params.connection, tuple(sorted(set(params.scopes))), params.login_hint, request)
    result = await inv.broker.call_api(inv.call, inv.principal, api)
    answer = result.answer
    return CallApiOutput(
        status=answer.status,
        headers=answer.headers,
        body=answer.body,
        body_encoding=answer.body_encoding,  # type: ignore[arg-type]  # ProviderAnswer says one of the two
        truncated=answer.truncated,
        grant_id=result.grant_id,
        grant_expires_at=rfc3339(result.grant_expires_at),
        token_id=result.token_id,
        units_remaining=result.units_remaining,
        elapsed_ms=round(answer.elapsed_ms, 3),
    )


SPEC = ToolSpec(
    name="call_api",
    title="Call a provider API",
    description=(
        "Call a connected provider's API (e.g. GitHub) through the broker: it adds a scoped Token Vault "
        "token you never see and returns the provider's answer. The URL must lie under the listing's API "
        "base URLs and the method be one it allows. The first call spends one unit and opens a grant; calls "
        "with the same connection, scopes and login_hint within the grant spend nothing. State your purpose: "
        "it is audited."
    ),
    scope="call:api",
    annotations=ToolAnnotations(
        title="Call a provider API",
        read_only_hint=False,
        destructive_hint=True,
        idempotent_hint=False,
        open_world_hint=True,
    ),
    input_model=CallApiInput,
    output_model=CallApiOutput,
    run=run,
)
