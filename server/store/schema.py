"""The SQLite schema, as an ordered list of migrations. `PRAGMA user_version` is the schema version."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: ledger, market, holdings, reservations, audit
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE accounts (
        name    TEXT PRIMARY KEY,
        kind    TEXT NOT NULL CHECK (kind IN ('wallet', 'market', 'mint')),
        balance INTEGER NOT NULL DEFAULT 0,
        CHECK (kind <> 'wallet' OR balance >= 0),
        CHECK (kind <> 'market' OR balance >= 0)
    ) WITHOUT ROWID;

    CREATE TABLE transfers (
        id        INTEGER PRIMARY KEY,
        ts        TEXT NOT NULL,
        debit     TEXT NOT NULL REFERENCES accounts(name),
        credit    TEXT NOT NULL REFERENCES accounts(name),
        amount    INTEGER NOT NULL CHECK (amount > 0),
        reason    TEXT NOT NULL,
        reference TEXT
    );
    CREATE INDEX transfers_debit ON transfers(debit);
    CREATE INDEX transfers_credit ON transfers(credit);

    CREATE TABLE listings (
        id          TEXT PRIMARY KEY,
        title       TEXT NOT NULL,
        connection  TEXT NOT NULL,
        scopes      TEXT NOT NULL,
        supply      INTEGER NOT NULL CHECK (supply >= 0),
        sold        INTEGER NOT NULL DEFAULT 0 CHECK (sold >= 0),
        start_price INTEGER NOT NULL CHECK (start_price >= 0),
        floor_price INTEGER NOT NULL CHECK (floor_price >= 0 AND floor_price <= start_price),
        opens_at    INTEGER NOT NULL,
        closes_at   INTEGER NOT NULL CHECK (closes_at > opens_at),
        CHECK (sold <= supply)
    ) WITHOUT ROWID;
    CREATE INDEX listings_connection ON listings(connection, id);

    CREATE TABLE holdings (
        id             INTEGER PRIMARY KEY,
        account        TEXT NOT NULL,
        listing_id     TEXT NOT NULL REFERENCES listings(id),
        units_bought   INTEGER NOT NULL DEFAULT 0 CHECK (units_bought >= 0),
        units_held     INTEGER NOT NULL DEFAULT 0 CHECK (units_held >= 0),
        units_consumed INTEGER NOT NULL DEFAULT 0 CHECK (units_consumed >= 0),
        units_reserved INTEGER NOT NULL DEFAULT 0 CHECK (units_reserved >= 0),
        created_at     TEXT NOT NULL,
        UNIQUE (account, listing_id),
        CHECK (units_bought = units_held + units_consumed + units_reserved)
    );

    CREATE TABLE purchases (
        id              TEXT PRIMARY KEY,
        account         TEXT NOT NULL,
        listing_id      TEXT NOT NULL REFERENCES listings(id),
        units           INTEGER NOT NULL CHECK (units > 0),
        unit_price      INTEGER NOT NULL,
        total           INTEGER NOT NULL,
        balance_after   INTEGER NOT NULL,
        units_held      INTEGER NOT NULL,
        purchased_at    TEXT NOT NULL,
        idempotency_key TEXT,
        fingerprint     TEXT NOT NULL,
        transfer_id     INTEGER REFERENCES transfers(id)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX purchases_idempotency ON purchases(account, idempotency_key)
        WHERE idempotency_key IS NOT NULL;

    CREATE TABLE reservations (
        id         TEXT PRIMARY KEY,
        holding_id INTEGER NOT NULL REFERENCES holdings(id),
        status     TEXT NOT NULL CHECK (status IN ('pending', 'committed', 'refunded')),
        owner      TEXT NOT NULL,
        created_at TEXT NOT NULL,
        settled_at TEXT
    ) WITHOUT ROWID;
    CREATE INDEX reservations_pending ON reservations(status) WHERE status = 'pending';

    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        ts         TEXT NOT NULL,
        account    TEXT,
        agent      TEXT,
        tool       TEXT,
        transport  TEXT NOT NULL,
        scope      TEXT,
        outcome    TEXT NOT NULL CHECK (outcome IN ('ok', 'denied', 'error')),
        code       TEXT,
        args       TEXT NOT NULL,
        token_id   BLOB,
        latency_ms REAL,
        prev_hash  BLOB NOT NULL,
        hash       BLOB NOT NULL
    );
    CREATE INDEX audit_account ON audit(account, id);
    CREATE INDEX audit_token ON audit(token_id) WHERE token_id IS NOT NULL;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
