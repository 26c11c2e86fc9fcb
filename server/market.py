"""The market: listings loaded from a TOML file, shown with the price of the moment."""

from __future__ import annotations

import base64
import binascii
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from server.clock import as_utc
from server.errors import InvalidArgument
from server.models import Listing
from server.pricing import is_open, price_at
from server.store import Tx

ListingId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^\S+$")]
MAX_COUNT = 10**12  # units or credits per unit; price × units (≤ 10,000) stays far inside SQLite's 64-bit integers
# strict: `supply = true` or `start_price = "100"` in a market file is a mistake, not a number
Count = Annotated[int, Field(ge=0, le=MAX_COUNT, strict=True)]


class ListingSpec(BaseModel):
    """One `[[listing]]` table of a market file."""

    model_config = ConfigDict(extra="forbid")

    id: ListingId
    title: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    connection: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=50)]
    supply: Count
    start_price: Count
    floor_price: Count
    opens_at: datetime
    closes_at: datetime

    @model_validator(mode="after")
    def _coherent(self) -> ListingSpec:
        if self.floor_price > self.start_price:
            raise ValueError("floor_price must not exceed start_price")
        if self.opens_at.tzinfo is None or self.closes_at.tzinfo is None:
            raise ValueError("opens_at and closes_at need a time zone (e.g. 2026-11-01T00:00:00Z)")
        if self.closes_at <= self.opens_at:
            raise ValueError("closes_at must be after opens_at")
        return self

    def to_listing(self) -> Listing:
        return Listing(
            id=self.id,
            title=self.title,
            connection=self.connection,
            scopes=tuple(sorted(set(self.scopes))),
            supply=self.supply,
            sold=0,
            start_price=self.start_price,
            floor_price=self.floor_price,
            opens_at=as_utc(self.opens_at),
            closes_at=as_utc(self.closes_at),
        )


class MarketFileError(Exception):
    """The market file cannot be read or a listing in it is invalid (message says which)."""


def read_market_file(path: str | Path) -> list[ListingSpec]:
    """Parse and validate a market file. Raises MarketFileError."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise MarketFileError(f"cannot read market file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MarketFileError(f"market file {path} is not valid TOML: {exc}") from exc
    return parse_listings(data, str(path))


def parse_listings(data: dict[str, object], source: str = "market") -> list[ListingSpec]:
    unknown = sorted(set(data) - {"listing"})
    if unknown:  # e.g. [[listings]]: refused, not read as an empty market
        raise MarketFileError(
            f"{source}: unknown table or key {', '.join(repr(k) for k in unknown)}; listings are [[listing]] tables"
        )
    tables = data.get("listing", [])
    if not isinstance(tables, list):
        raise MarketFileError(f"{source}: expected [[listing]] tables")
    specs: list[ListingSpec] = []
    seen: set[str] = set()
    for number, table in enumerate(tables, start=1):
        try:
            spec = ListingSpec.model_validate(table)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'listing'}: {e['msg']}" for e in exc.errors()
            )
            name = table.get("id", f"#{number}") if isinstance(table, dict) else f"#{number}"
            raise MarketFileError(f"{source}: listing {name}: {problems}") from None
        if spec.id in seen:
            raise MarketFileError(f"{source}: listing {spec.id} appears twice")
        seen.add(spec.id)
        specs.append(spec)
    return specs


def load(tx: Tx, specs: list[ListingSpec]) -> int:
    """Upsert listings by id, keeping what was already sold. Raises MarketFileError."""
    for spec in specs:
        existing = tx.get_listing(spec.id)
        if existing is not None and spec.supply < existing.sold:
            raise MarketFileError(
                f"listing {spec.id}: supply {spec.supply} is below the {existing.sold} units already sold"
            )
        tx.upsert_listing(spec.to_listing())
    return len(specs)


@dataclass(frozen=True)
class PricedListing:
    listing: Listing
    unit_price: int
    open: bool


@dataclass(frozen=True)
class Page:
    listings: list[PricedListing]
    next_cursor: str | None
    as_of: datetime


def price_now(listing: Listing, now: datetime) -> PricedListing:
    price = price_at(listing.start_price, listing.floor_price, listing.opens_at, listing.closes_at, now)
    return PricedListing(listing, price, is_open(listing.opens_at, listing.closes_at, now))


def page(
    tx: Tx, *, now: datetime, connection: str | None, include_closed: bool, limit: int, cursor: str | None
) -> Page:
    """One page of listings ordered by id. Raises InvalidArgument for a cursor we did not issue."""
    after = decode_cursor(cursor) if cursor else None
    rows = tx.page_listings(
        after=after, connection=connection, open_at=None if include_closed else now, limit=limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor(rows[-1].id) if more and rows else None
    return Page([price_now(r, now) for r in rows], next_cursor, now)


def encode_cursor(listing_id: str) -> str:
    return base64.urlsafe_b64encode(f"l1:{listing_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("l1:"):
        raise InvalidArgument("cursor is not one list_market returned; omit it to start from the first page")
    return text[3:]
