"""Plain records the domain and the store exchange. No behaviour, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple


@dataclass(frozen=True)
class Listing:
    id: str
    title: str
    connection: str
    scopes: tuple[str, ...]
    supply: int
    sold: int
    start_price: int
    floor_price: int
    opens_at: datetime
    closes_at: datetime
    delivery: str  # "token": request_token may hand the token out; "proxy": only call_api spends it (§8)
    api: tuple[str, ...]  # base URLs call_api may reach, normalised (server.api_url); () = none
    methods: tuple[str, ...]  # HTTP methods call_api may use under `api`
    approval: str  # "none" | "grant" | "writes" (§9)

    @property
    def supply_remaining(self) -> int:
        return self.supply - self.sold


@dataclass(frozen=True)
class Holding:
    id: int
    account: str
    listing_id: str
    connection: str
    scopes: tuple[str, ...]
    units_bought: int
    units_held: int
    units_consumed: int
    units_reserved: int
    created_at: str
    # the listing's terms (§8–§9): what the holding's units may be spent on
    delivery: str = "token"
    api: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("GET", "HEAD")
    approval: str = "none"


@dataclass(frozen=True)
class Grant:
    """A brokered grant (§8): one unit bought the right to call `connection`'s API with `scopes` until
    `expires_at`. The token itself is never stored; `token_id` is its fingerprint."""

    id: str
    account: str
    agent: str
    connection: str
    scopes: tuple[str, ...]
    login_hint: str | None
    holding_id: int
    reservation_id: str
    token_id: bytes
    opened_at: datetime
    expires_at: datetime
    closed_at: datetime | None = None


@dataclass(frozen=True)
class Receipt:
    purchase_id: str
    listing_id: str
    units: int
    unit_price: int
    total: int
    balance_after: int
    units_held: int
    purchased_at: str


@dataclass(frozen=True)
class Move:
    """An operator's move of credits or quota units from one account to another (SPEC §11).

    `amount` is credits (`kind` "credits") or units of `listing_id` (`kind` "units"); `from_after` and
    `to_after` are the two balances, or the two accounts' units held of the listing, right after the move.
    `replayed` is true when this is the answer to a retry with the same idempotency key (nothing moved).
    """

    move_id: str
    kind: str
    from_account: str
    to_account: str
    listing_id: str | None
    amount: int
    from_after: int
    to_after: int
    operator: str
    moved_at: str
    replayed: bool = False


@dataclass(frozen=True)
class Reservation:
    id: str
    holding_id: int
    account: str
    listing_id: str
    connection: str
    scopes: tuple[str, ...]
    owner: str
    created_at: str
    agent: str | None = None
    tool: str | None = None  # request_token or call_api (None: reserved before schema 5)
    lease_until: datetime | None = None  # after this any process may refund it (None: before schema 6)


class AuditRecord(NamedTuple):
    """One audit event as read back (names resolved, hashes as raw bytes).

    `prev_hash` is the previous event's hash (32 zero bytes for the first event; None when the
    previous event is missing from the store).
    """

    id: int
    ts: str
    account: str | None
    agent: str | None
    tool: str | None
    transport: str
    scope: str | None
    outcome: str
    code: str | None
    args: str
    token_id: bytes | None
    latency_ms: float | None
    prev_hash: bytes | None
    hash: bytes
