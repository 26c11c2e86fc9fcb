"""Connect links in the domain (server/connect.py) on SQLite and PostgreSQL: made, used once, ended once,
each step an event; expired ones refused, then forgotten."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from server import audit
from server.broker import Broker, Call
from server.clock import ManualClock
from server.connect import ConnectFlows, LinkRefused, Refusal
from server.principal import Principal
from server.store import Database

pytestmark = pytest.mark.both_backends

ALICE = Principal("auth0|alice", "agent-1", frozenset())


async def public() -> str:
    return "https://broker.example"


def flows_on(db: Database, clock: ManualClock) -> ConnectFlows:
    return ConnectFlows(Broker(db, clock=clock), public)


async def events(db: Database) -> list[dict[str, object]]:
    return await db.read(lambda tx: [audit.export_line(r) for r in tx.iter_audit() if r.tool == "connect"])


async def test_a_link_is_bound_used_once_and_ended_once(db: Database, clock: ManualClock) -> None:
    flows = flows_on(db, clock)
    needed = await flows.start(Call("request_token", "request:token", "stdio"), ALICE, "github", ["repo", "gist"])
    link = needed.link
    assert needed.url == f"https://broker.example/connect/{link.id}" and len(link.id) == 22
    assert (link.account, link.agent, link.connection, link.scopes) == ("auth0|alice", "agent-1", "github",
                                                                      ("gist", "repo"))
    opened = await asyncio.gather(flows.open(link.id, "connect"), flows.open(link.id, "connect"),
                                  return_exceptions=True)
    assert sorted(type(o).__name__ for o in opened) == ["ConnectLink", "LinkRefused"]  # one wins, once
    assert await flows.complete(link, "cac_1", "connect") is True
    assert await flows.complete(link, "cac_1", "connect") is False  # ended: nothing more written
    stored = await flows.get(link.id)
    assert stored is not None and stored.status == "connected" and stored.finished_at == clock.now()
    steps = [(e["outcome"], e["args"]["step"]) for e in await events(db)]  # type: ignore[index]
    assert steps == [("ok", "start"), ("denied", "open"), ("ok", "complete")]


async def test_an_expired_link_is_refused_and_a_refused_flow_stays_ended(db: Database, clock: ManualClock) -> None:
    flows = flows_on(db, clock)
    call = Call("call_api", "call:api", "http")
    first = (await flows.start(call, ALICE, "github", ["repo"])).link
    second = (await flows.start(call, ALICE, "github", ["repo"])).link
    clock.advance(timedelta(minutes=10))
    with pytest.raises(LinkRefused, match="expired"):
        await flows.open(first.id, "connect")
    with pytest.raises(LinkRefused, match="not one this broker made"):
        await flows.open("x" * 22, "connect")
    clock.set(second.created_at)
    await flows.open(second.id, "connect")
    await flows.refuse(second, Refusal("unauthenticated", "signed in as another user"), "sign-in", "connect",
                       signed_in_as="auth0|mallory")
    assert await flows.complete(second, "cac_2", "connect") is False
    last = (await events(db))[-1]
    assert last["code"] == "unauthenticated" and last["args"]["signed_in_as"] == "auth0|mallory"  # type: ignore[index]
    clock.advance(timedelta(days=1, minutes=11))
    assert await flows.forget_expired() == 2 and await flows.get(first.id) is None


async def test_a_watcher_hears_of_a_flow_finished_by_another_process(db: Database, clock: ManualClock) -> None:
    here, there = flows_on(db, clock), flows_on(db, clock)
    link = (await here.start(Call("request_token", "request:token", "http"), ALICE, "github", ["repo"])).link
    heard: asyncio.Queue[str] = asyncio.Queue()

    async def tell(ended: object) -> None:
        await heard.put(getattr(ended, "status", "?"))

    here.watch(link, tell)
    await there.open(link.id, "connect")
    await there.complete(link, "cac_3", "connect")
    assert await asyncio.wait_for(heard.get(), timeout=5) == "connected"
    await here.aclose()
