"""`db migrate`: copy a SQLite database into an empty PostgreSQL database (SPEC §12).

Everything is copied as it is stored: every row of every table, audit ids, hashes and token
fingerprints byte for byte, and meta (the token HMAC key, the audit head, control_version, the
policy), so the copy verifies and answers token lookups as the source did.

- The source is opened once with the product (SqliteDatabase.open migrates it to the current
  schema), then read in one read transaction: one consistent snapshot, even if a broker still writes.
- The target is refused unless it is empty: no schema at all, or this program's schema version with
  no row in any table (meta may hold only the control_version 0 the schema itself puts there). A
  database a broker has opened holds its HMAC key and the market and mint accounts: refused, since a
  broker running on it would keep fingerprinting tokens under its own key.
- Everything happens in one PostgreSQL transaction: the schema (the backend's own migration), the
  rows (binary COPY, streamed batch by batch, never the whole history in memory), the identities set
  past the copied ids, and the caller's `check` of the copy (the CLI verifies the chain and the
  ledger). Any failure rolls it all back: the target is left as it was.
- The migration lock and the write lock are held throughout, so no replica starts, migrates or writes
  on the target halfway.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from server.store.base import StoreUnavailable, shown_url
from server.store.database import SqliteDatabase
from server.store.pg_schema import PG_SCHEMA_VERSION
from server.store.postgres import MIGRATION_LOCK, PgTx, migrate_schema
from server.store.tx import Tx

# Every table, parents before the tables that refer to them (PostgreSQL checks foreign keys row by row)
TABLES = (
    "meta", "accounts", "transfers", "listings", "holdings", "purchases", "moves", "reservations", "grants",
    "agent_blocks", "rate_buckets", "usage", "audit_names", "audit",
)
BATCH_ROWS = 5_000  # rows read from SQLite and sent to PostgreSQL at a time
_ORDER = {"audit": "id", "audit_names": "id", "transfers": "id", "holdings": "id"}


class MigrationRefused(Exception):
    """The target is not an empty PostgreSQL database at this program's schema; nothing was written."""


class MigrationFailed(Exception):
    """The copy failed (a row PostgreSQL refused, the check of the copy); the target was left as it was."""


@dataclass(frozen=True)
class Migrated:
    """What was copied: rows per table (in TABLES order), the audit events and the chain's recorded head."""

    target: str  # the target URL, its password hidden
    rows: dict[str, int]
    events: int
    head: str | None  # "id:hash", as recorded in meta


Progress = Callable[[str, int], None]  # (table, its rows copied so far)
Check = Callable[[Tx], list[str]]  # problems found on the copy, before it commits (empty: commit)


async def migrate(
    source: str | os.PathLike[str],
    target_url: str,
    *,
    check: Check | None = None,
    progress: Progress | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Migrated:
    """Copy the SQLite database at `source` (which must exist) into the empty PostgreSQL database `target_url`.

    Raises DatabaseMissing (no source), MigrationRefused (the target is not empty), MigrationFailed
    (nothing was kept), StoreUnavailable (either database unreachable or unusable).
    """
    opened = await SqliteDatabase.open(source, create=False)  # brings the source to the current schema
    await opened.close()
    return await asyncio.to_thread(_copy, Path(source), target_url, check, progress, batch_rows)


def _copy(source: Path, url: str, check: Check | None, progress: Progress | None, batch_rows: int) -> Migrated:
    lite = sqlite3.connect(source, isolation_level=None)
    try:
        lite.execute("BEGIN")  # one snapshot of the source for the whole copy
        try:
            pg = psycopg.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"{shown_url(url)}: {_one_line(exc)}") from None
        with pg:
            try:
                with pg.transaction():
                    pg.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                    _refuse_unless_empty(pg, url)
                    migrate_schema(pg)
                    pg.execute("SELECT id FROM write_lock WHERE id = 1 FOR UPDATE")  # before any writer
                    _refuse_unless_empty(pg, url)
                    rows = {table: _copy_table(lite, pg, table, progress, batch_rows) for table in _tables(lite)}
                    _restart_identities(pg)
                    problems = check(PgTx(pg)) if check is not None else []
                    if problems:
                        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                        raise MigrationFailed(
                            "the copy did not check out, nothing was kept: " + "; ".join(problems[:3]) + more
                        )
                    found = pg.execute("SELECT text, bytes FROM meta WHERE key = 'audit_head'").fetchone()
            except psycopg.Error as exc:
                raise MigrationFailed(f"nothing was kept: {_one_line(exc)}") from None
    finally:
        lite.close()
    head = None if found is None else found[0] if found[0] is not None else bytes(found[1]).decode()
    return Migrated(shown_url(url), rows, rows.get("audit", 0), head)


def _tables(lite: sqlite3.Connection) -> tuple[str, ...]:
    """TABLES, after making sure the source has no table this copy would leave behind."""
    present = {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    unknown = sorted(present - set(TABLES) - {"sqlite_sequence", "sqlite_stat1"})
    if unknown:  # a schema change that forgot this module
        raise MigrationFailed(f"the source has tables db migrate does not know: {', '.join(unknown)}")
    return TABLES


def _refuse_unless_empty(pg: psycopg.Connection[Any], url: str) -> None:
    where = shown_url(url)
    tables = {r[0] for r in pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    if "schema_version" in tables:
        row = pg.execute("SELECT version FROM schema_version").fetchone()
        version = None if row is None else int(row[0])
        if version != PG_SCHEMA_VERSION:
            raise MigrationRefused(
                f"{where} holds a token-vault-mcp schema at version {version}, not {PG_SCHEMA_VERSION}; "
                "db migrate copies only into an empty database"
            )
    elif tables:
        shown = ", ".join(sorted(tables)[:5]) + (", …" if len(tables) > 5 else "")
        raise MigrationRefused(f"{where} is not empty (it holds tables: {shown}); "
                               "db migrate copies only into an empty database")
    for table in TABLES:
        if table not in tables:
            continue
        extra = " WHERE NOT (key = 'control_version' AND text = '0')" if table == "meta" else ""
        query = f"SELECT EXISTS (SELECT 1 FROM {table}{extra})"  # noqa: S608 - a name of TABLES
        if pg.execute(query).fetchone() != (False,):
            raise MigrationRefused(
                f"{where} is not empty (table {table} has rows); db migrate copies only into an empty database"
            )


def _copy_table(
    lite: sqlite3.Connection, pg: psycopg.Connection[Any], table: str, progress: Progress | None, batch_rows: int
) -> int:
    """Stream `table` from SQLite into PostgreSQL with a binary COPY; the rows copied."""
    columns = [r[1] for r in lite.execute(f"PRAGMA table_info({table})")]
    target = {name: type_ for name, type_ in pg.execute(
        "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a "
        "WHERE a.attrelid = CAST(%s AS regclass) AND a.attnum > 0 AND NOT a.attisdropped",
        (table,),
    )}
    convert: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None
    if table == "meta":  # SQLite's one value column takes text, bytes or a number; PostgreSQL's has two
        columns, convert = ["key", "value"], _meta_row
        names = ["key", "text", "bytes"]
        pg.execute("DELETE FROM meta")  # the control_version 0 of a new schema: the source has its own
    else:
        names = columns
    if set(names) != set(target):
        raise MigrationFailed(f"table {table} has columns {sorted(columns)} in SQLite but {sorted(target)} here")
    order = f" ORDER BY {_ORDER[table]}" if table in _ORDER else ""
    rows = lite.execute(f"SELECT {', '.join(columns)} FROM {table}{order}")  # noqa: S608 - the schema's names
    done = 0
    try:
        with pg.cursor().copy(f"COPY {table} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([target[name] for name in names])
            while batch := rows.fetchmany(batch_rows):
                for row in batch:
                    copy.write_row(convert(row) if convert is not None else row)
                done += len(batch)
                if progress is not None:
                    progress(table, done)
    except (TypeError, ValueError, AttributeError) as exc:  # a value of another type than its column's
        raise MigrationFailed(f"table {table}: a value PostgreSQL cannot take ({_one_line(exc)})") from None
    except psycopg.Error as exc:
        raise MigrationFailed(f"table {table}: {_one_line(exc)}") from None
    return done


def _meta_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    key, value = row
    if isinstance(value, bytes | memoryview):
        return key, None, bytes(value)
    if isinstance(value, int | str):  # control_version is a number in SQLite, text in PostgreSQL
        return key, str(value), None
    raise MigrationFailed(f"meta {key!r} holds a {type(value).__name__}, neither text nor bytes")


def _restart_identities(pg: psycopg.Connection[Any]) -> None:
    """Each identity column's next value past the ids copied into it (transfers, holdings, audit names)."""
    identities = pg.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND is_identity = 'YES'"
    ).fetchall()
    for table, column in identities:
        pg.execute(
            f"SELECT setval(pg_get_serial_sequence(%s, %s), coalesce(max({column}), 0) + 1, false) "  # noqa: S608
            f"FROM {table}",  # the catalog's own names
            (table, column),
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
