"""Migrations keep every event and its hash (a version-1 log still verifies, and still shows edits, at the
current version) and every listing (a version-2 listing gains the defaults of the §8–§9 keys)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server import audit, market
from server.invariants import check_invariants
from server.models import Listing
from server.store import AuditFilter, Database
from server.store.schema import MIGRATIONS, SCHEMA_VERSION

V1_COLUMNS = (
    "id, ts, account, agent, tool, transport, scope, outcome, code, args, token_id, latency_ms, prev_hash, hash"
)


def make_v1(path: Path, events: int) -> list[tuple[object, ...]]:
    """A database as version 1 wrote it: names as text, prev_hash stored, hashes over the canonical JSON."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    prev, rows = audit.GENESIS, []
    for n in range(1, events + 1):
        ts = f"2026-11-01T00:00:{n % 60:02d}.000000Z"
        fields = (ts, f"auth0|user-{n % 3}", "agent-é" if n % 2 else None, "request_token" if n % 4 else None,
                  "http", "request:token", "ok" if n % 5 else "denied", None if n % 5 else "insufficient_scope",
                  f'{{"purpose":"n{n}"}}', bytes([n % 256]) * 32 if n % 4 == 1 else None, 0.5 * n)
        hash_ = audit.chain_hash(prev, audit._hash_input(n, *fields))  # type: ignore[arg-type]
        rows.append((n, *fields, prev, hash_))
        prev = hash_
    conn.executemany(f"INSERT INTO audit({V1_COLUMNS}) VALUES ({', '.join('?' * 14)})", rows)
    conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (audit.HEAD_KEY, f"{events}:{prev.hex()}"))
    conn.close()
    return rows


async def test_a_version_1_log_migrates_whole_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    rows = make_v1(path, 40)
    db = await Database.open(path)
    try:
        result = await db.read(audit.verify_log)
        records = await db.read(lambda tx: list(tx.iter_audit()))
        found = await db.read(lambda tx: tx.find_audit(AuditFilter(account="auth0|user-1"), newest_first=True))
    finally:
        await db.close()
    assert (result.ok, result.checked) == (True, 40)
    assert [tuple(r) for r in records] == rows  # every field as it was, prev_hash included
    assert [r.id for r in found] == [n for n in range(40, 0, -1) if n % 3 == 1]
    assert all(r.prev_hash == rows[r.id - 2][13] if r.id > 1 else r.prev_hash == audit.GENESIS for r in found)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM audit_names").fetchone()[0] == 10  # each distinct name once
    conn.close()


async def test_an_edit_made_before_the_migration_is_still_found_after_it(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    make_v1(path, 10)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE audit SET account = 'auth0|mallory' WHERE id = 7")
    conn.close()
    db = await Database.open(path)
    try:
        result = await db.read(audit.verify_log)
    finally:
        await db.close()
    assert (result.ok, result.bad_id) == (False, 7)


async def test_the_audit_events_view_shows_names(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    make_v1(path, 5)
    db = await Database.open(path)
    await db.close()
    conn = sqlite3.connect(path)
    shown = conn.execute("SELECT account, tool, outcome, code FROM audit_events WHERE id = 5").fetchone()
    conn.close()
    assert shown == ("auth0|user-2", "request_token", "denied", "insufficient_scope")



def make_v2(path: Path) -> None:
    """A database as version 2 left it: two listings, one partly sold, a holding and its purchase."""
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 2")
    conn.executescript(
        """
        INSERT INTO meta(key, value) VALUES ('token_hmac_key', x'00');
        INSERT INTO accounts(name, kind, balance) VALUES ('market', 'market', 150), ('mint', 'mint', -1000),
            ('auth0|alice', 'wallet', 850);
        INSERT INTO transfers(id, ts, debit, credit, amount, reason, reference) VALUES
            (1, '2026-11-02T00:00:00.000000Z', 'mint', 'auth0|alice', 1000, 'credit', NULL),
            (2, '2026-11-02T00:00:01.000000Z', 'auth0|alice', 'market', 150, 'purchase', 'p1');
        INSERT INTO listings(id, title, connection, scopes, supply, sold, start_price, floor_price, opens_at,
                             closes_at) VALUES
            ('github-repo-read', 'GitHub: read', 'github', '["repo:read"]', 10, 3, 50, 50,
             1793491200000000, 1798761600000000),
            ('stripe-read', 'Stripe: read', 'stripe', '["read_only"]', 5, 0, 40, 10,
             1793491200000000, 1798761600000000);
        INSERT INTO holdings(id, account, listing_id, units_bought, units_held, created_at) VALUES
            (1, 'auth0|alice', 'github-repo-read', 3, 3, '2026-11-02T00:00:01.000000Z');
        INSERT INTO purchases(id, account, listing_id, units, unit_price, total, balance_after, units_held,
                              purchased_at, idempotency_key, fingerprint, transfer_id) VALUES
            ('p1', 'auth0|alice', 'github-repo-read', 3, 50, 150, 850, 3, '2026-11-02T00:00:01.000000Z', NULL,
             '', 2);
        """
    )
    conn.close()


async def test_version_2_listings_migrate_whole_with_the_defaults_of_the_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    make_v2(path)
    db = await Database.open(path)
    try:
        listings = await db.read(lambda tx: tx.page_listings(after=None, connection=None, open_at=None, limit=10))
        holdings = await db.read(lambda tx: tx.holdings_of("auth0|alice"))
        problems = await db.read(check_invariants)
        # what was sold still pins the migrated listing's scopes
        specs = market.parse_listings({"listing": [{
            "id": "github-repo-read", "title": "GitHub: read", "connection": "github", "scopes": ["repo:write"],
            "supply": 10, "start_price": 50, "floor_price": 50, "opens_at": listings[0].opens_at,
            "closes_at": listings[0].closes_at,
        }]})
        refusal = None
        try:
            await db.write(lambda tx: market.load(tx, specs))
        except market.MarketFileError as exc:
            refusal = str(exc)
    finally:
        await db.close()
    opens, closes = listings[0].opens_at, listings[0].closes_at
    assert (opens.isoformat(), closes.isoformat()) == ("2026-11-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00")
    assert listings == [
        Listing("github-repo-read", "GitHub: read", "github", ("repo:read",), 10, 3, 50, 50, opens, closes,
                delivery="token", api=(), methods=("GET", "HEAD"), approval="none"),
        Listing("stripe-read", "Stripe: read", "stripe", ("read_only",), 5, 0, 40, 10, opens, closes,
                delivery="token", api=(), methods=("GET", "HEAD"), approval="none"),
    ]
    assert [(h.listing_id, h.units_held, h.units_bought) for h in holdings] == [("github-repo-read", 3, 3)]
    assert problems == []
    assert refusal is not None and "listing github-repo-read: scopes:" in refusal
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with_defaults = conn.execute("SELECT delivery, api, methods, approval FROM listings ORDER BY id").fetchall()
    conn.close()
    assert with_defaults == [("token", "[]", '["GET", "HEAD"]', "none")] * 2


async def test_the_store_refuses_a_delivery_or_approval_outside_the_spec(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    make_v2(path)
    await (await Database.open(path)).close()
    conn = sqlite3.connect(path)
    for column, value in (("delivery", "email"), ("approval", "sometimes")):
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"), conn:
            conn.execute(f"UPDATE listings SET {column} = ? WHERE id = 'stripe-read'", (value,))
    conn.close()
