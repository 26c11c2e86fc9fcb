"""The connect flow under test: a demo runtime with a listing on the demo's unconnected connection, and a
scripted browser (httpx following redirects) that walks the flow against the emulator."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette

from server import market
from server.app import Runtime
from server.emulator import create_app
from server.emulator.demo import DEMO_ACCOUNT, DEMO_CONNECT_CONNECTION, DEMO_CONNECT_SCOPES
from server.market import parse_listings
from server.web.connect import connect_routes

CONNECTION = DEMO_CONNECT_CONNECTION  # the demo user starts without it (Token Vault answers 401)
SCOPES = [DEMO_CONNECT_SCOPES[0]]
LISTING = {
    "id": "slack-read", "title": "Slack: read channels", "connection": CONNECTION, "scopes": SCOPES,
    "supply": 100, "start_price": 10, "floor_price": 5, "opens_at": "2026-01-01T00:00:00Z",
    "closes_at": "2030-01-01T00:00:00Z",
}
PUBLIC_URL = "http://127.0.0.1:8787"  # where the scripted browser reaches the pages (ASGI, no socket)
ASK = {"connection": CONNECTION, "scopes": SCOPES, "purpose": "read channels"}
_TICKET = re.compile(r'name="ticket" value="([^"]+)"')


async def add_listing(runtime: Runtime, units: int = 3, **changes: Any) -> None:
    """The unconnected connection's listing (with `changes`), and `units` of it in the demo wallet."""
    from datetime import datetime

    spec = dict(LISTING, opens_at=datetime.fromisoformat(LISTING["opens_at"]),  # type: ignore[arg-type]
                closes_at=datetime.fromisoformat(LISTING["closes_at"]), **changes)  # type: ignore[arg-type]
    specs = parse_listings({"listing": [spec]}, "test market")
    await runtime.db.write(lambda tx: market.load(tx, specs))
    from server.broker import Call
    from server.principal import Principal

    owner = Principal(DEMO_ACCOUNT, "setup", frozenset({"buy:quota"}))
    await runtime.broker.buy_quota(Call("buy_quota", "buy:quota", "test"), owner, listing_id=str(spec["id"]),
                                   units=units, max_unit_price=10, idempotency_key=None)


def serve_pages(runtime: Runtime, public_url: str = PUBLIC_URL) -> Starlette:
    """The connect pages of `runtime` at `public_url` (its links name it)."""

    async def url() -> str:
        return public_url

    return Starlette(routes=connect_routes(runtime.connect_site(url)))


class Browser:
    """A scripted browser: follows redirects, keeps cookies, answers the emulator's consent page."""

    def __init__(self, mounts: dict[str, httpx.AsyncBaseTransport]) -> None:
        self.http = httpx.AsyncClient(mounts=mounts, follow_redirects=True, timeout=10)
        self.visited: list[str] = []
        self.http.event_hooks["request"] = [self._seen]

    async def _seen(self, request: httpx.Request) -> None:
        self.visited.append(str(request.url))

    async def connect(self, url: str, approve: bool = True) -> httpx.Response:
        """Open a connect link and go through the whole flow; the last page."""
        response = await self.http.get(url)
        found = _TICKET.search(response.text)
        if found is None:  # the flow stopped before the provider's consent (a refusal page)
            return response
        target = str(response.url.copy_with(query=None))
        decision = "approve" if approve else "deny"
        return await self.http.post(target, data={"ticket": found.group(1), "decision": decision})

    async def aclose(self) -> None:
        await self.http.aclose()


@asynccontextmanager
async def browser_for(runtime: Runtime, pages: Any, public_url: str = PUBLIC_URL) -> AsyncIterator[Browser]:
    """A browser that reaches `pages` at `public_url` and the runtime's emulated tenant at its issuer."""
    assert runtime.tenant is not None
    tenant = runtime.tenant.state.issuer.rstrip("/")
    mounts: dict[str, httpx.AsyncBaseTransport] = {tenant: httpx.ASGITransport(app=create_app(runtime.tenant.state))}
    if pages is not None:
        mounts[public_url] = httpx.ASGITransport(app=pages)
    browser = Browser(mounts)
    try:
        yield browser
    finally:
        await browser.aclose()


def link_in(text: str) -> str:
    """The connect URL an answer names."""
    found = re.search(r"(https?://\S+/connect/[A-Za-z0-9_-]{22})", text)
    assert found is not None, text
    return found.group(1)
