"""All persistence of the broker, every SQL statement in this package: SQLite (the embedded default) or
PostgreSQL (replicas), behind one seam (server.store.base)."""

from server.store.base import Database, DatabaseMissing, StoreUnavailable, open_database
from server.store.database import SqliteDatabase
from server.store.tx import AUDIT_HEAD_KEY, AuditFilter, LedgerTotals, Tx

__all__ = [
    "AUDIT_HEAD_KEY",
    "AuditFilter",
    "Database",
    "DatabaseMissing",
    "LedgerTotals",
    "SqliteDatabase",
    "StoreUnavailable",
    "Tx",
    "open_database",
]
