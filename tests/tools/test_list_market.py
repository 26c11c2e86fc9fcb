"""list_market through the SDK client: today's price, paging, filters and refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from mcp import Client

from server import market
from server.app import Runtime
from server.clock import ManualClock, parse_rfc3339
from server.demo import DEMO_LISTINGS
from server.pricing import price_at
from tests.conftest import DEMO_NOW, ok, refused

pytestmark = pytest.mark.both_backends


async def test_listings_carry_the_price_of_this_moment(client: Client, clock: ManualClock) -> None:
    page = await ok(client, "list_market", {})
    assert page["as_of"].startswith("2027-06-01T12:00:00")
    for item in page["listings"]:
        expected = price_at(
            item["start_price"], item["floor_price"], parse_rfc3339(item["opens_at"]),
            parse_rfc3339(item["closes_at"]), DEMO_NOW,
        )
        assert item["unit_price"] == expected
        assert item["floor_price"] < item["unit_price"] < item["start_price"]
    clock.advance(timedelta(days=200))
    later = await ok(client, "list_market", {})
    assert all(b["unit_price"] <= a["unit_price"] for a, b in zip(page["listings"], later["listings"], strict=True))
    assert any(b["unit_price"] < a["unit_price"] for a, b in zip(page["listings"], later["listings"], strict=True))


async def test_pages_follow_the_cursor_to_the_end(client: Client) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        page = await ok(client, "list_market", {"limit": 1, **({"cursor": cursor} if cursor else {})})
        assert len(page["listings"]) == 1
        seen.append(page["listings"][0]["listing_id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    everything = await ok(client, "list_market", {"limit": 100})
    assert seen == [item["listing_id"] for item in everything["listings"]]
    assert everything["next_cursor"] is None
    assert len(seen) == len(DEMO_LISTINGS)


async def test_connection_filter_and_closed_listings(client: Client, clock: ManualClock) -> None:
    github = await ok(client, "list_market", {"connection": "github"})
    assert {item["connection"] for item in github["listings"]} == {"github"}
    clock.set(clock.now().replace(year=2031))
    assert (await ok(client, "list_market", {}))["listings"] == []
    closed = await ok(client, "list_market", {"include_closed": True})
    assert len(closed["listings"]) == len(DEMO_LISTINGS)
    assert all(item["unit_price"] == item["floor_price"] for item in closed["listings"])


async def test_bad_paging_arguments_are_refused(client: Client) -> None:
    for args in ({"limit": 0}, {"limit": 101}, {"cursor": "not-a-cursor"}, {"connection": "bad name!"},
                 {"include_closed": "maybe"}, {"surprise": 1}):
        assert (await refused(client, "list_market", args)).startswith("[invalid_argument] "), args


async def test_each_listing_shows_how_it_delivers_where_call_api_may_go_and_who_approves(
    client: Client, runtime: Runtime
) -> None:
    specs = market.parse_listings({"listing": [{
        "id": "github-proxy", "title": "GitHub through the broker", "connection": "github", "scopes": ["repo:read"],
        "supply": 5, "start_price": 10, "floor_price": 10, "opens_at": datetime(2026, 1, 1, tzinfo=UTC),
        "closes_at": datetime(2030, 1, 1, tzinfo=UTC), "delivery": "proxy",
        "api": ["HTTPS://API.GITHUB.COM:443/", "http://127.0.0.1:9000/provider/github"],
        "methods": ["PATCH", "GET"], "approval": "writes",
    }]})
    await runtime.db.write(lambda tx: market.load(tx, specs))
    page = await ok(client, "list_market", {"connection": "github"})
    shown = {item["listing_id"]: item for item in page["listings"]}
    assert {k: shown["github-proxy"][k] for k in ("delivery", "api", "methods", "approval")} == {
        "delivery": "proxy", "api": ["http://127.0.0.1:9000/provider/github", "https://api.github.com"],
        "methods": ["GET", "PATCH"], "approval": "writes",
    }
    assert {k: shown["github-repo-read"][k] for k in ("delivery", "api", "methods", "approval")} == {
        "delivery": "token", "api": [], "methods": ["GET", "HEAD"], "approval": "none",
    }


async def test_the_output_schema_describes_the_delivery_keys(client: Client) -> None:
    (tool,) = [t for t in (await client.list_tools()).tools if t.name == "list_market"]
    assert tool.output_schema is not None
    view = tool.output_schema["$defs"]["ListingView"]
    for name in ("delivery", "api", "methods", "approval"):
        assert name in view["required"], name
        assert view["properties"][name].get("description"), name
    assert view["properties"]["delivery"]["enum"] == ["token", "proxy"]
    assert view["properties"]["approval"]["enum"] == ["none", "grant", "writes"]
