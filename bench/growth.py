"""Growth: the same questions asked of a database with 10 k and with 1 M audit events.

The database is made by the product (`Database.open`, `market.load`), then filled fast by
direct bulk inserts — a bench may write SQL to seed. Every audit row is chained by the
product's own `audit.append` (into a collector instead of SQLite), so the chain verifies; the
ledger rows match the events (credits, purchases, committed reservations), so the books balance.
The measurements then go through the product's real code: the store queries behind
`audit list --account` and `audit lookup`, the broker's `check_balance`, and `audit verify`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.stats import median
from server import audit, market
from server.audit import Event
from server.broker import Broker, Call
from server.demo import demo_listings
from server.models import AuditRecord
from server.principal import Principal
from server.store import AuditFilter, Database
from server.store.tx import SqliteTx

ACCOUNTS = 100
BUY_UNITS = 5
# One cycle of an account's calls: a purchase, then five tokens, two balance checks, two market looks.
CYCLE = ("buy_quota", *["request_token"] * 5, "check_balance", "check_balance", "list_market", "list_market")
PURPOSE = "summarize the open issues of acme/widgets for the weekly status report"
LISTING = "github-repo-read"
PRICE = 12
START = datetime(2026, 6, 1, tzinfo=UTC)


class _Collector:
    """Stands in for a Tx under `audit.append`: keeps the chain head in memory, collects the rows."""

    def __init__(self) -> None:
        self.head: tuple[int, bytes] | None = None
        self.rows: list[AuditRecord] = []
        self.head_text = ""

    def audit_head(self) -> tuple[int, bytes] | None:
        return self.head

    def insert_audit(self, record: AuditRecord, head: tuple[str, str] | None = None) -> None:
        self.rows.append(record)
        self.head = (record.id, record.hash)
        if head is not None:
            self.set_meta(*head)

    def get_meta(self, key: str) -> str | None:
        return self.head_text or None

    def set_meta(self, key: str, value: str) -> None:
        self.head_text = value


def account_name(n: int) -> str:
    return f"auth0|bench-user-{n:04d}"


def agent_of(account: int) -> str:
    """An agent as Auth0 names it: the 32-character client id of the agent's application (azp)."""
    return f"bEnCh{account % 7:02d}" + "Kx9q2LmZ0vT4rW8yB1cN6dJ"[:25]


def token_of(account: int, serial: int) -> str:
    return f"gho_bench_{account}_{serial}"


async def seed(path: Path, events: int) -> dict[str, Any]:
    """Make a database at `path` with about `events` audit events and the ledger rows that match them."""
    _remove(path)
    db = await Database.open(path)
    specs = [s for s in demo_listings() if s.id == LISTING]
    specs[0] = specs[0].model_copy(update={"supply": 10**12})
    await db.write(lambda tx: market.load(tx, specs))
    key = db.hmac_key
    await db.close()

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")  # seeding only; the product's own connection is durable
    collector = _Collector()
    names: dict[str, int] = {}
    chain: Any = collector
    transfers: list[tuple[Any, ...]] = []
    purchases: list[tuple[Any, ...]] = []
    reservations: list[tuple[Any, ...]] = []
    holdings = {n: [0, 0, 0] for n in range(ACCOUNTS)}  # bought, held, consumed
    balance = dict.fromkeys(range(ACCOUNTS), 0)
    serial = 0
    looked_up = ""
    clock = START

    def emit(n: int, tool: str | None, scope: str | None, args: dict[str, Any], token_id: bytes | None = None,
             transport: str = "http") -> None:
        audit.append(
            chain,
            Event(ts=clock.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), transport=transport, outcome="ok",
                  account=account_name(n), agent=agent_of(n), tool=tool, scope=scope, args=args,
                  token_id=token_id, latency_ms=1.234),
        )

    for n in range(ACCOUNTS):
        ts = clock.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        amount = 10**9
        transfers.append((ts, "mint", account_name(n), amount, "operator credit", None))
        balance[n] += amount
        emit(n, "wallet_credit", None, {"account": account_name(n), "amount": amount}, transport="cli")
    made = ACCOUNTS
    step = 0
    while made < events:
        n = step % ACCOUNTS
        tool = CYCLE[(step // ACCOUNTS) % len(CYCLE)]
        step += 1
        clock += timedelta(milliseconds=3)
        ts = clock.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if tool == "buy_quota":
            total = PRICE * BUY_UNITS
            purchase_id = f"pur_{step:024x}"
            balance[n] -= total
            holdings[n][0] += BUY_UNITS
            holdings[n][1] += BUY_UNITS
            transfers.append((ts, account_name(n), "market", total, "buy_quota", purchase_id))
            purchases.append((purchase_id, account_name(n), LISTING, BUY_UNITS, PRICE, total, balance[n],
                              holdings[n][1], ts, None, "seed", len(transfers)))
            emit(n, tool, "buy:quota", {"listing_id": LISTING, "units": BUY_UNITS, "max_unit_price": 100})
        elif tool == "request_token":
            if holdings[n][1] == 0:
                continue
            holdings[n][1] -= 1
            holdings[n][2] += 1
            serial += 1
            reservation_id = f"res_{serial:024x}"
            token = token_of(n, serial)
            looked_up = looked_up or token
            reservations.append((reservation_id, n + 1, "committed", "", ts, ts))  # settled: owner cleared
            args = {"connection": "github", "scopes": ["repo:read"], "purpose": PURPOSE,
                    "reservation_id": reservation_id}
            emit(n, tool, "request:token", args, token_id=audit.token_fingerprint(key, token))
        elif tool == "check_balance":
            emit(n, tool, "read:balance", {})
        else:
            emit(n, tool, "read:market", {"include_closed": False, "limit": 25})
        made += 1
        if len(collector.rows) >= 50_000:
            _flush(conn, collector.rows, names)
            collector.rows = []
    _flush(conn, collector.rows, names)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO transfers(ts, debit, credit, amount, reason, reference) VALUES (?, ?, ?, ?, ?, ?)", transfers
    )
    conn.executemany("INSERT INTO accounts(name, kind, balance) VALUES (?, 'wallet', ?)",
                     [(account_name(n), b) for n, b in balance.items()])
    spent = sum(10**9 - b for b in balance.values())
    conn.execute("UPDATE accounts SET balance = ? WHERE name = 'mint'", (-(10**9) * ACCOUNTS,))
    conn.execute("UPDATE accounts SET balance = ? WHERE name = 'market'", (spent,))
    conn.executemany(
        "INSERT INTO holdings(id, account, listing_id, units_bought, units_held, units_consumed, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(n + 1, account_name(n), LISTING, b, h, c, START.isoformat()) for n, (b, h, c) in holdings.items()],
    )
    conn.execute("UPDATE listings SET sold = ? WHERE id = ?", (sum(h[0] for h in holdings.values()), LISTING))
    conn.executemany(
        "INSERT INTO purchases(id, account, listing_id, units, unit_price, total, balance_after, units_held, "
        "purchased_at, idempotency_key, fingerprint, transfer_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        purchases,
    )
    conn.executemany(
        "INSERT INTO reservations(id, holding_id, status, owner, created_at, settled_at) VALUES (?, ?, ?, ?, ?, ?)",
        reservations,
    )
    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (audit.HEAD_KEY, collector.head_text))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"events": made, "token": looked_up, "account": account_name(ACCOUNTS // 2)}


def _flush(conn: sqlite3.Connection, rows: list[AuditRecord], names: dict[str, int]) -> None:
    """Store the chained rows as the product stores them (`Tx.insert_audit`), in one transaction."""
    conn.execute("BEGIN")
    tx = SqliteTx(conn, names)
    for record in rows:
        tx.insert_audit(record)
    conn.execute("COMMIT")
    tx.committed()


@dataclass(frozen=True)
class Growth:
    events: int
    seed_seconds: float
    bytes_on_disk: int
    audit_list: float  # seconds, median
    audit_lookup: float
    check_balance: float
    verify_seconds: float
    verified: int
    verify_ok: bool

    @property
    def bytes_per_event(self) -> float:
        return self.bytes_on_disk / self.events

    @property
    def verify_rate(self) -> float:
        return self.verified / self.verify_seconds if self.verify_seconds else 0.0


def disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (str(path), f"{path}-wal") if os.path.exists(p))


async def _timed(repeat: int, work: Any) -> float:
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        await work()
        samples.append(time.perf_counter() - began)
    return median(samples)


async def measure(path: Path, seeded: dict[str, Any], repeat: int) -> tuple[float, float, float, float, int, bool]:
    db = await Database.open(path)
    try:
        account, fingerprint = seeded["account"], audit.token_fingerprint(db.hmac_key, seeded["token"])

        async def listing() -> None:  # what `audit list --account X` asks (newest 50)
            found = await db.read(lambda tx: tx.find_audit(AuditFilter(account=account), limit=50, newest_first=True))
            assert found

        async def lookup() -> None:  # what `audit lookup --token-stdin` asks
            found = await db.read(lambda tx: tx.find_audit(AuditFilter(token_id=fingerprint)))
            assert len(found) == 1

        broker = Broker(db)
        principal = Principal(account, "agent-bench", frozenset({"read:balance"}))

        async def balance() -> None:  # the audited tool call, group commit and fsync included
            await broker.check_balance(Call("check_balance", "read:balance", "bench"), principal)

        list_s = await _timed(repeat, listing)
        lookup_s = await _timed(repeat, lookup)
        balance_s = await _timed(repeat, balance)

        began = time.perf_counter()
        result = await db.read(audit.verify_log)  # what `audit verify` runs
        verify_s = time.perf_counter() - began
        return list_s, lookup_s, balance_s, verify_s, result.checked, result.ok
    finally:
        await db.close()


def growth(workdir: Path, sizes: list[int], repeat: int) -> list[Growth]:
    rows = []
    for events in sizes:
        path = workdir / f"growth-{events}.db"
        began = time.perf_counter()
        seeded = asyncio.run(seed(path, events))
        seed_s = time.perf_counter() - began
        size = disk_bytes(path)
        list_s, lookup_s, balance_s, verify_s, checked, ok = asyncio.run(measure(path, seeded, repeat))
        rows.append(Growth(seeded["events"], seed_s, size, list_s, lookup_s, balance_s, verify_s, checked, ok))
        _remove(path)
    return rows


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
