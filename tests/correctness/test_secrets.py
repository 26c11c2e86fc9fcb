"""No issued token, refresh token, client secret or bearer token reaches an audit row, a log line,
stderr or an error text — across successes, refusals and failures, remote and local. On SQLite and on
PostgreSQL (`both_backends`), where the sweep reads what the server stored: every table's rows, every
relation's pages as written to disk (dead rows and indexes too) and the write-ahead log of the test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import Runtime
from server.clock import ManualClock
from server.store import AuditFilter, SqliteDatabase
from tests.conftest import DEMO_NOW, held, text_of
from tests.correctness.test_concurrency import serve_from
from tests.server.remote_harness import remote_server

pytestmark = pytest.mark.both_backends
ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "secrets sweep"}


def database_bytes(runtime: Runtime, database: str, wal_from: str | None) -> bytes:
    """Everything the store holds: the SQLite file with its WAL and journal, or PostgreSQL's rows (binary COPY:
    values as stored, out of TOAST), its relations' files after a checkpoint, and the WAL since `wal_from`."""
    if isinstance(runtime.db, SqliteDatabase):
        path = runtime.db.path
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    import psycopg

    chunks: list[bytes] = []
    with psycopg.connect(database, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')")]
        assert "public.audit" in tables, tables
        for table in tables:
            with conn.cursor().copy(f"COPY {table} TO STDOUT (FORMAT binary)") as copy:
                chunks.extend(bytes(block) for block in copy)
        if wal_from is not None:  # before any checkpoint of ours, which may recycle the segments
            chunks += wal_since(conn, wal_from)
        conn.execute("CHECKPOINT")  # every page the test wrote, on disk
        files = [r[0] for r in conn.execute(
            "SELECT pg_relation_filepath(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 't', 'i') AND n.nspname NOT IN ('pg_catalog', 'information_schema')")]
        assert files
        for file in files:
            row = conn.execute("SELECT pg_read_binary_file(%s::text)", (file,)).fetchone()
            assert row is not None and row[0] is not None, file
            chunks.append(bytes(row[0]))
    return b"".join(chunks)


def wal_since(conn: Any, wal_from: str) -> list[bytes]:
    """The WAL segments from the one holding `wal_from` to the current one. A checkpoint elsewhere (the
    server's own, or another test's) may recycle an old one meanwhile: skipped, but never the newest."""
    import psycopg

    names = [r[0] for r in conn.execute(
        "SELECT w.name FROM pg_ls_waldir() w WHERE w.name ~ '^[0-9A-F]{24}$' "
        "AND w.name >= pg_walfile_name(%s::pg_lsn) AND w.name <= pg_walfile_name(pg_current_wal_lsn()) "
        "ORDER BY w.name", (wal_from,))]
    assert names
    segments: list[bytes] = []
    for name in names:
        try:
            row = conn.execute("SELECT pg_read_binary_file(%s::text)", ("pg_wal/" + name,)).fetchone()
        except psycopg.errors.UndefinedFile:
            assert name != names[-1]
            continue
        segments.append(bytes(row[0]))
    return segments


def wal_position(database: str) -> str | None:
    if not database.startswith("postgresql://"):
        return None
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


async def test_no_secret_leaks_anywhere(
    tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    serve_from(monkeypatch, database)
    wal_from = wal_position(database)
    async with held(remote_server(tmp_path, "http", ManualClock(DEMO_NOW))) as remote:
        assert isinstance(remote.runtime.db, SqliteDatabase) != database.startswith("postgresql://")
        state = remote.tenant.state
        bearers = [remote.token("auth0|alice", azp=f"agent-{n}") for n in range(2)]
        async with held(remote.client(bearers[0])) as client:
            for tool, args in (("buy_quota", {"listing_id": "github-repo-read", "units": 5, "max_unit_price": 99}),
                               ("request_token", ASK), ("request_token", {**ASK, "login_hint": "a@example.com"}),
                               ("request_token", {**ASK, "scopes": ["repo:write"]}), ("check_balance", {})):
                result = await client.call_tool(tool, args)
                if result.is_error:  # a successful request_token carries its token, by design
                    texts.append(text_of(result))
            state.faults.fail_next(503, count=50)
            texts.append(text_of(await client.call_tool("request_token", {**ASK, "login_hint": "b@example.com"})))
            state.faults.clear()
            state.revoke_connection("auth0|alice", "github")
            texts.append(text_of(await client.call_tool("request_token", {**ASK, "login_hint": "c@example.com"})))
        async with httpx.AsyncClient(base_url=remote.base_url) as http:
            for bad in (bearers[1] + "x", bearers[1][:-5], remote.token("auth0|alice", extra_claims={"exp": 1})):
                answer = await http.post("/mcp", json={}, headers={"Authorization": f"Bearer {bad}"})
                texts.append(answer.text + str(answer.headers))
        secrets = [remote.tenant.client_secret, remote.tenant.refresh_token, *bearers]
        secrets += [issue.access_token for issue in state.vault_issues]
        assert len(state.vault_issues) >= 2
        records = await remote.runtime.db.read(lambda tx: tx.find_audit(AuditFilter()))
        audit_text = "\n".join(f"{r.args} {r.account} {r.agent} {r.code}" for r in records)
        stored = database_bytes(remote.runtime, database, wal_from)
    out, err = capfd.readouterr()
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert len(texts) >= 6
    assert b"secrets sweep" in stored  # the purpose of ASK: the sweep does see what the broker stored
    for secret in secrets:
        assert secret not in audit_text
        assert secret.encode() not in stored
        assert secret not in logs
        assert secret not in err and secret not in out
        assert all(secret not in text for text in texts)
    assert "eyJ" not in audit_text and "eyJ" not in logs  # no JWT of any kind, e.g. the refresh grant's
