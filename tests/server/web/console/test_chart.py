"""The Market page's V(t) line is the tools' own integer price function, step for step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

from server import market
from server.demo import demo_listings
from server.pricing import price_at
from server.web.console.chart import MAX_STEPS, TOP, chart

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


def _prices(c: object, top: int) -> list[float]:
    """The price each vertex of the polyline stands for (back from its y coordinate)."""
    height = c.bottom - TOP  # type: ignore[attr-defined]
    points = c.points.split()  # type: ignore[attr-defined]
    return [round((TOP + height - float(p.split(",")[1])) / height * top, 6) for p in points]


def test_todays_point_is_the_price_list_market_answers_for_every_demo_listing() -> None:
    for spec in demo_listings():
        listing = spec.to_listing()
        c = chart(listing, NOW)
        assert c.now_price == market.price_now(listing, NOW).unit_price
        assert c.in_window


def test_each_step_of_the_line_is_where_the_integer_price_drops_by_one() -> None:
    listing = demo_listings()[0].to_listing()  # 20 → 5: 15 one-credit drops, each drawn
    c = chart(listing, NOW)
    prices = _prices(c, c.top_price)
    assert prices[0] == listing.start_price and prices[-1] == listing.floor_price
    assert all(a >= b for a, b in pairwise(prices))  # never rises
    steps = listing.start_price - listing.floor_price
    assert len(prices) == 1 + 2 * steps
    window = (listing.closes_at - listing.opens_at) // timedelta(microseconds=1)
    for k in range(1, steps + 1):  # the drop to start − k happens exactly at ⌈k·window/steps⌉ µs
        at = listing.opens_at + timedelta(microseconds=-(-k * window // steps))
        assert price_at(listing.start_price, listing.floor_price, listing.opens_at, listing.closes_at, at) == (
            listing.start_price - k
        )
        before = at - timedelta(microseconds=1)
        assert price_at(listing.start_price, listing.floor_price, listing.opens_at, listing.closes_at, before) == (
            listing.start_price - k + 1
        )


def test_a_listing_with_many_steps_and_one_outside_its_window_still_draw() -> None:
    wide = demo_listings()[0].model_copy(update={"start_price": 10_000, "floor_price": 0}).to_listing()
    c = chart(wide, NOW)
    assert wide.start_price - wide.floor_price > MAX_STEPS and c.now_price == market.price_now(wide, NOW).unit_price
    late = NOW + timedelta(days=3650)
    closed = chart(wide, late)
    assert not closed.in_window and closed.now_price == wide.floor_price and closed.now_x == closed.right
