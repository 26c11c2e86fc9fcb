"""`buy_quota`: spend wallet credits on units of a listing, idempotently with a key."""

from __future__ import annotations

from typing import Annotated

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from tools.fields import ListingId
from tools.registry import Invocation, StrictInput, ToolSpec


class BuyQuotaInput(StrictInput):
    listing_id: ListingId = Field(description="The listing to buy from (see list_market)")
    units: Annotated[int, Field(ge=1, le=10_000)] = Field(description="How many units to buy (1-10000)")
    max_unit_price: Annotated[int, Field(ge=0)] = Field(
        description="The most you accept to pay per unit; prices move, so the purchase fails above it"
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="Reuse to retry safely: the same key and arguments return the same receipt, charged once"
    )


class BuyQuotaOutput(BaseModel):
    purchase_id: str = Field(description="Receipt id")
    listing_id: str = Field(description="The listing bought from")
    units: int = Field(description="Units bought")
    unit_price: int = Field(description="Credits paid per unit")
    total: int = Field(description="Credits paid in all")
    balance_after: int = Field(description="Wallet balance right after the purchase")
    units_held: int = Field(description="Units of this listing held right after the purchase")
    purchased_at: str = Field(description="When it was bought (RFC 3339, UTC)")


async def run(inv: Invocation, params: BuyQuotaInput) -> BuyQuotaOutput:
    receipt = await inv.broker.buy_quota(
        inv.call,
        inv.principal,
        listing_id=params.listing_id,
        units=params.units,
        max_unit_price=params.max_unit_price,
        idempotency_key=params.idempotency_key,
    )
    return BuyQuotaOutput.model_validate(receipt, from_attributes=True)  # the receipt's fields, one to one


SPEC = ToolSpec(
    name="buy_quota",
    title="Buy quota",
    description=(
        "Buy units of a listing at its current unit price, paid from your wallet. State max_unit_price; "
        "pass an idempotency_key to retry safely."
    ),
    scope="buy:quota",
    annotations=ToolAnnotations(
        title="Buy quota",
        read_only_hint=False,
        destructive_hint=False,
        idempotent_hint=True,
        open_world_hint=False,
    ),
    input_model=BuyQuotaInput,
    output_model=BuyQuotaOutput,
    run=run,
)
