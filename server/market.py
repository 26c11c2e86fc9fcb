"""The market: listings loaded from a TOML file, shown with the price of the moment."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from server.api_url import normalise_base
from server.clock import as_utc
from server.errors import InvalidArgument
from server.models import Listing
from server.pricing import is_open, price_at
from server.store import Tx
from server.textsafe import escape_controls
from server.tomlfile import read_toml

ListingId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^\S+$")]
MAX_COUNT = 10**12  # units or credits per unit; price × units (≤ 10,000) stays far inside SQLite's 64-bit integers
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
ApiBase = Annotated[str, StringConstraints(min_length=1, max_length=2000), AfterValidator(normalise_base)]
Delivery = Literal["token", "proxy"]
Approval = Literal["none", "grant", "writes"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
METHODS: tuple[HttpMethod, ...] = get_args(HttpMethod)  # also the order methods are stored and shown in
DEFAULT_METHODS: tuple[HttpMethod, ...] = ("GET", "HEAD")


class ListingSpec(BaseModel):
    """One `[[listing]]` table of a market file."""

    # strict: `supply = true`, `title = 5`, `scopes = "repo"` or `opens_at = "2026-11-01"` (a string, not
    # a TOML date-time) in a market file is a mistake, not something to guess the meaning of
    model_config = ConfigDict(extra="forbid", strict=True)

    id: ListingId
    title: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    connection: Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=50)]
    supply: Count
    start_price: Count
    floor_price: Count
    opens_at: datetime
    closes_at: datetime
    # §8–§9, optional
    delivery: Delivery = "token"
    api: Annotated[list[ApiBase], Field(min_length=1, max_length=20)] | None = None
    methods: Annotated[list[HttpMethod], Field(min_length=1, max_length=len(METHODS))] = list(DEFAULT_METHODS)
    approval: Approval = "none"

    @field_validator("methods")
    @classmethod
    def _each_method_once(cls, methods: list[str]) -> list[str]:
        for method in methods:
            if methods.count(method) > 1:
                raise ValueError(f"{method} appears more than once")
        return [m for m in METHODS if m in methods]

    @model_validator(mode="after")
    def _coherent(self) -> ListingSpec:
        # each message starts with the key it is about
        if self.floor_price > self.start_price:
            raise ValueError(f"floor_price: {self.floor_price} must not exceed start_price {self.start_price}")
        for key, moment in (("opens_at", self.opens_at), ("closes_at", self.closes_at)):
            if moment.tzinfo is None:
                raise ValueError(f"{key}: needs a time zone (e.g. 2026-11-01T00:00:00Z)")
        if self.closes_at <= self.opens_at:
            raise ValueError("closes_at: must be after opens_at")
        if self.delivery == "proxy" and self.api is None:
            raise ValueError(
                'api: required when delivery = "proxy" (the base URLs call_api may reach, '
                'e.g. api = ["https://api.github.com"])'
            )
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
            delivery=self.delivery,
            api=tuple(sorted(set(self.api or ()))),
            methods=tuple(self.methods),
            approval=self.approval,
        )


class MarketFileError(Exception):
    """The market file cannot be read or a listing in it is invalid (message says which)."""


def read_market_file(path: str | Path) -> list[ListingSpec]:
    """Parse and validate a market file. Raises MarketFileError."""
    return parse_listings(read_toml(path, "market", MarketFileError), str(path))


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
            problems = "; ".join(_problem(e) for e in exc.errors())
            name = table.get("id", f"#{number}") if isinstance(table, dict) else f"#{number}"
            raise MarketFileError(f"{source}: listing {escape_controls(str(name))}: {problems}") from None
        if spec.id in seen:
            raise MarketFileError(f"{source}: listing {spec.id} appears twice")
        seen.add(spec.id)
        specs.append(spec)
    return specs


def _problem(error: ErrorDetails) -> str:
    """One validation error as `key: what is wrong` (a model-level message names its key itself)."""
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    kind = error["type"]
    if kind == "extra_forbidden":
        text = f"unknown key; a listing has {', '.join(ListingSpec.model_fields)}"
    elif kind == "value_error":
        text = str(error.get("ctx", {}).get("error", error["msg"]))
    else:
        text = error["msg"]
        if kind.endswith("_type"):  # the strict model met a value of another TOML type
            text += f", not {_toml_kind(error['input'])}"
            if kind == "datetime_type":
                text += " (write a TOML date-time with a zone and without quotes, e.g. 2026-11-01T00:00:00Z)"
    return f"{where}: {text}" if where else text


def _toml_kind(value: object) -> str:
    kinds: list[tuple[type, str]] = [
        (bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"), (list, "an array"),
        (dict, "a table"), (datetime, "a date-time"), (date, "a date without a time"), (time, "a time of day"),
    ]
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def load(tx: Tx, specs: list[ListingSpec]) -> int:
    """Upsert listings by id, keeping what was already sold. Raises MarketFileError.

    What was sold stays what it was: supply cannot drop below it, and a listing with units sold
    keeps its connection and scopes (holdings read them from the listing).
    """
    for spec in specs:
        listing = spec.to_listing()
        existing = tx.get_listing(spec.id)
        if existing is not None:
            _check_change(existing, listing)
        tx.upsert_listing(listing)
    return len(specs)


def _check_change(old: Listing, new: Listing) -> None:
    if new.supply < old.sold:
        raise MarketFileError(f"listing {new.id}: supply {new.supply} is below the {old.sold} units already sold")
    if old.sold == 0:
        return
    for key, before, after in (
        ("connection", old.connection, new.connection),
        ("scopes", sorted(set(old.scopes)), sorted(set(new.scopes))),
    ):
        if before != after:
            raise MarketFileError(
                f"listing {new.id}: {key}: cannot change from {json.dumps(before)} to {json.dumps(after)}: "
                f"{old.sold} units were already sold under it; add a listing with a new id instead"
            )
    if old.delivery == "proxy" and new.delivery == "token":  # would let tokens bought to stay in the broker out
        raise MarketFileError(
            f'listing {new.id}: delivery: cannot change from "proxy" to "token": {old.sold} units were already '
            "sold on the promise that their tokens never leave the broker; add a listing with a new id instead"
        )


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
