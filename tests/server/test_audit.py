"""The audit log is a hash chain that notices edits, gaps, cuts and reordering, and it fails closed."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import audit, ledger
from server.audit import Event
from server.broker import Broker
from server.clock import rfc3339
from server.errors import AuditUnavailable
from server.store import Database, StoreUnavailable, Tx, open_database
from tests.conftest import side

pytestmark = pytest.mark.both_backends

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
COLUMNS = "ts, account, agent, tool, transport, scope, outcome, code, args, token_id, latency_ms, hash"


def event(n: int, **changes: object) -> Event:
    fields: dict[str, object] = {
        "ts": rfc3339(NOW.replace(minute=n)),
        "transport": "stdio",
        "outcome": "ok",
        "account": f"auth0|user-{n % 2}",
        "agent": "claude",
        "tool": "list_market",
        "scope": "read:market",
        "args": {"limit": n, "purpose": f"call {n}"},
        "latency_ms": 1.25 * n,
    }
    fields.update(changes)
    return Event(**fields)  # type: ignore[arg-type]


@pytest.fixture
def path(database: str) -> str:
    """The store behind the `db` fixture (TVM_DATABASE), for tampering with it directly."""
    return database


async def append(db: Database, ev: Event) -> int:
    return await db.write(lambda tx: audit.append(tx, ev))


async def five(db: Database) -> list[int]:
    return [await append(db, event(n, token_id=b"\x01" * 32 if n == 3 else None)) for n in range(1, 6)]


def check(tx: Tx) -> audit.VerifyResult:
    """What `audit verify` runs: the rows against the recorded head."""
    return audit.verify_log(tx)


def tamper(path: str, *statements: str) -> None:
    """Change the database behind the broker's back, as someone with the file (or the database) could."""
    with side(path) as other:
        for statement in statements:
            other.execute(statement)


def dialect(path: str, sqlite: str, postgresql: str) -> str:
    """The statement in the test store's own SQL, where the two differ."""
    return postgresql if path.startswith("postgresql://") else sqlite


# ---- the chain -------------------------------------------------------------------------------------

async def test_appended_events_get_consecutive_ids_and_the_chain_verifies(db: Database) -> None:
    assert await five(db) == [1, 2, 3, 4, 5]
    result = await db.read(check)
    assert (result.ok, result.checked, result.bad_id) == (True, 5, None)
    records = await db.read(lambda tx: list(tx.iter_audit()))
    assert records[0].prev_hash == audit.GENESIS
    assert all(later.prev_hash == earlier.hash for earlier, later in itertools.pairwise(records))


async def test_an_empty_log_verifies(db: Database) -> None:
    assert (await db.read(check)).ok


# a name written over its id (SQLite stores what it is given) is, in PostgreSQL's typed columns, another name's id
TYPED_EDITS = {
    "UPDATE audit SET outcome = 'denied' WHERE id = 3":
        "UPDATE audit SET outcome = (SELECT id FROM audit_names WHERE name = 'stdio') WHERE id = 3",
    "UPDATE audit SET account = 'auth0|someone-else' WHERE id = 3":
        "UPDATE audit SET account = (SELECT id FROM audit_names WHERE name = 'claude') WHERE id = 3",
}


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE audit SET args = '{\"limit\":3,\"purpose\":\"nothing to see\"}' WHERE id = 3",
        "UPDATE audit SET outcome = 'denied' WHERE id = 3",
        "UPDATE audit SET account = 'auth0|someone-else' WHERE id = 3",
        "UPDATE audit SET latency_ms = 0.5 WHERE id = 3",
        "UPDATE audit SET token_id = NULL WHERE id = 3",
        "UPDATE audit SET token_id = ? WHERE id = 3",
        "UPDATE audit SET account = (SELECT account FROM audit WHERE id = 2) WHERE id = 3",
        "UPDATE audit SET scope = NULL WHERE id = 3",
        "UPDATE audit SET code = (SELECT outcome FROM audit WHERE id = 1) WHERE id = 3",
        "UPDATE audit SET ts = ? WHERE id = 3",
        "UPDATE audit SET hash = 'abc' WHERE id = 3",
    ],
    ids=["args", "outcome-text", "account-text", "latency", "token-id-cleared", "token-id-set", "account-id",
         "scope-null", "code-set", "ts-number", "hash-text"],
)
async def test_editing_a_row_breaks_the_chain_at_that_event(db: Database, path: str, edit: str) -> None:
    await five(db)
    # 32 zero bytes; a number as a time (SQLite keeps it as stored, PostgreSQL's column is text)
    value: tuple[object, ...] = (bytes(32),) if "token_id = ?" in edit else (12,) if "ts = ?" in edit else ()
    if path.startswith("postgresql://"):  # PostgreSQL's columns take only their own type
        value = ("12",) if "ts = ?" in edit else value
        edit = TYPED_EDITS.get(edit, edit)
    with side(path) as other:
        other.execute(edit, value)
    result = await db.read(check)
    assert (result.ok, result.bad_id, result.checked) == (False, 3, 2)
    assert "edited" in (result.reason or "")


async def test_an_edited_row_with_a_recomputed_hash_breaks_the_chain_at_the_next_event(
    db: Database, path: str
) -> None:
    await five(db)
    third = (await db.read(lambda tx: list(tx.iter_audit())))[2]
    forged_args = '{"limit":3,"purpose":"nothing to see"}'
    forged = audit.chain_hash(third.prev_hash, audit._hash_input(
        third.id, third.ts, third.account, third.agent, third.tool, third.transport, third.scope, third.outcome,
        third.code, forged_args, third.token_id, third.latency_ms,
    ))
    with side(path) as other:
        other.execute("UPDATE audit SET args = ?, hash = ? WHERE id = 3", (forged_args, forged))
    result = await db.read(check)
    assert (result.ok, result.bad_id, result.checked) == (False, 4, 3)  # event 3 itself is consistent now
    assert "the event before it" in (result.reason or "")


async def test_renaming_a_stored_name_breaks_the_chain_at_its_first_event(db: Database, path: str) -> None:
    await five(db)  # events 1, 3, 5 are auth0|user-1's
    tamper(path, "UPDATE audit_names SET name = 'auth0|someone-else' WHERE name = 'auth0|user-1'")
    result = await db.read(check)
    assert (result.ok, result.bad_id, result.checked) == (False, 1, 0)


async def test_deleting_a_stored_name_breaks_the_chain_at_its_first_event(db: Database, path: str) -> None:
    await five(db)
    tamper(path, "DELETE FROM audit_names WHERE name = 'auth0|user-0'")  # events 2 and 4
    result = await db.read(check)
    assert (result.ok, result.bad_id, result.checked) == (False, 2, 1)
    assert "edited" in (result.reason or "")


async def test_deleting_a_middle_event_is_named(db: Database, path: str) -> None:
    await five(db)
    tamper(path, "DELETE FROM audit WHERE id = 3")
    result = await db.read(check)
    assert not result.ok
    assert "event 3 is missing" in (result.reason or "")


async def test_deleting_the_newest_event_is_noticed(db: Database, path: str) -> None:
    await five(db)
    tamper(path, "DELETE FROM audit WHERE id = 5")
    result = await db.read(check)
    assert (result.ok, result.bad_id, result.checked) == (False, 5, 4)
    assert "5" in (result.reason or "")


async def test_a_cut_tail_stays_noticed_after_further_events(db: Database, path: str) -> None:
    await five(db)
    tamper(path, "DELETE FROM audit WHERE id >= 4")
    assert await append(db, event(6)) == 6  # the next event continues the recorded chain, over the gap
    result = await db.read(check)
    assert not result.ok
    assert "event 4 is missing" in (result.reason or "")


async def test_deleting_the_recorded_head_is_noticed(db: Database, path: str) -> None:
    await five(db)
    tamper(path, f"DELETE FROM meta WHERE key = '{audit.HEAD_KEY}'", "DELETE FROM audit WHERE id = 5")
    result = await db.read(check)
    assert (result.ok, result.bad_id) == (False, 4)
    assert "head" in (result.reason or "")


async def test_an_unreadable_recorded_head_is_reported_not_raised(db: Database, path: str) -> None:
    await five(db)
    tamper(path, dialect(path, f"UPDATE meta SET value = 'garbage' WHERE key = '{audit.HEAD_KEY}'",
                         f"UPDATE meta SET text = 'garbage' WHERE key = '{audit.HEAD_KEY}'"))
    result = await db.read(check)
    assert not result.ok
    assert "unreadable" in (result.reason or "")
    with pytest.raises(AuditUnavailable):  # nothing more is chained onto a head nobody can read
        await append(db, event(6))


async def test_swapping_two_events_contents_breaks_the_chain(db: Database, path: str) -> None:
    await five(db)
    tamper(
        path,
        f"CREATE TEMP TABLE keep AS SELECT id, {COLUMNS} FROM audit WHERE id IN (2, 3)",
        "UPDATE audit SET " + ", ".join(f"{c} = (SELECT {c} FROM keep WHERE keep.id = 5 - audit.id)"
                                        for c in COLUMNS.split(", ")) + " WHERE id IN (2, 3)",
    )
    swapped = await db.read(lambda tx: [r.args for r in tx.iter_audit()])
    assert json.loads(swapped[1])["purpose"] == "call 3"  # the swap really happened
    result = await db.read(check)
    assert (result.ok, result.bad_id) == (False, 2)


async def test_verify_reports_progress_every_ten_thousand_events(db: Database) -> None:
    seen: list[int] = []

    def many(tx: Tx) -> None:
        for n in range(20_001):
            audit.append(tx, event(n % 60))

    await db.write(many)

    def check_with_progress(tx: Tx) -> audit.VerifyResult:
        return audit.verify_log(tx, seen.append)

    result = await db.read(check_with_progress)
    assert result.ok and result.checked == 20_001
    assert seen == [10_000, 20_000]


# ---- what an event holds -------------------------------------------------------------------------------

async def test_token_id_is_an_hmac_under_the_databases_own_key(tmp_path: Path, db: Database, path: str) -> None:
    token = "gho_live_token_abc123"
    mine = audit.token_fingerprint(db.hmac_key, token)
    assert mine == hmac.new(db.hmac_key, token.encode(), hashlib.sha256).digest()
    assert mine != hashlib.sha256(token.encode()).digest()
    assert audit.token_fingerprint(db.hmac_key, token + "x") != mine
    other = await Database.open(tmp_path / "other.db")
    try:
        assert other.hmac_key != db.hmac_key
        assert audit.token_fingerprint(other.hmac_key, token) != mine
    finally:
        await other.close()
    await append(db, event(1, token_id=mine))
    await db.close()
    again = await open_database(path)
    try:
        assert audit.token_fingerprint(again.hmac_key, token) == mine  # stable: the key lives in the database
    finally:
        await again.close()
    if path.startswith("postgresql://"):
        with side(path) as other:
            assert other.execute("SELECT token_id FROM audit") == [(mine,)]
            dump = "".join(str(row) for table in ("audit", "meta", "audit_names")
                           for row in other.execute(f"SELECT * FROM {table}"))
        assert token not in dump
        return
    file = Path(path)
    stored = b"".join(f.read_bytes() for f in file.parent.iterdir() if f.name.startswith(file.name))
    assert mine in stored
    assert token.encode() not in stored


def test_redact_keeps_known_fields_and_purpose_and_hides_the_rest() -> None:
    clean = audit.redact(
        {
            "connection": "github",
            "scopes": ["repo:read", "repo:write"],
            "purpose": "list open issues",
            "units": 3,
            "include_closed": False,
            "cursor": None,
            "login_hint": "alice@example.com",
            "access_token": "gho_secret",
            "client_secret": "shh",
        }
    )
    assert clean == {
        "connection": "github",
        "scopes": ["repo:read", "repo:write"],
        "purpose": "list open issues",
        "units": 3,
        "include_closed": False,
        "cursor": None,
        "login_hint": "alice@example.com",  # which connected account: SPEC §8 records it
        "access_token": audit.REDACTED,
        "client_secret": audit.REDACTED,
    }


def test_redact_cuts_long_strings_and_hides_nested_objects() -> None:
    clean = audit.redact(
        {
            "purpose": "p" * 5_000,
            "scopes": ["s" * 600, {"token": "x"}] + ["a"] * 50,
            "connection": {"nested": "secret"},
            "k" * 100: "v",
        }
    )
    assert clean["purpose"] == "p" * audit.MAX_TEXT + "…"
    assert clean["scopes"][0] == "s" * audit.MAX_TEXT + "…"
    assert clean["scopes"][1] == audit.REDACTED
    assert len(clean["scopes"]) == 32
    assert clean["connection"] == audit.REDACTED
    assert "secret" not in json.dumps(clean)
    assert all(len(key) <= 65 for key in clean)


async def test_stored_args_are_the_redacted_ones(db: Database) -> None:
    await append(db, event(1, args={"purpose": "why", "refresh_token": "r3fr3sh", "url": "https://a.example/x?k=v"}))
    (record,) = await db.read(lambda tx: list(tx.iter_audit()))
    assert json.loads(record.args) == {"purpose": "why", "refresh_token": audit.REDACTED, "url": "https://a.example/x?k="}
    assert "r3fr3sh" not in json.dumps(audit.export_line(record))


async def test_export_line_has_exactly_the_documented_keys(db: Database) -> None:
    await append(db, event(1, token_id=b"\xab" * 32))
    (record,) = await db.read(lambda tx: list(tx.iter_audit()))
    line = audit.export_line(record)
    assert list(line) == ["id", "ts", "account", "agent", "tool", "transport", "scope", "outcome", "code", "args",
                          "token_id", "latency_ms", "prev_hash", "hash"]
    assert line["token_id"] == "ab" * 32
    assert line["prev_hash"] == "00" * 32
    assert line["args"] == {"limit": 1, "purpose": "call 1"}


# ---- fail closed ---------------------------------------------------------------------------------------

def break_audit_table(path: str) -> None:
    if path.startswith("postgresql://"):
        tamper(path, "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS "
                     "$$BEGIN RAISE EXCEPTION 'disk full'; END$$",
               "CREATE TRIGGER t BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION disk_full()")
    else:
        tamper(path, "CREATE TRIGGER t BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk full'); END")


# The row's failure as a job sees it: AuditUnavailable where the INSERT runs at once (SQLite), StoreUnavailable
# where it travels with the COMMIT (PostgreSQL); the broker answers audit_unavailable for either.
WRITE_FAILED = (AuditUnavailable, StoreUnavailable)


async def test_append_raises_audit_unavailable_when_the_row_cannot_be_written(db: Database, path: str) -> None:
    await append(db, event(1))
    break_audit_table(path)
    with pytest.raises(WRITE_FAILED):
        await append(db, event(2))
    assert (await db.read(check)).ok  # nothing half-written: head and rows still agree


def transfers(path: str) -> int:
    with side(path) as other:
        return int(other.execute("SELECT count(*) FROM transfers")[0][0])


async def test_a_job_whose_event_cannot_be_written_leaves_no_transfer(db: Database, path: str) -> None:
    break_audit_table(path)

    def credit_and_record(tx: Tx) -> int:
        ledger.credit(tx, "auth0|alice", 500, NOW)
        return audit.append(tx, event(1, tool="wallet_credit", args={"account": "auth0|alice", "amount": 500}))

    with pytest.raises(WRITE_FAILED):
        await db.write(credit_and_record)
    assert transfers(path) == 0
    assert await db.read(lambda tx: tx.balance("auth0|alice")) is None


async def test_an_operator_credit_fails_closed_when_the_audit_log_is_down(db: Database, path: str) -> None:
    broker = Broker(db)
    assert await broker.credit("auth0|alice", 100) == 100
    break_audit_table(path)
    with pytest.raises(AuditUnavailable):
        await broker.credit("auth0|alice", 500)
    assert transfers(path) == 1
    assert await db.read(lambda tx: tx.balance("auth0|alice")) == 100



_TEXT = st.one_of(st.none(), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))


@settings(max_examples=300, deadline=None)
@given(
    id_=st.one_of(st.integers(min_value=-(10**20), max_value=10**20), st.booleans()),
    texts=st.lists(_TEXT, min_size=9, max_size=9),
    token_id=st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
    latency=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 10**6)),
)
def test_the_fast_event_encoding_is_byte_for_byte_the_canonical_json(
    id_: int, texts: list[str | None], token_id: bytes | None, latency: float | None
) -> None:
    ts, account, agent, tool, transport, scope, outcome, code, args = texts
    fields = (id_, ts, account, agent, tool, transport, scope, outcome, code, args, token_id, latency)
    expected = audit.canonical(
        {"id": id_, "ts": ts, "account": account, "agent": agent, "tool": tool, "transport": transport,
         "scope": scope, "outcome": outcome, "code": code, "args": args,
         "token_id": None if token_id is None else token_id.hex(), "latency_ms": latency}
    )
    assert audit._hash_input(*fields) == expected  # type: ignore[arg-type]
