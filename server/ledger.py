"""Wallets, purchases and quota units: double-entry, integer credits (SPEC §5).

Each function runs inside one store job (a transaction). They raise BrokerErrors
before changing anything, so a refused call leaves the books as they were.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime

from server.clock import rfc3339
from server.errors import (
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidArgument,
    ListingClosed,
    NoQuota,
    PriceAboveLimit,
    ProxyOnly,
    ScopeNotCovered,
    SoldOut,
    UnknownListing,
)
from server.models import Holding, Listing, Receipt
from server.pricing import is_open, price_at
from server.store import Tx

MARKET = "market"
MINT = "mint"
MAX_CREDIT = 10**12  # per credit; keeps every balance far inside SQLite's 64-bit integers
MAX_BALANCE = 10**15


def wallet_balance(tx: Tx, account: str) -> int:
    return tx.balance(account) or 0


def credit(tx: Tx, account: str, amount: int, now: datetime, reason: str = "operator credit") -> int:
    """Mint `amount` credits into `account`'s wallet; return the new balance."""
    if amount <= 0 or amount > MAX_CREDIT:
        raise InvalidArgument(f"the amount must be a whole number of credits from 1 to {MAX_CREDIT:,}")
    if tx.account_kind(account) not in (None, "wallet"):
        raise InvalidArgument(f"{account} is a system account, not a wallet")
    tx.ensure_wallet(account)
    if wallet_balance(tx, account) + amount > MAX_BALANCE:
        raise InvalidArgument(f"a wallet may hold at most {MAX_BALANCE:,} credits")
    tx.transfer(MINT, account, amount, reason, None, rfc3339(now))
    return wallet_balance(tx, account)


def fingerprint(listing_id: str, units: int, max_unit_price: int) -> str:
    body = json.dumps([listing_id, units, max_unit_price], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def buy(
    tx: Tx,
    account: str,
    listing_id: str,
    units: int,
    max_unit_price: int,
    idempotency_key: str | None,
    now: datetime,
    admit: Callable[[Listing, int], None] | None = None,
) -> Receipt:
    """Spend wallet credits on `units` of a listing at today's price.

    `admit(listing, total)` may refuse a new purchase (the operator's policy) before anything moves.
    Raises IdempotencyKeyReused, UnknownListing, ListingClosed, PriceAboveLimit,
    SoldOut or InsufficientFunds, or what `admit` raises; nothing is changed when it raises.
    """
    # what a retry with the same key must repeat exactly (only kept when there is a key to retry with)
    request = fingerprint(listing_id, units, max_unit_price) if idempotency_key is not None else ""
    earlier, listing, balance, held = tx.buy_context(account, listing_id, idempotency_key)
    if earlier is not None:
        receipt, earlier_request = earlier
        if earlier_request != request:
            raise IdempotencyKeyReused(
                f"idempotency_key {idempotency_key!r} was already used for a different purchase "
                f"({receipt.units} units of {receipt.listing_id}); use a new key"
            )
        return receipt
    if listing is None:
        raise UnknownListing(f"no listing {listing_id!r}; call list_market to see what is for sale")
    if not is_open(listing.opens_at, listing.closes_at, now):
        when = "opens at " + rfc3339(listing.opens_at) if now < listing.opens_at else "closed at " + rfc3339(
            listing.closes_at
        )
        raise ListingClosed(f"listing {listing_id} cannot be bought now: it {when}")
    unit_price = price_at(listing.start_price, listing.floor_price, listing.opens_at, listing.closes_at, now)
    if unit_price > max_unit_price:
        raise PriceAboveLimit(
            f"the unit price of {listing_id} is {unit_price} credits, above your max_unit_price of "
            f"{max_unit_price}; raise the limit or wait for the price to fall"
        )
    if listing.supply_remaining < units:
        raise SoldOut(f"listing {listing_id} has {listing.supply_remaining} units left; you asked for {units}")
    total = unit_price * units
    balance = balance or 0
    if balance < total:
        raise InsufficientFunds(
            f"{units} units of {listing_id} cost {total} credits; the wallet holds {balance}"
        )
    if admit is not None:
        admit(listing, total)
    ts = rfc3339(now)
    purchase_id = "pur_" + secrets.token_hex(12)
    receipt = Receipt(
        purchase_id=purchase_id,
        listing_id=listing_id,
        units=units,
        unit_price=unit_price,
        total=total,
        balance_after=balance - total,
        units_held=held + units,
        purchased_at=ts,
    )
    if not tx.sell(receipt, account=account, market=MARKET, idempotency_key=idempotency_key, fingerprint=request):
        raise SoldOut(f"listing {listing_id} sold out")  # pragma: no cover - guarded above in the same transaction
    return receipt


# Narrows the covering holdings to those whose listing allows this use of them; raises the BrokerError
# that says why when none does (proxy_only, api_not_allowed).
Fit = Callable[[list[Holding]], list[Holding]]


def choose_holding(
    holdings: Sequence[Holding], connection: str, scopes: Sequence[str], fit: Fit | None = None
) -> Holding:
    """The covering holding to spend: fewest scopes first (least privilege), then the oldest.

    Raises NoQuota or ScopeNotCovered, or what `fit` raises.
    """
    wanted = set(scopes)
    if not holdings:
        raise NoQuota(f"you hold no quota for connection {connection}; buy some with buy_quota")
    covering = [h for h in holdings if wanted <= set(h.scopes)]
    if not covering:
        offered = sorted({s for h in holdings for s in h.scopes})
        missing = sorted(wanted - set(offered))
        raise ScopeNotCovered(
            f"no holding for {connection} covers scopes {' '.join(sorted(wanted))}"
            + (f" (missing: {' '.join(missing)})" if missing else " together")
            + f"; your {connection} holdings cover {' '.join(offered)}"
        )
    if fit is not None:
        covering = fit(covering)
    usable = [h for h in covering if h.units_held > 0]
    if not usable:
        raise NoQuota(
            f"your holdings for {connection} that cover these scopes have no units left; buy more with buy_quota"
        )
    return min(usable, key=lambda h: (len(h.scopes), h.created_at, h.id))


def reserve(
    tx: Tx, account: str, connection: str, scopes: Sequence[str], owner: str, now: datetime, fit: Fit | None = None
) -> tuple[str, Holding]:
    """Reserve one unit from the right holding; return the reservation id and the holding."""
    return _take_unit(
        tx, account, connection, scopes,
        lambda holding, rid: tx.reserve_unit(holding, rid, owner, rfc3339(now), chosen=True), fit,
    )


def spend(
    tx: Tx, account: str, connection: str, scopes: Sequence[str], now: datetime, fit: Fit | None = None,
    holding: Holding | None = None,
) -> tuple[str, int]:
    """Spend one unit from the right holding at once, as a committed reservation (the token is already
    in hand), or from `holding` when the caller chose it in this transaction already. Return the
    reservation id and the units left in that holding."""
    def take(holding_id: int, rid: str) -> bool:
        return tx.spend_unit(holding_id, rid, rfc3339(now), chosen=True)

    if holding is None:
        reservation_id, holding = _take_unit(tx, account, connection, scopes, take, fit)
    else:
        reservation_id = _take_from(holding, connection, take)
    return reservation_id, holding.units_held - 1


def tokens_may_leave(connection: str) -> Fit:
    """request_token's fit: only listings that deliver tokens (`delivery = "token"`) may hand one out."""

    def fit(covering: list[Holding]) -> list[Holding]:
        out = [h for h in covering if h.delivery == "token"]
        if not out:
            raise ProxyOnly(
                f"your {connection} quota for these scopes is proxy-only: its token never leaves the broker; "
                "use call_api to call the provider's API with it"
            )
        return out

    return fit


def _take_unit(
    tx: Tx, account: str, connection: str, scopes: Sequence[str], take: Callable[[int, str], bool],
    fit: Fit | None = None,
) -> tuple[str, Holding]:
    """Pick the holding to spend (least privilege) and `take(holding_id, reservation_id)` one unit of it."""
    holding = choose_holding(tx.holdings_of(account, connection), connection, scopes, fit)
    return _take_from(holding, connection, take), holding


def _take_from(holding: Holding, connection: str, take: Callable[[int, str], bool]) -> str:
    reservation_id = "res_" + secrets.token_hex(12)
    if not take(holding.id, reservation_id):  # pragma: no cover - chosen in the same transaction (see Tx.reserve_unit)
        raise NoQuota(f"no units left for {connection}")
    return reservation_id


def settle(tx: Tx, reservation_id: str, committed: bool, now: datetime) -> bool:
    """Commit (spend) or refund a pending reservation; False when it was already settled."""
    return tx.settle_reservation(reservation_id, "committed" if committed else "refunded", rfc3339(now))


def units_remaining(tx: Tx, account: str, holding_id: int) -> int:
    return next((h.units_held for h in tx.holdings_of(account) if h.id == holding_id), 0)
