"""All persistence of the broker: SQLite through aiosqlite, every SQL statement in this package."""

from server.store.database import Database, StoreUnavailable
from server.store.tx import AuditFilter, LedgerTotals, Tx

__all__ = ["AuditFilter", "Database", "LedgerTotals", "StoreUnavailable", "Tx"]
