"""What an operator sees: listings priced now, wallets, agents, audit summaries.

One source for the command line (`market list`, `agent list`, `wallet show`, `audit list`) and the
web console (SPEC §11), so a page shows exactly what the CLI prints for the same database. Each
function is a store job or runs inside one (a `Tx`); none writes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from server import market
from server.clock import rfc3339
from server.models import AuditRecord, Grant, Holding
from server.store import AuditFilter, Tx

ALL_LISTINGS = 1_000_000  # the operator sees every listing (agents page through list_market instead)


def listings(tx: Tx, now: datetime) -> list[market.PricedListing]:
    """Every listing, by id, with its price at `now` (`market list`)."""
    rows = tx.page_listings(after=None, connection=None, open_at=None, limit=ALL_LISTINGS)
    return [market.price_now(item, now) for item in rows]


def listing_status(p: market.PricedListing, now: datetime) -> str:
    """`open`, `upcoming` or `closed` at `now`."""
    if p.open:
        return "open"
    return "upcoming" if now < p.listing.opens_at else "closed"


def listing_json(p: market.PricedListing, now: datetime) -> dict[str, Any]:
    """A listing as `market list --json` prints it."""
    item = p.listing
    return {
        "listing_id": item.id, "title": item.title, "connection": item.connection, "scopes": list(item.scopes),
        "unit_price": p.unit_price, "start_price": item.start_price, "floor_price": item.floor_price,
        "opens_at": rfc3339(item.opens_at), "closes_at": rfc3339(item.closes_at),
        "supply": item.supply, "supply_remaining": item.supply_remaining, "status": listing_status(p, now),
        "delivery": item.delivery, "api": list(item.api), "methods": list(item.methods), "approval": item.approval,
    }


class AgentTally:
    """`Tx.agents_seen`, kept current by reading only the events appended since the last look.

    `agents_seen` passes the whole log (1.7 s at a million events): right for one `agent list`, not for
    a page that refreshes every few seconds. The log only grows, so the counts of the events seen so far
    stand; a lock keeps two readers from counting the same events twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._after = 0
        self._pairs: dict[tuple[int, int | None], tuple[int, str]] = {}  # (agent, account) → (calls, last ts)

    def seen(self, tx: Tx) -> list[tuple[str, int, str, list[str]]]:
        """What `tx.agents_seen()` answers, in the same shape and order."""
        with self._lock:
            for agent_id, account_id, calls, last, last_id in tx.agent_activity(self._after):
                counted = self._pairs.get((agent_id, account_id), (0, ""))
                self._pairs[(agent_id, account_id)] = (counted[0] + calls, max(counted[1], last))
                self._after = max(self._after, last_id)
            pairs = dict(self._pairs)
        names = tx.audit_names()
        seen: dict[str, tuple[int, str, list[str]]] = {}
        for (agent_key, account_key), (total, newest) in pairs.items():
            agent = names.get(agent_key, str(agent_key))
            before = seen.get(agent, (0, "", []))
            accounts = before[2] + ([names.get(account_key, str(account_key))] if account_key is not None else [])
            seen[agent] = (before[0] + total, max(before[1], newest), accounts)
        return [(agent, calls, last, sorted(accounts)) for agent, (calls, last, accounts) in sorted(seen.items())]


def agents(tx: Tx, tally: AgentTally | None = None) -> list[dict[str, Any]]:
    """Every agent seen in the audit log or blocked: accounts, calls, last call, blocked and why (`agent list`).

    With `tally`, the activity comes from it (kept current) instead of a pass over the whole log."""
    blocked = {agent: (reason, at, by) for agent, reason, at, by in tx.blocks()}
    rows: list[dict[str, Any]] = [
        {"agent": agent, "accounts": accounts, "calls": calls, "last_call": last, "blocked": agent in blocked,
         "reason": blocked.get(agent, (None,))[0]}
        for agent, calls, last, accounts in (tally.seen(tx) if tally is not None else tx.agents_seen())
    ]
    seen = {r["agent"] for r in rows}
    rows += [{"agent": agent, "accounts": [], "calls": 0, "last_call": None, "blocked": True, "reason": reason}
             for agent, (reason, _, _) in sorted(blocked.items()) if agent not in seen]
    return rows


@dataclass(frozen=True)
class Wallet:
    account: str
    balance: int
    holdings: list[Holding]


def wallets(tx: Tx, limit: int) -> list[Wallet]:
    """The first `limit` wallets by account, each with its holdings (`wallet show` for each)."""
    return [Wallet(name, balance, tx.holdings_of(name)) for name, balance in tx.wallets(limit)]


def live_grants(tx: Tx, now: datetime, limit: int) -> list[Grant]:
    return tx.all_live_grants(now, limit)


@dataclass(frozen=True)
class AuditPage:
    events: list[AuditRecord]  # newest first
    older: int | None  # the `before_id` of the next (older) page; None: nothing older is left
    searched_from: int | None  # the oldest event id looked at, when the page stopped short of `size` (its budget)


SCAN_WINDOW = 25_000  # event ids looked at per query (≈ 3 ms of SQLite on this machine, more under load)
SCAN_BUDGET = 0.12  # seconds one page may spend looking for matches before it answers with what it found


def audit_page(
    tx: Tx, where: AuditFilter, size: int, *, window: int = SCAN_WINDOW, budget: float = SCAN_BUDGET
) -> AuditPage:
    """The newest `size` events matching `where`, older than `where.before_id` when set.

    Keyset paging on the event id, in windows of `window` ids walked newest first, so a page costs the
    same at event 10 as at event 1,000,000 and a filter that matches only old events (or nothing) is
    bounded by `budget`: the page then holds the matches found so far, `searched_from` says how far it
    looked, and `older` continues from there. No index beyond the id is needed, so the audit log's
    writes (every tool call) pay for no extra index.
    """
    head = tx.audit_head()
    top = (head[0] + 1) if head is not None else 1
    if where.before_id is not None:
        top = min(top, where.before_id)
    found: list[AuditRecord] = []
    started = time.monotonic()
    while top > 1 and len(found) <= size:
        low = max(1, top - window)
        chunk = replace(where, before_id=top, after_id=max(low - 1, where.after_id or 0))
        found += tx.find_audit(chunk, limit=size + 1 - len(found), newest_first=True)
        top = low
        if where.after_id is not None and top <= where.after_id + 1:
            top = 1
        if len(found) <= size and time.monotonic() - started > budget:
            return AuditPage(found, top if top > 1 else None, top)
    if len(found) > size:
        return AuditPage(found[:size], found[size - 1].id, None)
    return AuditPage(found, None, None)


class RecentEvents:
    """The newest `limit` events matching one filter, kept current like AgentTally: after the first look,
    only the events appended since are searched (the Approvals page's refused and timed-out approvals)."""

    def __init__(self, where: AuditFilter, limit: int) -> None:
        self.where = where
        self.limit = limit
        self._lock = threading.Lock()
        self._after = 0
        self._events: list[AuditRecord] = []

    def newest(self, tx: Tx) -> list[AuditRecord]:
        with self._lock:
            head = tx.audit_head()
            top = head[0] if head is not None else 0
            if top > self._after:
                fresh = tx.find_audit(replace(self.where, after_id=self._after), limit=self.limit, newest_first=True)
                self._events = (fresh + self._events)[: self.limit]
                self._after = top
            return list(self._events)


def summary(args: dict[str, Any]) -> str:
    """An event's purpose or arguments in one line (`audit list`'s last column)."""
    if "purpose" in args:
        scopes = " ".join(args.get("scopes", [])) if isinstance(args.get("scopes"), list) else ""
        return f"{args.get('connection', '')} [{scopes}] {args['purpose']}"
    return " ".join(f"{k}={v}" for k, v in sorted(args.items()))[:120]
