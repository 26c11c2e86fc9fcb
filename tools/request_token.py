"""`request_token`: spend one unit for a short-lived, scoped token from Auth0 Token Vault."""

from __future__ import annotations

from typing import Annotated

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from server.clock import rfc3339
from tools.fields import ConnectionName, ScopeList
from tools.registry import Invocation, StrictInput, ToolSpec


class RequestTokenInput(StrictInput):
    connection: ConnectionName = Field(description="Auth0 connection of the provider, e.g. github or google-oauth2")
    scopes: ScopeList = Field(description="Provider scopes you need (1-20); a holding must cover all of them")
    purpose: Annotated[str, Field(min_length=1, max_length=500)] = Field(
        description="Why you need the token (1-500 characters); recorded in the audit log"
    )
    login_hint: Annotated[str, Field(min_length=1, max_length=320)] | None = Field(
        None, description="Which connected account to use when you have several (e.g. an email)"
    )


class RequestTokenOutput(BaseModel):
    access_token: str = Field(description="The provider access token; use it at once, do not store it")
    token_type: str = Field(description="How to present it, usually Bearer")
    expires_at: str = Field(description="When it expires (RFC 3339, UTC)")
    expires_in: int = Field(description="Seconds until it expires")
    connection: str = Field(description="The connection it is for")
    scopes: list[str] = Field(description="Scopes as granted")
    token_id: str = Field(description="Fingerprint of the token in the audit log (not the token)")
    units_remaining: int = Field(description="Units left in the holding that paid for it")


async def run(inv: Invocation, params: RequestTokenInput) -> RequestTokenOutput:
    scopes = sorted(set(params.scopes))
    issued = await inv.broker.request_token(
        inv.call, inv.principal, connection=params.connection, scopes=scopes, login_hint=params.login_hint
    )
    return RequestTokenOutput(
        access_token=issued.access_token,
        token_type=issued.token_type,
        expires_at=rfc3339(issued.expires_at),
        expires_in=issued.expires_in,
        connection=issued.connection,
        scopes=list(issued.scopes),
        token_id=issued.token_id,
        units_remaining=issued.units_remaining,
    )


SPEC = ToolSpec(
    name="request_token",
    title="Request a scoped token",
    description=(
        "Get a short-lived access token for a connected account (e.g. GitHub) with exactly the scopes you "
        "name, through Auth0 Token Vault. Spends one unit of a holding that covers the scopes; refunded if "
        "the exchange fails. State your purpose: it is audited."
    ),
    scope="request:token",
    annotations=ToolAnnotations(
        title="Request a scoped token",
        read_only_hint=False,
        destructive_hint=False,
        idempotent_hint=False,
        open_world_hint=True,
    ),
    input_model=RequestTokenInput,
    output_model=RequestTokenOutput,
    run=run,
)
