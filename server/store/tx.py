"""Every SQL statement of the broker. Domain code calls these methods inside a job.

`Tx` is the whole surface, written once in the SQL that SQLite and PostgreSQL both speak (`?`
placeholders, upserts with qualified columns, CASE rather than two-argument max); a backend's
subclass supplies its connection's `execute` and the few statements whose dialects differ
(`SqliteTx` here, `server.store.postgres.PgTx`). Nothing outside `server/store` writes SQL.

A job may run more than once (PostgreSQL retries a whole batch after a deadlock or a lost
connection) or be rolled back after it ran (its savepoint, or a failed COMMIT). Python state a
job changes must follow the database: audit name ids count only once committed, and a job that
changes other state registers how to put it back with `on_undo`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from server.models import AuditRecord, ConnectLink, Grant, Holding, Listing, Move, Receipt, Reservation

_LISTING_COLUMNS = (
    "id, title, connection, scopes, supply, sold, start_price, floor_price, opens_at, closes_at, "
    "delivery, api, methods, approval"
)
HOLDING_COLUMNS = """
    h.id, h.account, h.listing_id, l.connection, l.scopes, h.units_bought, h.units_held,
    h.units_consumed, h.units_reserved, h.created_at, l.delivery, l.api, l.methods, l.approval
"""
_MOVE_COLUMNS = (
    "id, kind, from_account, to_account, listing_id, amount, from_after, to_after, operator, moved_at"
)
_HOLDING_SELECT = f"SELECT {HOLDING_COLUMNS} FROM holdings h JOIN listings l ON l.id = h.listing_id"
ADD_UNITS = (
    "INSERT INTO holdings(account, listing_id, units_bought, units_held, created_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(account, listing_id) DO UPDATE SET "
    "units_bought = holdings.units_bought + excluded.units_bought, "
    "units_held = holdings.units_held + excluded.units_held"
)
# a transfer's two balances in one statement (debit = credit moves nothing, as two updates would)
MOVE = (
    "UPDATE accounts SET balance = balance - CASE WHEN name = ? THEN ? ELSE 0 END "
    "+ CASE WHEN name = ? THEN ? ELSE 0 END WHERE name IN (?, ?)"
)
ADD_SOLD = "UPDATE listings SET sold = sold + ? WHERE id = ? AND sold + ? <= supply"
TRANSFER = "INSERT INTO transfers(ts, debit, credit, amount, reason, reference) VALUES (?, ?, ?, ?, ?, ?)"
TAKE_UNIT = "UPDATE holdings SET units_held = units_held - 1, {into} = {into} + 1 WHERE id = ? AND units_held > 0"
RESERVATION = (
    "INSERT INTO reservations(id, holding_id, status, owner, created_at, settled_at) VALUES (?, ?, ?, ?, ?, ?)"
)
_GRANT_COLUMNS = (
    "id, account, agent, connection, scopes, login_hint, holding_id, reservation_id, token_id, opened_at, "
    "expires_at, closed_at"
)
_LINK_COLUMNS = (
    "id, account, agent, connection, scopes, elicitation_id, created_at, expires_at, status, finished_at"
)
_BALANCE = "SELECT balance FROM accounts WHERE name = ?"
PURCHASE_COLUMNS = (
    "id, account, listing_id, units, unit_price, total, balance_after, units_held, purchased_at, idempotency_key, "
    "fingerprint, transfer_id"
)
_FIND_PURCHASE = (
    "SELECT id, listing_id, units, unit_price, total, balance_after, units_held, purchased_at, fingerprint "
    "FROM purchases WHERE account = ? AND idempotency_key = ?"
)
_HOLDINGS_OF = _HOLDING_SELECT + " WHERE h.account = ? ORDER BY h.id"
_LIVE_GRANTS = (
    f"SELECT {_GRANT_COLUMNS} FROM grants WHERE account = ? AND agent = ? AND expires_at > ? "
    "AND closed_at IS NULL ORDER BY expires_at, id"
)
_HOLDINGS_ON = _HOLDING_SELECT + " WHERE h.account = ? AND l.connection = ? ORDER BY h.id"
_LIVE_GRANTS_FOR = (
    f"SELECT {_GRANT_COLUMNS} FROM grants WHERE account = ? AND agent = ? AND connection = ? AND scopes = ? "
    "AND login_hint = ? AND expires_at > ? AND closed_at IS NULL ORDER BY expires_at DESC, id"
)
_GENESIS = bytes(32)  # the first event chains from this (server.audit.GENESIS)
# An audit row as stored, names as ids into audit_names (what `audit verify` walks)
_AUDIT_ROW = "id, ts, account, agent, tool, transport, scope, outcome, code, args, token_id, latency_ms, hash"
INSERT_AUDIT = f"INSERT INTO audit({_AUDIT_ROW}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# The meta key of the audit chain's recorded head, `id:hash` of its newest event (server.audit)
AUDIT_HEAD_KEY = "audit_head"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    return (moment.astimezone(UTC) - _EPOCH) // _MICROSECOND  # exact: timedelta arithmetic is integral


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


@lru_cache(maxsize=4096)
def _strings(stored: str) -> tuple[str, ...]:
    # a listing's scopes, api bases and methods are a few distinct JSON texts read over and over
    # (every page, every holding)
    return tuple(json.loads(stored))


@dataclass(frozen=True)
class AuditFilter:
    account: str | None = None
    agent: str | None = None
    tool: str | None = None
    outcome: str | None = None
    since: str | None = None
    until: str | None = None
    token_id: bytes | None = None
    code: str | None = None
    before_id: int | None = None  # keyset paging (the console): only events older / newer than this id
    after_id: int | None = None


@dataclass(frozen=True)
class LedgerTotals:
    """Raw sums the invariant checker compares."""

    balance_sum: int
    negative_wallets: list[str]
    balance_mismatches: list[str]
    holding_mismatches: list[int]
    oversold_listings: list[str]
    sold_mismatches: list[str]
    reserved_mismatches: list[int]
    unplaced_listings: list[str]  # sold ≠ held + reserved + spent over its holdings
    move_mismatches: list[str]  # credits moves that differ from their transfer (or have none)
    unmoved_transfers: list[int]  # wallet_transfer transfers that no move made


# Where a transaction's bookkeeping stood (see Tx.mark): its new audit names and its undo hooks so far
Mark = tuple[dict[str, int], int]


class Tx:
    """A transaction in progress. Subclasses set `_x` (execute one statement: a cursor) and the dialect hooks."""

    _x: Callable[..., Any]

    def __init__(self, names: dict[str, int] | None = None) -> None:
        # ids of audit names committed before this transaction (shared by the database's transactions),
        # and the ones this transaction found or added, which count only once it commits
        self._names: dict[str, int] = {} if names is None else names
        self._new_names: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []  # puts back Python state this transaction's jobs changed
        # the last audit event this transaction wrote and still holds (id, hash): a store that lost its
        # connection while committing can ask the database whether the transaction landed
        self.last_event: tuple[int, bytes] | None = None

    # ---- bookkeeping: what holds only if the transaction commits ---------------------------
    def on_undo(self, undo: Callable[[], None]) -> None:
        """Run `undo` if what was just done is rolled back (its savepoint, the whole transaction, a retry)."""
        self._undo.append(undo)

    def mark(self) -> Mark:
        """Where this transaction's names and undo hooks stand; `undo(mark)` after a rollback to here."""
        return (dict(self._new_names) if self._new_names else {}, len(self._undo))

    def undo(self, mark: Mark) -> None:
        names, hooks = mark
        self._new_names = names
        while len(self._undo) > hooks:
            self._undo.pop()()  # newest first

    def committed(self) -> None:
        """The transaction committed: its names' ids hold for good (names are never removed)."""
        if self._new_names:
            self._names.update(self._new_names)
            self._new_names = {}
        self._undo.clear()

    def rolled_back(self) -> None:
        """The whole transaction was rolled back: nothing it did holds."""
        self.undo(({}, 0))

    def prefetch(self, reads: Callable[[], object]) -> None:
        """`reads` calls read methods of this Tx whose statements depend on nothing they read: PgTx sends
        their statements with the next round trip and answers the same reads asked again from them, until
        the transaction writes. Here, where a read costs no round trip, nothing is done."""

    def _w(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A write whose result no step reads (PgTx sends it with the next statement that needs an answer)."""
        self._x(sql, params)

    def savepoint(self) -> Mark:
        """Open a nested savepoint; undo it with `rollback_savepoint(mark)` or keep it with `release_savepoint`."""
        self._x("SAVEPOINT atomic")
        return self.mark()

    def rollback_savepoint(self, mark: Mark) -> None:
        self._x("ROLLBACK TO atomic")
        self._x("RELEASE atomic")
        self.undo(mark)

    def release_savepoint(self) -> None:
        self._x("RELEASE atomic")

    # ---- what each dialect says its own way ----------------------------------------------
    def get_meta(self, key: str) -> bytes | None:
        """The value stored under `key` (bytes or text, as it was set), None when there is none."""
        raise NotImplementedError

    def set_meta(self, key: str, value: bytes | str) -> None:
        raise NotImplementedError

    def control_version(self) -> int:
        """A number that changes with every block, unblock and policy load (0 before the first)."""
        raise NotImplementedError

    def bump_control_version(self) -> None:
        raise NotImplementedError

    def _insert_id(self, sql: str, params: Sequence[Any]) -> int:
        """Run an INSERT into a table with an integer `id` the database assigns; that id."""
        raise NotImplementedError

    def _arg(self, key: str) -> str:
        """SQL for the text of audit `args`' member `key`."""
        raise NotImplementedError

    def _arg_true(self, key: str) -> str:
        """SQL that holds when audit `args`' member `key` is true."""
        raise NotImplementedError

    # ---- accounts and transfers -----------------------------------------------------------
    def ensure_wallet(self, name: str) -> None:
        self._w("INSERT INTO accounts(name, kind) VALUES (?, 'wallet') ON CONFLICT DO NOTHING", (name,))

    def balance(self, name: str) -> int | None:
        row = self._x(_BALANCE, (name,)).fetchone()
        return None if row is None else int(row[0])

    def balance_sheet(self, account: str, agent: str, now: datetime) -> tuple[int | None, list[Holding], list[Grant]]:
        """What check_balance shows: the wallet's balance (None: no wallet), its holdings, the agent's live grants."""
        balance, holdings, grants = self._fetch_all(
            [(_BALANCE, (account,)), (_HOLDINGS_OF, (account,)), (_LIVE_GRANTS, (account, agent, to_micros(now)))]
        )
        return (
            None if not balance else int(balance[0][0]), [_holding(r) for r in holdings], [_grant(r) for r in grants]
        )

    def _fetch_all(self, reads: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """Every row of each of these reads (statement, parameters), in order (PgTx sends them together)."""
        return [self._x(sql, params).fetchall() for sql, params in reads]

    def wallets(self, limit: int) -> list[tuple[str, int]]:
        """(name, balance) of the first `limit` wallets by name (the console's Wallets page)."""
        rows = self._x("SELECT name, balance FROM accounts WHERE kind = 'wallet' ORDER BY name LIMIT ?", (limit,))
        return [(str(r[0]), int(r[1])) for r in rows.fetchall()]

    def account_kind(self, name: str) -> str | None:
        row = self._x("SELECT kind FROM accounts WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def transfer(self, debit: str, credit: str, amount: int, reason: str, reference: str | None, ts: str) -> int:
        """Move `amount` from `debit` to `credit`; the CHECKs keep wallets non-negative."""
        self._x(MOVE, (debit, amount, credit, amount, debit, credit))
        return self._insert_id(TRANSFER, (ts, debit, credit, amount, reason, reference))

    # ---- listings -------------------------------------------------------------------------
    def upsert_listing(self, listing: Listing) -> None:
        """Insert or update by id; `sold` is kept as it is."""
        self._w(
            f"INSERT INTO listings({_LISTING_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET title = excluded.title, connection = excluded.connection, "
            "scopes = excluded.scopes, supply = excluded.supply, start_price = excluded.start_price, "
            "floor_price = excluded.floor_price, opens_at = excluded.opens_at, closes_at = excluded.closes_at, "
            "delivery = excluded.delivery, api = excluded.api, methods = excluded.methods, "
            "approval = excluded.approval",
            (
                listing.id,
                listing.title,
                listing.connection,
                json.dumps(list(listing.scopes)),
                listing.supply,
                listing.start_price,
                listing.floor_price,
                to_micros(listing.opens_at),
                to_micros(listing.closes_at),
                listing.delivery,
                json.dumps(list(listing.api)),
                json.dumps(list(listing.methods)),
                listing.approval,
            ),
        )

    def get_listing(self, listing_id: str) -> Listing | None:
        row = self._x(f"SELECT {_LISTING_COLUMNS} FROM listings WHERE id = ?", (listing_id,)).fetchone()
        return None if row is None else _listing(row)

    def page_listings(
        self, *, after: str | None, connection: str | None, open_at: datetime | None, limit: int
    ) -> list[Listing]:
        """Listings ordered by id, after `after`; with `open_at`, only those not closed at that time."""
        clauses, params = ["TRUE"], []  # type: list[str], list[Any]
        if after is not None:
            clauses.append("id > ?")
            params.append(after)
        if connection is not None:
            clauses.append("connection = ?")
            params.append(connection)
        if open_at is not None:
            clauses.append("closes_at >= ?")
            params.append(to_micros(open_at))
        params.append(limit)
        rows = self._x(
            f"SELECT {_LISTING_COLUMNS} FROM listings WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?", params
        ).fetchall()
        return [_listing(r) for r in rows]

    def add_sold(self, listing_id: str, units: int) -> bool:
        """Count `units` as sold unless that would exceed supply; True when it was counted."""
        cur = self._x(ADD_SOLD, (units, listing_id, units))
        return cur.rowcount == 1

    # ---- holdings -------------------------------------------------------------------------
    def add_units(self, account: str, listing_id: str, units: int, ts: str) -> Holding:
        self._x(ADD_UNITS, (account, listing_id, units, units, ts))
        row = self._x(
            _HOLDING_SELECT + " WHERE h.account = ? AND h.listing_id = ?", (account, listing_id)
        ).fetchone()
        return _holding(row)

    def holdings_of(self, account: str, connection: str | None = None) -> list[Holding]:
        if connection is None:
            rows = self._x(_HOLDINGS_OF, (account,))
        else:
            rows = self._x(_HOLDINGS_ON, (account, connection))
        return [_holding(r) for r in rows.fetchall()]

    # ---- purchases ------------------------------------------------------------------------
    def buy_context(
        self, account: str, listing_id: str, idempotency_key: str | None
    ) -> tuple[tuple[Receipt, str] | None, Listing | None, int | None, int]:
        """What a purchase decides on, read together: the earlier purchase under `idempotency_key` (with its
        request fingerprint; None without a key), the listing, the wallet's balance (None: no wallet), and
        the units the account holds of the listing now."""
        reads: list[tuple[str, Sequence[Any]]] = [
            (f"SELECT {_LISTING_COLUMNS} FROM listings WHERE id = ?", (listing_id,)),
            (_BALANCE, (account,)),
            ("SELECT units_held FROM holdings WHERE account = ? AND listing_id = ?", (account, listing_id)),
        ]
        if idempotency_key is not None:
            reads.append((_FIND_PURCHASE, (account, idempotency_key)))
        listing, balance, held, *earlier = self._fetch_all(reads)
        return (
            _purchase(earlier[0]) if earlier else None,
            _listing(listing[0]) if listing else None,
            int(balance[0][0]) if balance else None,
            int(held[0][0]) if held else 0,
        )

    def sell(
        self, receipt: Receipt, *, account: str, market: str, idempotency_key: str | None, fingerprint: str
    ) -> bool:
        """A purchase's writes: `receipt.units` counted as sold (False, and nothing done, when that would exceed
        supply), `receipt.total` credits from the wallet to `market`, the units added to the account's holding
        (`receipt.units_held` is what the caller counts it will then hold), the purchase row. PgTx sends them
        as one statement with the next, trusting the caller's supply check made under the write lock (were
        it wrong, the statement fails)."""
        if not self.add_sold(receipt.listing_id, receipt.units):
            return False
        transfer_id = None
        if receipt.total > 0:
            transfer_id = self.transfer(
                account, market, receipt.total, "buy_quota", receipt.purchase_id, receipt.purchased_at
            )
        holding = self.add_units(account, receipt.listing_id, receipt.units, receipt.purchased_at)
        if holding.units_held != receipt.units_held:  # pragma: no cover - counted under the same write lock
            raise AssertionError(f"holding {holding.id} holds {holding.units_held}, not {receipt.units_held}")
        self.insert_purchase(
            receipt, account=account, idempotency_key=idempotency_key, fingerprint=fingerprint, transfer_id=transfer_id
        )
        return True

    def insert_purchase(
        self, receipt: Receipt, *, account: str, idempotency_key: str | None, fingerprint: str, transfer_id: int | None
    ) -> None:
        self._w(
            f"INSERT INTO purchases({PURCHASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.purchase_id,
                account,
                receipt.listing_id,
                receipt.units,
                receipt.unit_price,
                receipt.total,
                receipt.balance_after,
                receipt.units_held,
                receipt.purchased_at,
                idempotency_key,
                fingerprint,
                transfer_id,
            ),
        )

    # ---- operator moves (§11) ---------------------------------------------------------------
    def take_units(self, account: str, listing_id: str, units: int) -> bool:
        """Take `units` held (not reserved, not spent) out of `account`'s holding of the listing; False, and
        nothing taken, when it holds fewer. Its units_bought (units acquired) drops with them."""
        cur = self._x(
            "UPDATE holdings SET units_held = units_held - ?, units_bought = units_bought - ? "
            "WHERE account = ? AND listing_id = ? AND units_held >= ?",
            (units, units, account, listing_id, units),
        )
        return cur.rowcount == 1

    def find_move(self, idempotency_key: str) -> tuple[Move, str] | None:
        """The move made with this idempotency key and its request fingerprint, if any."""
        row = self._x(
            f"SELECT {_MOVE_COLUMNS}, fingerprint FROM moves WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        if row is None:
            return None
        return _move(row), str(row[10])

    def insert_move(
        self, move: Move, *, idempotency_key: str | None, fingerprint: str, transfer_id: int | None
    ) -> None:
        self._w(
            f"INSERT INTO moves({_MOVE_COLUMNS}, idempotency_key, fingerprint, transfer_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (move.move_id, move.kind, move.from_account, move.to_account, move.listing_id, move.amount,
             move.from_after, move.to_after, move.operator, move.moved_at, idempotency_key, fingerprint,
             transfer_id),
        )

    def moves(self) -> list[Move]:
        """Every operator move, oldest first (the invariant checker; a few per operator action)."""
        rows = self._x(f"SELECT {_MOVE_COLUMNS} FROM moves ORDER BY moved_at, id").fetchall()
        return [_move(r) for r in rows]

    def move_events(self) -> dict[str, list[str]]:
        """Per move id, the accounts of the ok wallet_transfer / quota_transfer events that record it (a
        replay's event, `replayed` true, records no move of its own)."""
        names = self.audit_names()
        found: dict[str, list[str]] = {}
        rows = self._x(
            f"SELECT {self._arg('move_id')}, account FROM audit "
            "WHERE tool IN (SELECT id FROM audit_names WHERE name IN ('wallet_transfer', 'quota_transfer')) "
            "AND outcome = (SELECT id FROM audit_names WHERE name = 'ok') "
            f"AND {self._arg('move_id')} IS NOT NULL AND NOT coalesce({self._arg_true('replayed')}, FALSE)"
        )
        for move_id, account in rows:
            found.setdefault(str(move_id), []).append(names.get(account, str(account)))
        return found

    # ---- reservations ---------------------------------------------------------------------
    # With `chosen`, the caller read the holding in this transaction and saw a unit held, so one is there
    # (the write lock kept it): PgTx does not wait for the answer, and were the unit gone after all, the
    # statement fails and the whole job with it, where here the answer is False.
    def reserve_unit(self, holding_id: int, reservation_id: str, owner: str, ts: str, *, chosen: bool = False) -> bool:
        return self._take_unit(holding_id, "units_reserved", (reservation_id, "pending", owner, ts, None), chosen)

    def spend_unit(self, holding_id: int, reservation_id: str, ts: str, *, chosen: bool = False) -> bool:
        """Reserve and commit one unit at once (a reused Token Vault answer: nothing to wait for)."""
        return self._take_unit(holding_id, "units_consumed", (reservation_id, "committed", "", ts, ts), chosen)

    def _take_unit(self, holding_id: int, into: str, reservation: tuple[Any, ...], chosen: bool = False) -> bool:
        """Move one held unit of a holding to `into` and insert its reservation (id, status, owner, created_at,
        settled_at); False when none is held."""
        if self._x(TAKE_UNIT.format(into=into), (holding_id,)).rowcount != 1:
            return False
        self._w(RESERVATION, (reservation[0], holding_id, *reservation[1:]))
        return True

    def settle_reservation(self, reservation_id: str, status: str, ts: str) -> bool:
        """Mark a pending reservation committed or refunded and move its unit; False if not pending.

        The owner (host:pid:start of the process holding it) only matters while it is pending: cleared.
        """
        cur = self._x(
            "UPDATE reservations SET status = ?, settled_at = ?, owner = '' WHERE id = ? AND status = 'pending'",
            (status, ts, reservation_id),
        )
        if cur.rowcount != 1:
            return False
        if status == "committed":
            move = "units_consumed = units_consumed + 1"
        else:
            move = "units_held = units_held + 1"
            self._w(  # the token or grant it counted against max_grants_per_hour did not happen
                "UPDATE usage SET amount = CASE WHEN amount > 0 THEN amount - 1 ELSE 0 END "
                "WHERE kind = 'grants' AND (account, agent, period) = "
                "(SELECT h.account, r.agent, r.counted FROM reservations r JOIN holdings h ON h.id = r.holding_id "
                "WHERE r.id = ? AND r.counted IS NOT NULL)",
                (reservation_id,),
            )
        self._w(
            f"UPDATE holdings SET units_reserved = units_reserved - 1, {move} "
            "WHERE id = (SELECT holding_id FROM reservations WHERE id = ?)",
            (reservation_id,),
        )
        return True

    def pending_reservations(self) -> list[Reservation]:
        rows = self._x(
            "SELECT r.id, r.holding_id, h.account, h.listing_id, l.connection, l.scopes, r.owner, r.created_at, "
            "r.agent, r.tool, r.lease_until FROM reservations r JOIN holdings h ON h.id = r.holding_id "
            "JOIN listings l ON l.id = h.listing_id WHERE r.status = 'pending' ORDER BY r.created_at"
        ).fetchall()
        return [
            Reservation(r[0], r[1], r[2], r[3], r[4], _strings(r[5]), r[6], r[7], r[8], r[9],
                        None if r[10] is None else from_micros(int(r[10])))
            for r in rows
        ]

    # ---- operator control (§9) --------------------------------------------------------------
    def blocks(self) -> list[tuple[str, str, str, str]]:
        """(agent, reason, blocked_at, blocked_by) of every blocked agent."""
        rows = self._x("SELECT agent, reason, blocked_at, blocked_by FROM agent_blocks ORDER BY agent")
        return [(str(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]

    def set_block(self, agent: str, reason: str, ts: str, by: str) -> None:
        self._w(
            "INSERT INTO agent_blocks(agent, reason, blocked_at, blocked_by) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(agent) DO UPDATE SET reason = excluded.reason, blocked_at = excluded.blocked_at, "
            "blocked_by = excluded.blocked_by",
            (agent, reason, ts, by),
        )

    def clear_block(self, agent: str) -> bool:
        return self._x("DELETE FROM agent_blocks WHERE agent = ?", (agent,)).rowcount == 1

    def close_grants_of(self, agent: str, now: datetime) -> int:
        return self._x(
            "UPDATE grants SET closed_at = ? WHERE agent = ? AND closed_at IS NULL AND expires_at > ?",
            (to_micros(now), agent, to_micros(now)),
        ).rowcount

    def take_rate_token(
        self, account: str, agent: str, per_minute: int, now: datetime, *, take: bool = True, debt: bool = False
    ) -> float:
        """Take one token of the (account, agent) bucket (capacity `per_minute`, refilled at per_minute/60
        a second): 0 when taken, else the seconds until one is there (nothing taken). With `take` false
        nothing is written (a look only); with `debt` the token is taken even below zero (at most one
        minute's worth of debt)."""
        at = to_micros(now)
        row = self._x(
            "SELECT tokens, updated_at FROM rate_buckets WHERE account = ? AND agent = ?", (account, agent)
        ).fetchone()
        tokens = float(per_minute) if row is None else float(row[0])
        if row is not None and at > row[1]:
            tokens = min(float(per_minute), tokens + (at - int(row[1])) / 60e6 * per_minute)
        tokens = min(tokens, float(per_minute))  # the policy may have lowered the rate
        if tokens < 1.0 and not debt:
            return (1.0 - tokens) * 60.0 / per_minute
        if not take:
            return 0.0
        tokens = max(tokens, 1.0 - per_minute)
        self._w(
            "INSERT INTO rate_buckets(account, agent, tokens, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(account, agent) DO UPDATE SET tokens = excluded.tokens, "
            "updated_at = CASE WHEN excluded.updated_at > rate_buckets.updated_at THEN excluded.updated_at "
            "ELSE rate_buckets.updated_at END",
            (account, agent, tokens - 1.0, at),
        )
        return 0.0

    def usage(self, account: str, agent: str, kind: str, period: str) -> int:
        row = self._x(
            "SELECT amount FROM usage WHERE account = ? AND agent = ? AND kind = ? AND period = ?",
            (account, agent, kind, period),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def add_usage(self, account: str, agent: str, kind: str, period: str, amount: int) -> None:
        self._w(
            "INSERT INTO usage(account, agent, kind, period, amount) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(account, agent, kind, period) DO UPDATE SET amount = "
            "CASE WHEN usage.amount + ? > 0 THEN usage.amount + ? ELSE 0 END",
            (account, agent, kind, period, max(amount, 0), amount, amount),
        )

    def mark_reservation(
        self, reservation_id: str, agent: str, counted: str | None, tool: str, lease_until: datetime | None = None
    ) -> None:
        """Who holds a reservation, for which tool, which hour's grant count it took (given back if it is
        refunded), and until when its holder has it (its lease; renewed while the holder works)."""
        self._w(
            "UPDATE reservations SET agent = ?, counted = ?, tool = ?, lease_until = ? WHERE id = ?",
            (agent, counted, tool, None if lease_until is None else to_micros(lease_until), reservation_id),
        )

    def renew_leases(self, owner: str, until: datetime) -> int:
        """Extend the leases of `owner`'s pending reservations to `until`; how many it holds."""
        return int(self._x(
            "UPDATE reservations SET lease_until = ? WHERE owner = ? AND status = 'pending' "
            "AND lease_until IS NOT NULL",
            (to_micros(until), owner),
        ).rowcount)

    def agents_seen(self) -> list[tuple[str, int, str, list[str]]]:
        """(agent, calls, last call, accounts) of every agent in the audit log (one pass over it)."""
        seen: dict[str, tuple[int, str, list[str]]] = {}
        names = self.audit_names()
        rows = self._x(
            "SELECT agent, account, count(*), max(ts) FROM audit WHERE agent IS NOT NULL GROUP BY agent, account"
        )
        for agent_id, account_id, calls, last in rows:
            agent = names.get(agent_id, str(agent_id))
            before = seen.get(agent, (0, "", []))
            accounts = before[2] + ([names.get(account_id, str(account_id))] if account_id is not None else [])
            seen[agent] = (before[0] + int(calls), max(before[1], str(last)), accounts)
        return [(agent, calls, last, sorted(accounts)) for agent, (calls, last, accounts) in sorted(seen.items())]

    # ---- connect links (§10) ----------------------------------------------------------------
    def insert_connect_link(self, link: ConnectLink) -> None:
        self._w(
            f"INSERT INTO connect_links({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (link.id, link.account, link.agent, link.connection, json.dumps(list(link.scopes)), link.elicitation_id,
             to_micros(link.created_at), to_micros(link.expires_at), link.status),
        )

    def get_connect_link(self, link_id: str) -> ConnectLink | None:
        row = self._x(f"SELECT {_LINK_COLUMNS} FROM connect_links WHERE id = ?", (link_id,)).fetchone()
        return None if row is None else _connect_link(row)

    def move_connect_link(self, link_id: str, before: Sequence[str], after: str, now: datetime) -> bool:
        """Move a link from one of the statuses `before` to `after` (only forward); False when it was not in one
        of them (another request moved it first: a link is used once)."""
        marks = ", ".join("?" for _ in before)
        finished = to_micros(now) if after in ("connected", "refused") else None
        cur = self._x(
            f"UPDATE connect_links SET status = ?, finished_at = ? WHERE id = ? AND status IN ({marks})",
            (after, finished, link_id, *before),
        )
        return bool(cur.rowcount == 1)

    def drop_connect_links_before(self, moment: datetime) -> int:
        """Forget links that expired before `moment` (they can no longer be used; their events stay)."""
        return int(self._x("DELETE FROM connect_links WHERE expires_at < ?", (to_micros(moment),)).rowcount)

    def agent_activity(self, after_id: int) -> list[tuple[int, int | None, int, str, int]]:
        """(agent name id, account name id, calls, last ts, last event id) per agent and account, over the
        events after `after_id` only (the console keeps `agents_seen` current from these)."""
        rows = self._x(
            "SELECT agent, account, count(*), max(ts), max(id) FROM audit WHERE id > ? AND agent IS NOT NULL "
            "GROUP BY agent, account",
            (after_id,),
        )
        return [(int(r[0]), None if r[1] is None else int(r[1]), int(r[2]), str(r[3]), int(r[4])) for r in rows]

    # ---- grants (§8) ----------------------------------------------------------------------
    def insert_grant(self, grant: Grant) -> None:
        self._w(
            f"INSERT INTO grants({_GRANT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (grant.id, grant.account, grant.agent, grant.connection, json.dumps(list(grant.scopes)),
             grant.login_hint or "", grant.holding_id, grant.reservation_id, grant.token_id,
             to_micros(grant.opened_at), to_micros(grant.expires_at)),
        )

    def live_grants_for(
        self, account: str, agent: str, connection: str, scopes: Sequence[str], login_hint: str | None, now: datetime
    ) -> list[Grant]:
        """The caller's grants for exactly this ask that are live at `now`, the one that lasts longest first."""
        ask = (account, agent, connection, json.dumps(list(scopes)), login_hint or "", to_micros(now))
        rows = self._x(_LIVE_GRANTS_FOR, ask).fetchall()
        return [_grant(r) for r in rows]

    def live_grants_and_holdings_for(
        self, account: str, agent: str, connection: str, scopes: Sequence[str], login_hint: str | None, now: datetime
    ) -> tuple[list[Grant], list[Holding]]:
        """`live_grants_for`, and the account's holdings on `connection` (`holdings_of`): read together."""
        ask = (account, agent, connection, json.dumps(list(scopes)), login_hint or "", to_micros(now))
        grants, holdings = self._fetch_all([(_LIVE_GRANTS_FOR, ask), (_HOLDINGS_ON, (account, connection))])
        return [_grant(r) for r in grants], [_holding(r) for r in holdings]

    def live_grants(self, account: str, agent: str, now: datetime) -> list[Grant]:
        rows = self._x(_LIVE_GRANTS, (account, agent, to_micros(now))).fetchall()
        return [_grant(r) for r in rows]

    def all_live_grants(self, now: datetime, limit: int) -> list[Grant]:
        """Every account's grants live at `now`, the soonest to expire first (the console)."""
        rows = self._x(
            f"SELECT {_GRANT_COLUMNS} FROM grants WHERE expires_at > ? AND closed_at IS NULL "
            "ORDER BY expires_at, id LIMIT ?",
            (to_micros(now), limit),
        ).fetchall()
        return [_grant(r) for r in rows]

    def set_grant_token(self, grant_id: str, token_id: bytes) -> None:
        """A grant re-exchanged its token (a restart, another replica, a provider 401): the new fingerprint."""
        self._w("UPDATE grants SET token_id = ? WHERE id = ?", (token_id, grant_id))

    def grant_opening_events(self) -> dict[str, int]:
        """Per grant id, the count of call_api events that say they opened it (`new_grant` true)."""
        return {
            str(r[0]): int(r[1])
            for r in self._x(
                f"SELECT {self._arg('grant_id')}, count(*) FROM audit "
                "WHERE tool = (SELECT id FROM audit_names WHERE name = 'call_api') "
                f"AND {self._arg_true('new_grant')} GROUP BY 1"
            )
        }

    def grant_reservations(self) -> dict[str, str]:
        """Reservation id → grant id, for every grant (the invariant checker)."""
        return {str(r[0]): str(r[1]) for r in self._x("SELECT reservation_id, id FROM grants")}

    # ---- audit ----------------------------------------------------------------------------
    def name_id(self, name: str | None) -> int | None:
        """The audit_names id of `name`, added if new (None stays None)."""
        if name is None:
            return None
        found = self._names.get(name)
        if found is None:
            found = self._new_names.get(name)
            if found is None:
                row = self._x("SELECT id FROM audit_names WHERE name = ?", (name,)).fetchone()
                found = int(row[0]) if row else self._insert_id("INSERT INTO audit_names(name) VALUES (?)", (name,))
                self._new_names[name] = found
        return found

    def audit_names(self) -> dict[int, str]:
        return {int(r[0]): r[1] for r in self._x("SELECT id, name FROM audit_names")}

    def audit_head(self) -> tuple[int, bytes] | None:
        row = self._x("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def insert_audit(self, record: AuditRecord, head: tuple[str, str] | None = None) -> None:
        """Store an event (its names by id; its prev_hash is the previous row's hash, not stored). With
        `head` (a meta key and value: the chain's recorded head), that meta is set along with it."""
        before = self.last_event
        self.last_event = (record.id, bytes(record.hash))
        self.on_undo(lambda: setattr(self, "last_event", before))
        name = self.name_id
        row = (
            record.id,
            record.ts,
            name(record.account),
            name(record.agent),
            name(record.tool),
            name(record.transport),
            name(record.scope),
            name(record.outcome),
            name(record.code),
            record.args,
            record.token_id,
            record.latency_ms,
            record.hash,
        )
        self._write_audit_row(row, head)

    def _write_audit_row(self, row: tuple[Any, ...], head: tuple[str, str] | None) -> None:
        """The INSERT of an event's row, then its `head` meta set: two statements (PgTx makes them one)."""
        self._w(INSERT_AUDIT, row)
        if head is not None:
            self.set_meta(*head)

    def audit_count(self) -> int:
        return int(self._x("SELECT count(*) FROM audit").fetchone()[0])

    def iter_audit_rows(self, chunk: int = 20_000) -> Iterator[tuple[Any, ...]]:
        """Every stored row in id order, names as ids: (id, ts, account, agent, tool, transport, scope,
        outcome, code, args, token_id, latency_ms, hash). What `audit verify` walks."""
        last = 0
        execute = self._x
        while True:
            rows = execute(
                f"SELECT {_AUDIT_ROW} FROM audit WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
            ).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def iter_audit(self) -> Iterator[AuditRecord]:
        """All events in id order, names resolved, each with its predecessor's hash."""
        names = self.audit_names()
        prev: bytes | None = _GENESIS
        expected = 1
        for row in self.iter_audit_rows():
            id_ = row[0]
            if id_ != expected:
                prev = None
            yield _audit_record(row, names, prev)
            prev, expected = row[12], id_ + 1

    def find_audit(self, where: AuditFilter, limit: int | None = None, newest_first: bool = False) -> list[AuditRecord]:
        named = (("account", where.account), ("agent", where.agent), ("tool", where.tool),
                 ("outcome", where.outcome), ("code", where.code))
        bounds = [
            *((f"a.{column} = (SELECT id FROM audit_names WHERE name = ?)", value) for column, value in named),
            ("a.id < ?", where.before_id),
            ("a.id > ?", where.after_id),
            ("a.token_id = ?", where.token_id),
            ("a.ts >= ?", where.since),
            ("a.ts <= ?", where.until),
        ]
        clauses = ["TRUE", *(clause for clause, value in bounds if value is not None)]
        params: list[Any] = [value for _, value in bounds if value is not None]
        order = "DESC" if newest_first else "ASC"
        sql = (  # the row, then its predecessor's hash
            f"SELECT {_AUDIT_ROW}, "
            "CASE WHEN a.id = 1 THEN ? ELSE (SELECT p.hash FROM audit p WHERE p.id = a.id - 1) END "
            f"FROM audit a WHERE {' AND '.join(clauses)} ORDER BY a.id {order}"
        )
        params.insert(0, _GENESIS)
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._x(sql, params).fetchall()
        if not rows:
            return []
        ids = {v for r in rows for v in r[2:9] if v is not None}
        names = self._names_of(ids)
        return [_audit_record(r, names, r[13]) for r in rows]

    def _names_of(self, ids: set[Any]) -> dict[int, str]:
        wanted = sorted(i for i in ids if isinstance(i, int))
        found: dict[int, str] = {}
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ", ".join("?" * len(part))
            found.update(
                (int(r[0]), r[1])
                for r in self._x(f"SELECT id, name FROM audit_names WHERE id IN ({marks})", part)
            )
        return found

    # ---- invariants -----------------------------------------------------------------------
    def ledger_totals(self) -> LedgerTotals:
        c = self._x
        balance_sum = int(c("SELECT coalesce(sum(balance), 0) FROM accounts").fetchone()[0])
        negative = [r[0] for r in c("SELECT name FROM accounts WHERE kind = 'wallet' AND balance < 0")]
        mismatched = [
            r[0]
            for r in c(
                "SELECT a.name FROM accounts a WHERE a.balance <> "
                "coalesce((SELECT sum(amount) FROM transfers WHERE credit = a.name), 0) - "
                "coalesce((SELECT sum(amount) FROM transfers WHERE debit = a.name), 0)"
            )
        ]
        # a holding's units_bought counts the units it acquired: bought, plus moved in, minus moved out
        holdings = [
            int(r[0])
            for r in c(
                "SELECT id FROM holdings h WHERE units_bought <> units_held + units_consumed + units_reserved "
                "OR units_bought <> (SELECT coalesce(sum(units), 0) FROM purchases p "
                "WHERE p.account = h.account AND p.listing_id = h.listing_id) "
                "+ (SELECT coalesce(sum(amount), 0) FROM moves m WHERE m.kind = 'units' "
                "AND m.to_account = h.account AND m.listing_id = h.listing_id) "
                "- (SELECT coalesce(sum(amount), 0) FROM moves m WHERE m.kind = 'units' "
                "AND m.from_account = h.account AND m.listing_id = h.listing_id)"
            )
        ]
        oversold = [r[0] for r in c("SELECT id FROM listings WHERE sold > supply")]
        sold = [
            r[0]
            for r in c(
                "SELECT id FROM listings l WHERE sold <> "
                "(SELECT coalesce(sum(units), 0) FROM purchases p WHERE p.listing_id = l.id)"
            )
        ]
        # units sold = held + reserved + spent, over all the listing's holdings: moves only relocate units
        placed = [
            r[0]
            for r in c(
                "SELECT id FROM listings l WHERE sold <> (SELECT coalesce(sum(units_held + units_reserved "
                "+ units_consumed), 0) FROM holdings h WHERE h.listing_id = l.id)"
            )
        ]
        # each credits move is exactly one wallet-to-wallet transfer, and each such transfer is one move
        moved = [
            str(r[0])
            for r in c(
                "SELECT m.id FROM moves m LEFT JOIN transfers t ON t.id = m.transfer_id WHERE m.kind = 'credits' "
                "AND (t.id IS NULL OR t.debit <> m.from_account OR t.credit <> m.to_account "
                "OR t.amount <> m.amount OR t.reason <> 'wallet_transfer' OR t.reference IS NULL "
                "OR t.reference <> m.id)"
            )
        ]
        unmoved = [
            int(r[0])
            for r in c(
                "SELECT t.id FROM transfers t WHERE t.reason = 'wallet_transfer' "
                "AND NOT EXISTS (SELECT 1 FROM moves m WHERE m.transfer_id = t.id)"
            )
        ]
        reserved = [
            int(r[0])
            for r in c(
                "SELECT id FROM holdings h WHERE units_reserved <> (SELECT count(*) FROM reservations r "
                "WHERE r.holding_id = h.id AND r.status = 'pending') OR units_consumed <> "
                "(SELECT count(*) FROM reservations r WHERE r.holding_id = h.id AND r.status = 'committed')"
            )
        ]
        return LedgerTotals(
            balance_sum, negative, mismatched, holdings, oversold, sold, reserved, placed, moved, unmoved
        )

    def token_events_by_reservation(self) -> tuple[set[str], dict[str, int]]:
        """Committed reservation ids, and per reservation id the count of ok request_token events with a token."""
        committed = {r[0] for r in self._x("SELECT id FROM reservations WHERE status = 'committed'")}
        counts = {
            str(r[0]): int(r[1])
            for r in self._x(
                f"SELECT {self._arg('reservation_id')}, count(*) FROM audit "
                "WHERE tool = (SELECT id FROM audit_names WHERE name = 'request_token') "
                "AND outcome = (SELECT id FROM audit_names WHERE name = 'ok') AND token_id IS NOT NULL GROUP BY 1"
            )
        }
        return committed, counts


class SqliteTx(Tx):
    """A transaction in progress on one SQLite connection."""

    def __init__(self, conn: sqlite3.Connection, names: dict[str, int] | None = None) -> None:
        super().__init__(names)
        self._x = conn.execute

    def get_meta(self, key: str) -> bytes | None:
        row = self._x("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0]) if isinstance(row[0], bytes | memoryview) else row[0]

    def set_meta(self, key: str, value: bytes | str) -> None:
        self._x(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def control_version(self) -> int:
        row = self._x("SELECT value FROM meta WHERE key = 'control_version'").fetchone()
        return 0 if row is None else int(row[0])

    def bump_control_version(self) -> None:
        self._x(
            "INSERT INTO meta(key, value) VALUES ('control_version', 1) "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    def _insert_id(self, sql: str, params: Sequence[Any]) -> int:
        cur = self._x(sql, params)
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def _arg(self, key: str) -> str:
        return f"json_extract(args, '$.{key}')"

    def _arg_true(self, key: str) -> str:
        return f"json_extract(args, '$.{key}') = 1"


def _listing(row: Sequence[Any]) -> Listing:
    return Listing(
        id=row[0],
        title=row[1],
        connection=row[2],
        scopes=_strings(row[3]),
        supply=int(row[4]),
        sold=int(row[5]),
        start_price=int(row[6]),
        floor_price=int(row[7]),
        opens_at=from_micros(int(row[8])),
        closes_at=from_micros(int(row[9])),
        delivery=row[10],
        api=_strings(row[11]),
        methods=_strings(row[12]),
        approval=row[13],
    )


def _purchase(rows: Sequence[Sequence[Any]]) -> tuple[Receipt, str] | None:
    """A found purchase (rows of _FIND_PURCHASE) and its request fingerprint."""
    if not rows:
        return None
    return Receipt(*rows[0][:8]), str(rows[0][8])


def _holding(row: Sequence[Any]) -> Holding:
    return Holding(
        id=int(row[0]),
        account=row[1],
        listing_id=row[2],
        connection=row[3],
        scopes=_strings(row[4]),
        units_bought=int(row[5]),
        units_held=int(row[6]),
        units_consumed=int(row[7]),
        units_reserved=int(row[8]),
        created_at=row[9],
        delivery=row[10],
        api=_strings(row[11]),
        methods=_strings(row[12]),
        approval=row[13],
    )


def _connect_link(row: Sequence[Any]) -> ConnectLink:
    return ConnectLink(
        id=row[0], account=row[1], agent=row[2], connection=row[3], scopes=_strings(row[4]), elicitation_id=row[5],
        created_at=from_micros(row[6]), expires_at=from_micros(row[7]), status=row[8],
        finished_at=None if row[9] is None else from_micros(row[9]),
    )


def _move(row: Sequence[Any]) -> Move:
    return Move(
        move_id=row[0],
        kind=row[1],
        from_account=row[2],
        to_account=row[3],
        listing_id=row[4],
        amount=int(row[5]),
        from_after=int(row[6]),
        to_after=int(row[7]),
        operator=row[8],
        moved_at=row[9],
    )


def _grant(row: Sequence[Any]) -> Grant:
    return Grant(
        id=row[0],
        account=row[1],
        agent=row[2],
        connection=row[3],
        scopes=_strings(row[4]),
        login_hint=row[5] or None,
        holding_id=int(row[6]),
        reservation_id=row[7],
        token_id=bytes(row[8]),
        opened_at=from_micros(int(row[9])),
        expires_at=from_micros(int(row[10])),
        closed_at=None if row[11] is None else from_micros(int(row[11])),
    )


def _audit_record(row: Sequence[Any], names: dict[int, str], prev_hash: bytes | None) -> AuditRecord:
    def name(value: Any) -> Any:
        # an id missing from audit_names (a tampered row) is shown as it is stored; `audit verify` names it
        return None if value is None else names.get(value, value)

    return AuditRecord(
        id=row[0],
        ts=row[1],
        account=name(row[2]),
        agent=name(row[3]),
        tool=name(row[4]),
        transport=name(row[5]),
        scope=name(row[6]),
        outcome=name(row[7]),
        code=name(row[8]),
        args=row[9],
        token_id=row[10],
        latency_ms=row[11],
        prev_hash=prev_hash,
        hash=row[12],
    )
