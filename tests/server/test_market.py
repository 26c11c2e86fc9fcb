"""Market files are checked listing by listing, upserted keeping what was sold, and paged by cursor."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from server import ledger, market
from server.errors import InvalidArgument
from server.market import MarketFileError, parse_listings, read_market_file
from server.models import Listing
from server.store import Database, Tx

pytestmark = pytest.mark.both_backends

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


def spec(**changes: Any) -> dict[str, Any]:
    """One valid `[[listing]]` table, with `changes` applied (None removes a key)."""
    table: dict[str, Any] = {
        "id": "github-repo-read",
        "title": "GitHub: read repositories",
        "connection": "github",
        "scopes": ["repo:read"],
        "supply": 1000,
        "start_price": 100,
        "floor_price": 20,
        "opens_at": datetime(2026, 11, 1, tzinfo=UTC),
        "closes_at": datetime(2027, 1, 1, tzinfo=UTC),
    }
    table.update(changes)
    return {k: v for k, v in table.items() if v is not None}


def toml(*tables: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, datetime):
            return v.isoformat()  # TOML offset or local date-time, as the value is aware or naive
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str | bool):
            return json.dumps(v)
        return str(v)

    return "\n".join("[[listing]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in t.items()) for t in tables)


def write(tmp_path: Path, *tables: dict[str, Any]) -> Path:
    path = tmp_path / "market.toml"
    path.write_text(toml(*tables), encoding="utf-8")
    return path


async def load(db: Database, *tables: dict[str, Any]) -> int:
    specs = parse_listings({"listing": list(tables)})
    return await db.write(lambda tx: market.load(tx, specs))


async def listing(db: Database, listing_id: str) -> Listing:
    found = await db.read(lambda tx: tx.get_listing(listing_id))
    assert found is not None
    return found


async def everything(db: Database) -> list[Listing]:
    """Every listing as stored, every field."""
    return await db.read(lambda tx: tx.page_listings(after=None, connection=None, open_at=None, limit=1000))


# ---- parsing ---------------------------------------------------------------------------------------

def test_a_valid_market_file_gives_one_spec_per_listing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        spec(),
        spec(id="stripe-charges", title="Stripe: charges", connection="stripe", scopes=["write", "read", "read"],
             start_price=50, floor_price=50, opens_at=datetime(2026, 11, 1, 2, tzinfo=timezone(timedelta(hours=2)))),
    )
    first, second = read_market_file(path)
    assert (first.id, first.connection, first.scopes) == ("github-repo-read", "github", ["repo:read"])
    assert first.supply == 1000
    assert (first.start_price, first.floor_price) == (100, 20)
    stripe = second.to_listing()
    assert stripe.scopes == ("read", "write")  # a set of scopes, in a stable order
    assert stripe.opens_at == datetime(2026, 11, 1, tzinfo=UTC)
    assert stripe.opens_at.utcoffset() == timedelta(0)
    assert (stripe.sold, stripe.supply_remaining) == (0, 1000)


def test_a_file_without_listings_is_an_empty_market(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    assert read_market_file(path) == []


@pytest.mark.parametrize(
    ("table", "named"),
    [
        (spec(id="GitHub_Read"), ["GitHub_Read", "id"]),
        (spec(id="github read"), ["github read", "id"]),
        (spec(floor_price=101), ["github-repo-read", "floor_price"]),
        (spec(closes_at=datetime(2026, 11, 1, tzinfo=UTC)), ["github-repo-read", "closes_at"]),
        (spec(closes_at=datetime(2026, 10, 1, tzinfo=UTC)), ["github-repo-read", "closes_at"]),
        (spec(opens_at=datetime(2026, 11, 1)), ["github-repo-read", "opens_at"]),
        (spec(closes_at=datetime(2027, 1, 1)), ["github-repo-read", "closes_at"]),
        (spec(colour="blue"), ["github-repo-read", "colour"]),
        (spec(supply=None), ["github-repo-read", "supply"]),
        (spec(supply=-1), ["github-repo-read", "supply"]),
        (spec(start_price="100"), ["github-repo-read", "start_price"]),
        (spec(supply=True), ["github-repo-read", "supply"]),
        (spec(supply=2.5), ["github-repo-read", "supply"]),
        (spec(start_price=10**19, floor_price=0), ["github-repo-read", "start_price"]),
        (spec(scopes=[]), ["github-repo-read", "scopes"]),
        (spec(scopes=["repo read"]), ["github-repo-read", "scopes"]),
        (spec(connection="git hub"), ["github-repo-read", "connection"]),
        (spec(title=5), ["github-repo-read", "title"]),
        (spec(scopes="repo"), ["github-repo-read", "scopes"]),
        (spec(opens_at="2026-11-01"), ["github-repo-read", "opens_at"]),
        (spec(closes_at="2027-01-01T00:00:00Z"), ["github-repo-read", "closes_at"]),
        (spec(connection=["github"]), ["github-repo-read", "connection"]),
        (spec(delivery="proxy"), ["github-repo-read", "api"]),
        (spec(delivery="Proxy", api=["https://api.github.com"]), ["github-repo-read", "delivery"]),
        (spec(delivery=True), ["github-repo-read", "delivery"]),
        (spec(api="https://api.github.com"), ["github-repo-read", "api"]),
        (spec(api=[]), ["github-repo-read", "api"]),
        (spec(api=["ftp://api.github.com"]), ["github-repo-read", "api"]),
        (spec(api=["api.github.com"]), ["github-repo-read", "api"]),
        (spec(api=["https://user:pw@api.github.com"]), ["github-repo-read", "api"]),
        (spec(api=["https://api.github.com/?page=1"]), ["github-repo-read", "api"]),
        (spec(api=["https://api.github.com/#top"]), ["github-repo-read", "api"]),
        (spec(api=["https://api.github.com/a/../b"]), ["github-repo-read", "api"]),
        (spec(api=["https://api.github.com\\repos"]), ["github-repo-read", "api"]),
        (spec(methods=["get"]), ["github-repo-read", "methods"]),
        (spec(methods=["GET", "CONNECT"]), ["github-repo-read", "methods"]),
        (spec(methods=["GET", "GET"]), ["github-repo-read", "methods"]),
        (spec(methods=[]), ["github-repo-read", "methods"]),
        (spec(methods="GET"), ["github-repo-read", "methods"]),
        (spec(approval="always"), ["github-repo-read", "approval"]),
        (spec(aproval="grant"), ["github-repo-read", "aproval"]),
    ],
    ids=["uppercase-id", "space-in-id", "floor-above-start", "closes-at-opening", "closes-before-opening",
         "naive-opens", "naive-closes", "extra-key", "missing-supply", "negative-supply", "price-as-text",
         "supply-as-bool", "fractional-supply", "price-beyond-64-bit",
         "no-scopes", "scope-with-space", "bad-connection", "title-as-number", "scopes-as-text", "date-as-text",
         "datetime-as-text", "connection-as-array", "proxy-without-api", "delivery-capitalised",
         "delivery-as-bool", "api-as-text", "api-empty", "api-not-http", "api-not-absolute", "api-userinfo",
         "api-query", "api-fragment", "api-dot-dot", "api-backslash", "method-lowercase", "method-unknown",
         "method-twice", "methods-empty", "methods-as-text", "approval-unknown", "misspelt-optional-key"],
)
def test_each_invalid_listing_is_refused_naming_the_listing_and_field(
    tmp_path: Path, table: dict[str, Any], named: list[str]
) -> None:
    path = write(tmp_path, spec(id="fine-listing"), table)
    with pytest.raises(MarketFileError) as caught:
        read_market_file(path)
    assert str(path) in str(caught.value)
    message = str(caught.value).replace(str(path), "")  # the temporary path could contain anything
    listing_id, field = named
    assert f"listing {listing_id}: {field}" in message, message  # the listing, then the key it is about
    assert "\n" not in message, message
    assert "fine-listing" not in message


def test_a_listing_id_that_appears_twice_is_refused() -> None:
    with pytest.raises(MarketFileError, match="listing github-repo-read appears twice"):
        parse_listings({"listing": [spec(), spec(title="another")]})


def test_a_value_of_the_wrong_toml_type_is_refused_saying_what_was_found(tmp_path: Path) -> None:
    cases = {
        "title": (5, "title: Input should be a valid string, not an integer"),
        "scopes": ("repo", "scopes: Input should be a valid list, not a string"),
        "supply": (True, "supply: Input should be a valid integer, not a boolean"),
        "opens_at": ("2026-11-01", "opens_at: Input should be a valid datetime, not a string (write a TOML "
                     "date-time with a zone and without quotes, e.g. 2026-11-01T00:00:00Z)"),
    }
    for key, (value, problem) in cases.items():
        path = write(tmp_path, spec(**{key: value}))
        with pytest.raises(MarketFileError) as caught:
            read_market_file(path)
        assert str(caught.value) == f"{path}: listing github-repo-read: {problem}"


def test_the_messages_of_the_new_refusals_say_what_to_write() -> None:
    expected = {
        "proxy-without-api": (
            spec(delivery="proxy"),
            'api: required when delivery = "proxy" (the base URLs call_api may reach, '
            'e.g. api = ["https://api.github.com"])',
        ),
        "unknown-key": (
            spec(aproval="grant"),
            "aproval: unknown key; a listing has id, title, connection, scopes, supply, start_price, "
            "floor_price, opens_at, closes_at, delivery, api, methods, approval",
        ),
        "userinfo": (
            spec(api=["https://api.github.com", "https://bot@api.github.com"]),
            'api[1]: "https://bot@api.github.com" carries userinfo; name the host only (the broker sets '
            "Authorization itself)",
        ),
        "method-twice": (spec(methods=["GET", "POST", "GET"]), "methods: GET appears more than once"),
    }
    for name, (table, problem) in expected.items():
        with pytest.raises(MarketFileError) as caught:
            parse_listings({"listing": [table]}, "m.toml")
        assert str(caught.value) == f"m.toml: listing github-repo-read: {problem}", name


def test_an_invalid_id_is_shown_escaped_on_one_line() -> None:
    with pytest.raises(MarketFileError) as caught:
        parse_listings({"listing": [spec(id="evil\n\x1b[2J")]})
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    assert "listing evil\\x0a\\x1b[2J: id:" in str(caught.value)


def test_the_optional_keys_default_to_a_token_listing_without_api_or_approval() -> None:
    (plain,) = parse_listings({"listing": [spec()]})
    listing = plain.to_listing()
    assert (listing.delivery, listing.api, listing.methods, listing.approval) == ("token", (), ("GET", "HEAD"), "none")


def test_api_bases_are_normalised_and_methods_kept_in_one_order() -> None:
    (proxy,) = parse_listings({"listing": [spec(
        delivery="proxy",
        api=["HTTPS://API.GitHub.com:443/", "http://127.0.0.1:8080/provider/github/", "https://api.github.com",
             "http://[::1]:80/v1", "https://uploads.github.com:8443/v3"],
        methods=["DELETE", "GET", "POST"],
        approval="writes",
    )]})
    listing = proxy.to_listing()
    assert listing.delivery == "proxy"
    assert listing.api == (
        "http://127.0.0.1:8080/provider/github", "http://[::1]/v1", "https://api.github.com",
        "https://uploads.github.com:8443/v3",
    )
    assert listing.methods == ("GET", "POST", "DELETE")
    assert listing.approval == "writes"


def test_a_token_listing_may_also_name_api_bases_for_call_api() -> None:
    (both,) = parse_listings({"listing": [spec(api=["https://api.github.com"], approval="grant")]})
    assert (both.delivery, both.api, both.approval) == ("token", ["https://api.github.com"], "grant")


def test_the_optional_keys_are_read_from_a_real_toml_file(tmp_path: Path) -> None:
    path = write(tmp_path, spec(delivery="proxy", api=["https://api.github.com"], methods=["GET", "PATCH"]))
    (read,) = read_market_file(path)
    assert (read.delivery, read.api, read.methods, read.approval) == (
        "proxy", ["https://api.github.com"], ["GET", "PATCH"], "none"
    )


def test_unreadable_or_malformed_files_are_market_file_errors(tmp_path: Path) -> None:
    with pytest.raises(MarketFileError, match="cannot read market file"):
        read_market_file(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[listing]]\nid = \n", encoding="utf-8")
    with pytest.raises(MarketFileError, match="not valid TOML"):
        read_market_file(broken)
    not_tables = tmp_path / "scalar.toml"
    not_tables.write_text("listing = 5\n", encoding="utf-8")
    with pytest.raises(MarketFileError, match=r"expected \[\[listing\]\] tables"):
        read_market_file(not_tables)


def test_a_misspelt_table_is_refused_not_read_as_an_empty_market(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text('[[listings]]\nid = "a"\n', encoding="utf-8")
    with pytest.raises(MarketFileError, match=r"unknown table or key 'listings'; listings are \[\[listing\]\] tables"):
        read_market_file(typo)
    assert read_market_file(_write(tmp_path / "empty.toml", "")) == []  # an empty market stays allowed


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- loading ---------------------------------------------------------------------------------------

async def sell(db: Database, listing_id: str, units: int) -> None:
    def job(tx: Tx) -> None:
        ledger.credit(tx, "buyer", 1_000_000, NOW)
        ledger.buy(tx, "buyer", listing_id, units, 1_000, None, NOW)

    await db.write(job)


async def test_reloading_a_listing_updates_it_and_keeps_what_was_sold(db: Database) -> None:
    assert await load(db, spec(supply=10)) == 1
    await sell(db, "github-repo-read", 3)
    assert await load(db, spec(title="GitHub: read repos", supply=8, start_price=90, floor_price=10)) == 1
    after = await listing(db, "github-repo-read")
    assert (after.title, after.supply, after.sold, after.supply_remaining) == ("GitHub: read repos", 8, 3, 5)
    assert (after.start_price, after.floor_price) == (90, 10)
    holdings = await db.read(lambda tx: tx.holdings_of("buyer"))
    assert [(h.listing_id, h.units_held) for h in holdings] == [("github-repo-read", 3)]


async def test_supply_may_shrink_to_exactly_what_was_sold(db: Database) -> None:
    await load(db, spec(supply=10))
    await sell(db, "github-repo-read", 3)
    await load(db, spec(supply=3))
    assert (await listing(db, "github-repo-read")).supply_remaining == 0


async def test_supply_below_what_was_sold_is_refused_and_the_whole_file_changes_nothing(db: Database) -> None:
    await load(db, spec(supply=10))
    await sell(db, "github-repo-read", 3)
    before = await everything(db)
    with pytest.raises(MarketFileError) as caught:
        await load(db, spec(id="new-listing"), spec(supply=2, title="changed"))
    assert "github-repo-read" in str(caught.value)
    assert "supply 2" in str(caught.value)
    assert "3 units already sold" in str(caught.value)
    kept = await listing(db, "github-repo-read")
    assert (kept.supply, kept.sold, kept.title) == (10, 3, "GitHub: read repositories")
    assert await db.read(lambda tx: tx.get_listing("new-listing")) is None
    assert await everything(db) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"connection": "gitlab"}, 'listing github-repo-read: connection: cannot change from "github" to "gitlab": '
                                   "3 units were already sold under it; add a listing with a new id instead"),
        ({"scopes": ["repo:read", "repo:write"]},
         'listing github-repo-read: scopes: cannot change from ["repo:read"] to ["repo:read", "repo:write"]: '
         "3 units were already sold under it; add a listing with a new id instead"),
        ({"scopes": ["repo:write"]},
         'listing github-repo-read: scopes: cannot change from ["repo:read"] to ["repo:write"]: '
         "3 units were already sold under it; add a listing with a new id instead"),
    ],
    ids=["connection", "scopes-widened", "scopes-replaced"],
)
async def test_a_sold_listing_keeps_its_connection_and_scopes_and_the_whole_file_changes_nothing(
    db: Database, change: dict[str, Any], message: str
) -> None:
    await load(db, spec(supply=10), spec(id="other", title="other"))
    await sell(db, "github-repo-read", 3)
    before = await everything(db)
    with pytest.raises(MarketFileError) as caught:
        await load(db, spec(id="other", title="renamed"), spec(id="brand-new"), spec(supply=10, **change))
    assert str(caught.value) == message
    assert await everything(db) == before  # neither the listing before it in the file nor the new one
    holdings = await db.read(lambda tx: tx.holdings_of("buyer"))
    assert [(h.connection, h.scopes, h.units_held) for h in holdings] == [("github", ("repo:read",), 3)]


async def test_the_same_scopes_in_another_order_or_repeated_are_no_change(db: Database) -> None:
    await load(db, spec(scopes=["repo:read", "issues:read"]))
    await sell(db, "github-repo-read", 1)
    assert await load(db, spec(scopes=["issues:read", "repo:read", "issues:read"], title="reordered")) == 1
    after = await listing(db, "github-repo-read")
    assert (after.title, after.scopes) == ("reordered", ("issues:read", "repo:read"))


async def test_connection_and_scopes_of_a_listing_with_nothing_sold_may_change(db: Database) -> None:
    await load(db, spec())
    await load(db, spec(connection="gitlab", scopes=["read_repository"]))
    after = await listing(db, "github-repo-read")
    assert (after.connection, after.scopes, after.sold) == ("gitlab", ("read_repository",), 0)


async def test_the_optional_keys_round_trip_through_the_store_and_reloading_updates_them(db: Database) -> None:
    proxy = spec(delivery="proxy", api=["https://api.github.com/", "http://localhost:8080"], methods=["POST", "GET"],
                 approval="grant")
    await load(db, proxy, spec(id="plain"))
    stored = await listing(db, "github-repo-read")
    assert (stored.delivery, stored.api, stored.methods, stored.approval) == (
        "proxy", ("http://localhost:8080", "https://api.github.com"), ("GET", "POST"), "grant"
    )
    plain = await listing(db, "plain")
    assert (plain.delivery, plain.api, plain.methods, plain.approval) == ("token", (), ("GET", "HEAD"), "none")
    assert [item.listing for item in (await page(db, include_closed=True)).listings] == [stored, plain]

    await load(db, spec(approval="writes", methods=["GET", "HEAD", "DELETE"], api=["https://api.github.com"]))
    reloaded = await listing(db, "github-repo-read")
    assert (reloaded.delivery, reloaded.api, reloaded.methods, reloaded.approval) == (
        "token", ("https://api.github.com",), ("GET", "HEAD", "DELETE"), "writes"
    )


# ---- paging ----------------------------------------------------------------------------------------

MARKET = [
    spec(id="gh-1", connection="github"),
    spec(id="gh-2", connection="github", start_price=80, floor_price=80),
    spec(id="gh-3", connection="github"),
    spec(id="gh-old", connection="github", opens_at=datetime(2025, 1, 1, tzinfo=UTC),
         closes_at=datetime(2026, 1, 1, tzinfo=UTC)),
    spec(id="gs-1", connection="google"),
    spec(id="st-edge", connection="stripe", closes_at=NOW),
    spec(id="st-gone", connection="stripe", closes_at=NOW - US),
    spec(id="st-soon", connection="stripe", opens_at=NOW + timedelta(days=1)),
]


@pytest.fixture
async def stocked(db: Database) -> Database:
    await load(db, *MARKET)
    return db


async def page(db: Database, **options: Any) -> market.Page:
    args: dict[str, Any] = {"now": NOW, "connection": None, "include_closed": False, "limit": 25, "cursor": None}
    args.update(options)
    return await db.read(lambda tx: market.page(tx, **args))


def ids(p: market.Page) -> list[str]:
    return [item.listing.id for item in p.listings]


async def walk(db: Database, **options: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        p = await page(db, cursor=cursor, **options)
        pages.append(ids(p))
        cursor = p.next_cursor
        if cursor is None:
            return pages
        assert len(pages) < 20, "the cursor does not advance"


async def test_pages_follow_the_cursor_through_every_listing_in_id_order_once(stocked: Database) -> None:
    pages = await walk(stocked, limit=3, include_closed=True)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [i for p in pages for i in p] == sorted(item["id"] for item in MARKET)


async def test_the_last_full_page_has_no_next_cursor(stocked: Database) -> None:
    assert await walk(stocked, limit=3, connection="github") == [["gh-1", "gh-2", "gh-3"]]
    assert await walk(stocked, limit=2, connection="github") == [["gh-1", "gh-2"], ["gh-3"]]


async def test_the_connection_filter_holds_across_pages(stocked: Database) -> None:
    first = await page(stocked, limit=1, connection="stripe")
    assert ids(first) == ["st-edge"]
    second = await page(stocked, limit=5, connection="stripe", cursor=first.next_cursor)
    assert ids(second) == ["st-soon"]
    assert second.next_cursor is None
    assert ids(await page(stocked, connection="nowhere")) == []


async def test_closed_listings_are_hidden_unless_asked_for_and_a_listing_closing_now_is_still_shown(
    stocked: Database,
) -> None:
    shown = ids(await page(stocked))
    assert "st-edge" in shown and "st-soon" in shown
    assert "gh-old" not in shown and "st-gone" not in shown
    assert set(ids(await page(stocked, include_closed=True))) == {item["id"] for item in MARKET}


async def test_each_listing_is_priced_at_the_moment_of_the_page(stocked: Database) -> None:
    p = await page(stocked, include_closed=True)
    assert p.as_of == NOW
    priced = {item.listing.id: item for item in p.listings}
    # 2026-11-01 .. 2027-01-01 is 61 days; NOW is 30.5 days in: exactly halfway from 100 to 20
    assert (priced["gh-1"].unit_price, priced["gh-1"].open) == (60, True)
    assert (priced["gh-2"].unit_price, priced["gh-2"].open) == (80, True)
    assert (priced["gh-old"].unit_price, priced["gh-old"].open) == (20, False)
    assert (priced["st-edge"].unit_price, priced["st-edge"].open) == (20, True)
    assert (priced["st-soon"].unit_price, priced["st-soon"].open) == (100, False)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    ["not-a-cursor", "%%%", b64(b"x1:gh-1"), b64(b"\xff\xfe l1:gh-1"), b64(b"gh-1"), "l1:gh-1"],
    ids=["garbage", "not-base64", "wrong-prefix", "not-utf8", "bare-id", "unencoded"],
)
async def test_a_cursor_we_did_not_issue_is_an_invalid_argument(stocked: Database, cursor: str) -> None:
    with pytest.raises(InvalidArgument, match="cursor"):
        await page(stocked, cursor=cursor)


async def test_a_cursor_survives_a_round_trip_through_text(stocked: Database) -> None:
    first = await page(stocked, limit=2)
    assert first.next_cursor is not None
    assert first.next_cursor.isascii() and "=" not in first.next_cursor
    assert market.decode_cursor(first.next_cursor) == "gh-2"


async def test_a_sold_proxy_listing_cannot_start_handing_out_tokens(db: Database) -> None:
    await load(db, spec(delivery="proxy", api=["https://api.github.com"]))
    await sell(db, "github-repo-read", 2)
    before = await everything(db)
    with pytest.raises(MarketFileError) as caught:
        await load(db, spec(delivery="token", api=["https://api.github.com"]))
    assert str(caught.value).startswith('listing github-repo-read: delivery: cannot change from "proxy" to "token"')
    assert await everything(db) == before
    await load(db, spec(delivery="proxy", api=["https://api.github.com", "https://uploads.github.com"]))
