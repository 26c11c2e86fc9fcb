"""Operator moves: credits or quota units from one account to another (SPEC §11, "allocation").

Double-entry: a credits move is one wallet-to-wallet `transfers` row; a units move takes held units out
of one holding and adds them to the receiver's holding of the same listing, so `sold = held + reserved
+ spent` still holds over the listing's holdings. Each move is one `moves` row that the invariant
checker reconciles with both (server.invariants). A moved unit is the receiver's as a bought one is:
the listing still decides its delivery, API, methods, approval and scopes. Reserved or spent units never
move, and neither do grants.

Each function runs inside one store job and raises a BrokerError before changing anything, so a
refused move leaves the books as they were. With an idempotency key, the same key and arguments again
answer the first move (`replayed` true) without moving anything; other arguments are refused.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import replace
from datetime import datetime

from server.clock import rfc3339
from server.errors import IdempotencyKeyReused, InsufficientFunds, InvalidArgument, NoQuota, UnknownListing
from server.ledger import MAX_BALANCE, MAX_CREDIT, wallet_balance
from server.models import Move
from server.store import Tx

MAX_NAME = 200  # an account or operator name (the CLI's and the console's bound on operator text)
MAX_KEY = 128  # an idempotency key, as buy_quota's
TRANSFER_REASON = "wallet_transfer"


def move_credits(
    tx: Tx, operator: str, from_account: str, to_account: str, amount: int, idempotency_key: str | None,
    now: datetime,
) -> Move:
    """Move `amount` credits from one wallet to another.

    Raises InvalidArgument (bad names or amount, the same account twice, a system account, a balance
    over MAX_BALANCE), IdempotencyKeyReused, InsufficientFunds (a wallet holding less, or none).
    """
    _check(operator, from_account, to_account, amount, idempotency_key)
    request = _fingerprint("credits", from_account, to_account, None, amount)
    earlier = _earlier(tx, idempotency_key, request)
    if earlier is not None:
        return earlier
    for account in (from_account, to_account):
        if tx.account_kind(account) not in (None, "wallet"):
            raise InvalidArgument(f"{account} is a system account, not a wallet")
    balance = wallet_balance(tx, from_account)
    if balance < amount:
        raise InsufficientFunds(
            f"cannot move {amount} credits: {from_account}'s wallet holds {balance}; nothing was moved"
        )
    tx.ensure_wallet(to_account)
    if wallet_balance(tx, to_account) + amount > MAX_BALANCE:
        raise InvalidArgument(f"a wallet may hold at most {MAX_BALANCE:,} credits; nothing was moved")
    move_id, ts = _new_id(), rfc3339(now)
    transfer_id = tx.transfer(from_account, to_account, amount, TRANSFER_REASON, move_id, ts)
    move = Move(move_id, "credits", from_account, to_account, None, amount, wallet_balance(tx, from_account),
                wallet_balance(tx, to_account), operator, ts)
    tx.insert_move(move, idempotency_key=idempotency_key, fingerprint=request, transfer_id=transfer_id)
    return move


def move_units(
    tx: Tx, operator: str, from_account: str, to_account: str, listing_id: str, units: int,
    idempotency_key: str | None, now: datetime,
) -> Move:
    """Move `units` held units of a listing from one account's holding to another's.

    Raises InvalidArgument (bad names or units, the same account twice, a system account),
    IdempotencyKeyReused, UnknownListing, NoQuota (fewer units held than asked: reserved ones do not count).
    """
    _check(operator, from_account, to_account, units, idempotency_key)
    if not listing_id or len(listing_id) > MAX_NAME:
        raise InvalidArgument(f"the listing id must be 1 to {MAX_NAME} characters")
    request = _fingerprint("units", from_account, to_account, listing_id, units)
    earlier = _earlier(tx, idempotency_key, request)
    if earlier is not None:
        return earlier
    if tx.get_listing(listing_id) is None:
        raise UnknownListing(f"no listing {listing_id!r}; `market list` shows them")
    if tx.account_kind(to_account) not in (None, "wallet"):
        raise InvalidArgument(f"{to_account} is a system account: it cannot hold quota")
    holding = next((h for h in tx.holdings_of(from_account) if h.listing_id == listing_id), None)
    held = 0 if holding is None else holding.units_held
    if held < units:
        reserved = 0 if holding is None else holding.units_reserved
        extra = f" ({reserved} more are reserved, which cannot be moved)" if reserved else ""
        raise NoQuota(
            f"cannot move {units} units of {listing_id}: {from_account} holds {held}{extra}; nothing was moved"
        )
    move_id, ts = _new_id(), rfc3339(now)
    if not tx.take_units(from_account, listing_id, units):  # pragma: no cover - checked in this transaction
        raise NoQuota(f"{from_account} no longer holds {units} units of {listing_id}")
    tx.ensure_wallet(to_account)  # the receiver is an account `wallet show` knows, as after a credit
    received = tx.add_units(to_account, listing_id, units, ts)
    move = Move(move_id, "units", from_account, to_account, listing_id, units, held - units, received.units_held,
                operator, ts)
    tx.insert_move(move, idempotency_key=idempotency_key, fingerprint=request, transfer_id=None)
    return move


def name_ok(name: str) -> bool:
    """An operator or account name a move accepts: 1 to MAX_NAME characters on one line."""
    return bool(name.strip()) and len(name) <= MAX_NAME and not any(ch in name for ch in "\r\n\x00")


def _check(operator: str, from_account: str, to_account: str, amount: int, idempotency_key: str | None) -> None:
    for what, name in (("operator", operator), ("from account", from_account), ("to account", to_account)):
        if not name_ok(name):
            raise InvalidArgument(f"the {what} must be 1 to {MAX_NAME} characters on one line")
    if from_account == to_account:
        raise InvalidArgument("the accounts to move from and to must differ")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_CREDIT:
        raise InvalidArgument(f"the amount must be a whole number from 1 to {MAX_CREDIT:,}")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
        raise InvalidArgument(f"the idempotency key must be 1 to {MAX_KEY} characters")


def _fingerprint(kind: str, from_account: str, to_account: str, listing_id: str | None, amount: int) -> str:
    body = json.dumps([kind, from_account, to_account, listing_id, amount], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _earlier(tx: Tx, idempotency_key: str | None, request: str) -> Move | None:
    """The move this key already made, as a replay; raises IdempotencyKeyReused if it made another."""
    if idempotency_key is None:
        return None
    found = tx.find_move(idempotency_key)
    if found is None:
        return None
    move, earlier_request = found
    if earlier_request != request:
        what = f"{move.amount} credits" if move.kind == "credits" else f"{move.amount} units of {move.listing_id}"
        raise IdempotencyKeyReused(
            f"idempotency key {idempotency_key!r} was already used for another move ({what} from "
            f"{move.from_account} to {move.to_account}); use a new key"
        )
    return replace(move, replayed=True)


def _new_id() -> str:
    return "mov_" + secrets.token_hex(12)
