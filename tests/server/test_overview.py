"""What the CLI and the console both show: the Audit page's keyset pages, windowed and bounded."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server import audit, overview
from server.audit import Event
from server.store import AuditFilter, Database, Tx

pytestmark = pytest.mark.both_backends


async def seed(db: Database, count: int) -> None:
    def job(tx: Tx) -> None:
        for n in range(1, count + 1):
            audit.append(tx, Event(ts=f"2026-11-01T00:{n // 60:02d}:{n % 60:02d}Z", transport="cli", outcome="ok",
                                   account=f"auth0|user-{n % 3}", agent="agent-a" if n % 10 else "agent-rare",
                                   tool="check_balance"))

    await db.write(job)


async def pages(db: Database, where: AuditFilter, **kw: object) -> list[overview.AuditPage]:
    """Follow `older` from the newest page to the end."""
    found: list[overview.AuditPage] = []
    before = None
    while True:
        asked = replace(where, before_id=before)
        page = await db.read(lambda tx, asked=asked: overview.audit_page(tx, asked, 4, **kw))  # type: ignore[misc]
        found.append(page)
        if page.older is None:
            return found
        before = page.older


async def test_keyset_pages_hold_every_match_once_newest_first(db: Database) -> None:
    await seed(db, 50)
    where = AuditFilter(agent="agent-rare")
    expected = [r.id for r in await db.read(lambda tx: tx.find_audit(where, newest_first=True))]
    walked = await pages(db, where)
    assert [e.id for p in walked for e in p.events] == expected == [50, 40, 30, 20, 10]
    assert [len(p.events) for p in walked] == [4, 1] and all(p.searched_from is None for p in walked)


async def test_a_page_out_of_budget_says_how_far_it_looked_and_continues_from_there(db: Database) -> None:
    await seed(db, 50)
    where = AuditFilter(agent="agent-rare", account="auth0|user-1")  # 10 and 40: n % 10 == 0 and n % 3 == 1
    walked = await pages(db, where, window=7, budget=0.0)  # every window of 7 ids is a page of its own
    assert [e.id for p in walked for e in p.events] == [40, 10]
    assert [p.searched_from for p in walked[:-1]] == [44, 37, 30, 23, 16, 9, 2][: len(walked) - 1]
    assert walked[-1].older is None


async def test_an_empty_log_has_one_empty_page(db: Database) -> None:
    page = await db.read(lambda tx: overview.audit_page(tx, AuditFilter(), 50))
    assert page.events == [] and page.older is None


async def test_the_agent_tally_answers_what_agents_seen_answers_as_the_log_grows(db: Database) -> None:
    tally = overview.AgentTally()
    assert await db.read(tally.seen) == await db.read(lambda tx: tx.agents_seen()) == []
    await seed(db, 25)
    assert await db.read(tally.seen) == await db.read(lambda tx: tx.agents_seen())
    await seed(db, 13)  # more events, some of a new pair (agent, account)
    await db.write(lambda tx: audit.append(tx, Event(ts="2026-11-02T00:00:00Z", transport="cli", outcome="ok",
                                                      account=None, agent="agent-new", tool="x")))
    seen = await db.read(tally.seen)
    assert seen == await db.read(lambda tx: tx.agents_seen())
    assert [row[0] for row in seen] == ["agent-a", "agent-new", "agent-rare"] and seen[0][1] == 23 + 12


async def test_recent_events_stay_the_newest_matches_as_the_log_grows(db: Database) -> None:
    watch = overview.RecentEvents(AuditFilter(agent="agent-rare"), 3)
    await seed(db, 25)
    assert [e.id for e in await db.read(watch.newest)] == [20, 10]
    await seed(db, 25)  # ids 26..50, n again 1..25: ids 35 and 45 are the rare agent's
    expected = await db.read(lambda tx: tx.find_audit(AuditFilter(agent="agent-rare"), limit=3, newest_first=True))
    assert [e.id for e in await db.read(watch.newest)] == [e.id for e in expected] == [45, 35, 20]
