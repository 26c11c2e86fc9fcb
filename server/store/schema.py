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
    # 2: a smaller audit log. Each name an event repeats (account, agent, tool, transport, scope,
    # outcome, code) is stored once in audit_names and referred to by its id; prev_hash is not
    # stored (it is the previous event's hash). Hashes are unchanged: they cover the names, not the ids.
    """
    CREATE TABLE audit_names (
        id   INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );
    INSERT INTO audit_names(name)
        SELECT v FROM (
            SELECT account AS v FROM audit UNION SELECT agent FROM audit UNION SELECT tool FROM audit
            UNION SELECT transport FROM audit UNION SELECT scope FROM audit UNION SELECT outcome FROM audit
            UNION SELECT code FROM audit
        ) WHERE v IS NOT NULL ORDER BY v;
    CREATE TABLE audit_v2 (
        id         INTEGER PRIMARY KEY,
        ts         TEXT NOT NULL,
        account    INTEGER,
        agent      INTEGER,
        tool       INTEGER,
        transport  INTEGER NOT NULL,
        scope      INTEGER,
        outcome    INTEGER NOT NULL,
        code       INTEGER,
        args       TEXT NOT NULL,
        token_id   BLOB,
        latency_ms REAL,
        hash       BLOB NOT NULL
    );
    INSERT INTO audit_v2(id, ts, account, agent, tool, transport, scope, outcome, code, args, token_id,
                         latency_ms, hash)
        SELECT a.id, a.ts,
               (SELECT n.id FROM audit_names n WHERE n.name = a.account),
               (SELECT n.id FROM audit_names n WHERE n.name = a.agent),
               (SELECT n.id FROM audit_names n WHERE n.name = a.tool),
               (SELECT n.id FROM audit_names n WHERE n.name = a.transport),
               (SELECT n.id FROM audit_names n WHERE n.name = a.scope),
               (SELECT n.id FROM audit_names n WHERE n.name = a.outcome),
               (SELECT n.id FROM audit_names n WHERE n.name = a.code),
               a.args, a.token_id, a.latency_ms, a.hash
        FROM audit a ORDER BY a.id;
    DROP TABLE audit;
    ALTER TABLE audit_v2 RENAME TO audit;
    CREATE INDEX audit_account ON audit(account, id);
    CREATE INDEX audit_token ON audit(token_id) WHERE token_id IS NOT NULL;
    CREATE VIEW audit_events AS
        SELECT a.id, a.ts, account.name AS account, agent.name AS agent, tool.name AS tool,
               transport.name AS transport, scope.name AS scope, outcome.name AS outcome, code.name AS code,
               a.args, a.token_id, a.latency_ms, a.hash
        FROM audit a
        LEFT JOIN audit_names account ON account.id = a.account
        LEFT JOIN audit_names agent ON agent.id = a.agent
        LEFT JOIN audit_names tool ON tool.id = a.tool
        LEFT JOIN audit_names transport ON transport.id = a.transport
        LEFT JOIN audit_names scope ON scope.id = a.scope
        LEFT JOIN audit_names outcome ON outcome.id = a.outcome
        LEFT JOIN audit_names code ON code.id = a.code;
    """,
    # 3: what a listing lets its holders do (§8–§9): how quota is delivered, the API bases and methods
    # call_api may use, and which calls need the account owner's approval. Existing listings get the
    # defaults: tokens handed out as before, no API, GET and HEAD, no approval.
    """
    ALTER TABLE listings ADD COLUMN delivery TEXT NOT NULL DEFAULT 'token'
        CHECK (delivery IN ('token', 'proxy'));
    ALTER TABLE listings ADD COLUMN api TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE listings ADD COLUMN methods TEXT NOT NULL DEFAULT '["GET", "HEAD"]';
    ALTER TABLE listings ADD COLUMN approval TEXT NOT NULL DEFAULT 'none'
        CHECK (approval IN ('none', 'grant', 'writes'));
    """,
    # 4: brokered grants (§8). A grant is what one unit of a listing with an API bought: calls to that
    # API for a while. The reservation that paid for it is unique to it; the token is never stored.
    """
    CREATE TABLE grants (
        id             TEXT PRIMARY KEY,
        account        TEXT NOT NULL,
        agent          TEXT NOT NULL,
        connection     TEXT NOT NULL,
        scopes         TEXT NOT NULL,
        login_hint     TEXT NOT NULL DEFAULT '',
        holding_id     INTEGER NOT NULL REFERENCES holdings(id),
        reservation_id TEXT NOT NULL UNIQUE REFERENCES reservations(id),
        token_id       BLOB NOT NULL,
        opened_at      INTEGER NOT NULL,
        expires_at     INTEGER NOT NULL CHECK (expires_at >= opened_at),
        closed_at      INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX grants_live ON grants(account, agent, connection, scopes, login_hint, expires_at)
        WHERE closed_at IS NULL;
    """,
    # 5: operator control (§9). Blocked agents; per (account, agent) rate-limit buckets and usage counters
    # (credits spent per UTC day, tokens and grants per UTC hour) that the policy caps; which agent holds a
    # reservation (and for which tool) and which hour's grant count it took, so a refund gives it back. The policy
    # itself is one document in meta ('policy'); 'control_version' changes with every block, unblock or load.
    """
    CREATE TABLE agent_blocks (
        agent      TEXT PRIMARY KEY,
        reason     TEXT NOT NULL,
        blocked_at TEXT NOT NULL,
        blocked_by TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE rate_buckets (
        account    TEXT NOT NULL,
        agent      TEXT NOT NULL,
        tokens     REAL NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (account, agent)
    ) WITHOUT ROWID;
    CREATE TABLE usage (
        account TEXT NOT NULL,
        agent   TEXT NOT NULL,
        kind    TEXT NOT NULL CHECK (kind IN ('spend', 'grants')),
        period  TEXT NOT NULL,
        amount  INTEGER NOT NULL CHECK (amount >= 0),
        PRIMARY KEY (account, agent, kind, period)
    ) WITHOUT ROWID;
    ALTER TABLE reservations ADD COLUMN agent TEXT;
    ALTER TABLE reservations ADD COLUMN counted TEXT;
    ALTER TABLE reservations ADD COLUMN tool TEXT;
    INSERT INTO meta(key, value) VALUES ('control_version', 0) ON CONFLICT(key) DO NOTHING;
    """,
    # 6: reservation leases (§12). The process holding a pending reservation renews its lease while it
    # works; once the lease lapses any process sharing the database may refund it (a replica that died on
    # another machine). Reservations from before have none: only their owner's death on this host frees them.
    """
    ALTER TABLE reservations ADD COLUMN lease_until INTEGER;
    """,
    # 7: not this branch's — the console's schema change (issue 16, written in parallel) is version 7;
    # the integrator puts it here. Empty so that this list's index stays the version number.
    "",
    # 8: operator moves (§11 "CLI twins", the console's allocation): credits or units moved from one
    # account to another by an operator. A credits move is also one `transfers` row (wallet to wallet,
    # reason 'wallet_transfer'); a units move changes two holdings, whose units_bought then counts units
    # acquired (bought + moved in - moved out) — the invariant checker reconciles both with this table.
    # `from_after` / `to_after` are the balances (credits) or units held (units) right after the move,
    # what a replay with the same idempotency key answers again.
    """
    CREATE TABLE moves (
        id              TEXT PRIMARY KEY,
        kind            TEXT NOT NULL CHECK (kind IN ('credits', 'units')),
        from_account    TEXT NOT NULL,
        to_account      TEXT NOT NULL CHECK (to_account <> from_account),
        listing_id      TEXT REFERENCES listings(id),
        amount          INTEGER NOT NULL CHECK (amount > 0),
        from_after      INTEGER NOT NULL,
        to_after        INTEGER NOT NULL,
        operator        TEXT NOT NULL,
        moved_at        TEXT NOT NULL,
        idempotency_key TEXT,
        fingerprint     TEXT NOT NULL,
        transfer_id     INTEGER REFERENCES transfers(id),
        CHECK ((kind = 'credits') = (listing_id IS NULL)),
        CHECK ((kind = 'credits') = (transfer_id IS NOT NULL))
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX moves_idempotency ON moves(idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX moves_listing ON moves(listing_id) WHERE listing_id IS NOT NULL;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
