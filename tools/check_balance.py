"""`check_balance`: the caller's own wallet and quota holdings."""

from __future__ import annotations

from typing import Literal

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from server.clock import rfc3339
from tools.registry import Invocation, StrictInput, ToolSpec


class CheckBalanceInput(StrictInput):
    """No arguments: an agent sees only its own account."""


class HoldingView(BaseModel):
    listing_id: str = Field(description="The listing the units were bought from")
    connection: str = Field(description="Auth0 connection the units buy tokens for")
    scopes: list[str] = Field(description="Provider scopes these units cover")
    units_remaining: int = Field(description="Units left to spend with request_token or call_api")
    delivery: Literal["token", "proxy"] = Field(
        description="token: request_token may hand you the token; proxy: only call_api spends these units"
    )


class GrantView(BaseModel):
    grant_id: str = Field(description="A live brokered grant: call_api calls with these terms spend nothing")
    connection: str = Field(description="The connection it calls")
    scopes: list[str] = Field(description="The scopes of its token")
    expires_at: str = Field(description="When it ends (RFC 3339, UTC); the next call after that spends a unit")


class CheckBalanceOutput(BaseModel):
    account: str = Field(description="Your account (the token's subject)")
    balance: int = Field(description="Wallet balance in credits")
    holdings: list[HoldingView] = Field(description="Quota you hold, per listing")
    grants: list[GrantView] = Field(description="Your live call_api grants")
    as_of: str = Field(description="When this was read (RFC 3339, UTC)")


async def run(inv: Invocation, params: CheckBalanceInput) -> CheckBalanceOutput:
    found = await inv.broker.check_balance(inv.call, inv.principal)
    return CheckBalanceOutput(
        account=found.account,
        balance=found.balance,
        holdings=[
            HoldingView(
                listing_id=h.listing_id,
                connection=h.connection,
                scopes=list(h.scopes),
                units_remaining=h.units_held,
                delivery=h.delivery,  # type: ignore[arg-type]  # the schema's CHECK keeps it one of the two
            )
            for h in found.holdings
        ],
        grants=[
            GrantView(grant_id=g.id, connection=g.connection, scopes=list(g.scopes), expires_at=rfc3339(g.expires_at))
            for g in found.grants
        ],
        as_of=rfc3339(found.as_of),
    )


SPEC = ToolSpec(
    name="check_balance",
    title="Check wallet and quota",
    description=(
        "Show your wallet balance (credits), the quota units you hold for each listing, and your live "
        "call_api grants."
    ),
    scope="read:balance",
    annotations=ToolAnnotations(
        title="Check wallet and quota", read_only_hint=True, idempotent_hint=True, open_world_hint=False
    ),
    input_model=CheckBalanceInput,
    output_model=CheckBalanceOutput,
    run=run,
)
