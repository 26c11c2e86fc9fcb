"""`check_balance`: the caller's own wallet and quota holdings."""

from __future__ import annotations

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
    units_remaining: int = Field(description="Units left to spend with request_token")


class CheckBalanceOutput(BaseModel):
    account: str = Field(description="Your account (the token's subject)")
    balance: int = Field(description="Wallet balance in credits")
    holdings: list[HoldingView] = Field(description="Quota you hold, per listing")
    as_of: str = Field(description="When this was read (RFC 3339, UTC)")


async def run(inv: Invocation, params: CheckBalanceInput) -> CheckBalanceOutput:
    found = await inv.broker.check_balance(inv.call, inv.principal)
    return CheckBalanceOutput(
        account=found.account,
        balance=found.balance,
        holdings=[
            HoldingView(
                listing_id=h.listing_id, connection=h.connection, scopes=list(h.scopes), units_remaining=h.units_held
            )
            for h in found.holdings
        ],
        as_of=rfc3339(found.as_of),
    )


SPEC = ToolSpec(
    name="check_balance",
    title="Check wallet and quota",
    description="Show your wallet balance (credits) and the quota units you hold for each listing.",
    scope="read:balance",
    annotations=ToolAnnotations(
        title="Check wallet and quota", read_only_hint=True, idempotent_hint=True, open_world_hint=False
    ),
    input_model=CheckBalanceInput,
    output_model=CheckBalanceOutput,
    run=run,
)
