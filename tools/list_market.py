"""`list_market`: the listings for sale, with the unit price of this moment."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from server.clock import rfc3339
from server.models import Listing
from tools.fields import ConnectionName
from tools.registry import Invocation, StrictInput, ToolSpec


class ListMarketInput(StrictInput):
    connection: ConnectionName | None = Field(None, description="Only listings for this Auth0 connection, e.g. github")
    include_closed: bool = Field(False, description="Also show listings whose sale window has closed")
    limit: Annotated[int, Field(ge=1, le=100)] = Field(25, description="Listings per page (1-100)")
    cursor: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        None, description="next_cursor from the previous page; omit for the first page"
    )


class ListingView(BaseModel):
    listing_id: str = Field(description="Stable id to pass to buy_quota")
    title: str = Field(description="What the listing grants, for people")
    connection: str = Field(description="Auth0 connection the tokens are for, e.g. github")
    scopes: list[str] = Field(description="Provider scopes a holder may request")
    unit_price: int = Field(description="Credits per unit right now")
    start_price: int = Field(description="Credits per unit when the listing opens")
    floor_price: int = Field(description="Credits per unit reached when it closes")
    opens_at: str = Field(description="When buying opens (RFC 3339, UTC)")
    closes_at: str = Field(description="When buying closes (RFC 3339, UTC)")
    supply_remaining: int = Field(description="Units still for sale")
    delivery: Literal["token", "proxy"] = Field(
        description="token: request_token hands you the token; proxy: the token never leaves the broker, "
        "use this quota through call_api"
    )
    api: list[str] = Field(
        description="Base URLs call_api may reach with this quota; empty when call_api cannot use it"
    )
    methods: list[str] = Field(description="HTTP methods call_api may use under api")
    approval: Literal["none", "grant", "writes"] = Field(
        description="none; grant: the account owner approves each new token or grant; writes: that, and also "
        "each call_api whose method is not GET or HEAD"
    )


class ListMarketOutput(BaseModel):
    as_of: str = Field(description="The moment the prices were computed (RFC 3339, UTC)")
    listings: list[ListingView] = Field(description="This page of listings, ordered by listing_id")
    next_cursor: str | None = Field(description="Pass as cursor to get the next page; null on the last page")


async def run(inv: Invocation, params: ListMarketInput) -> ListMarketOutput:
    page = await inv.broker.list_market(
        inv.call,
        inv.principal,
        connection=params.connection,
        include_closed=params.include_closed,
        limit=params.limit,
        cursor=params.cursor,
    )
    # one validation of the whole page (a page is up to 100 listings; this is most of the tool's own time)
    return ListMarketOutput.model_validate(
        {
            "as_of": rfc3339(page.as_of),
            "listings": [_view(p.listing, p.unit_price) for p in page.listings],
            "next_cursor": page.next_cursor,
        }
    )


def _view(listing: Listing, unit_price: int) -> dict[str, object]:
    return {
        "listing_id": listing.id,
        "title": listing.title,
        "connection": listing.connection,
        "scopes": list(listing.scopes),
        "unit_price": unit_price,
        "start_price": listing.start_price,
        "floor_price": listing.floor_price,
        "opens_at": _moment(listing.opens_at),
        "closes_at": _moment(listing.closes_at),
        "supply_remaining": listing.supply_remaining,
        "delivery": listing.delivery,
        "api": list(listing.api),
        "methods": list(listing.methods),
        "approval": listing.approval,
    }


# A listing's window is shown on every page: its text form is kept rather than formatted again.
_moment = lru_cache(maxsize=4096)(rfc3339)


SPEC = ToolSpec(
    name="list_market",
    title="List the quota market",
    description=(
        "List quota listings for sale with their unit price right now (prices fall linearly from "
        "start_price to floor_price over the sale window). Paged: pass next_cursor as cursor."
    ),
    scope="read:market",
    annotations=ToolAnnotations(
        title="List the quota market", read_only_hint=True, idempotent_hint=True, open_world_hint=False
    ),
    input_model=ListMarketInput,
    output_model=ListMarketOutput,
    run=run,
)
