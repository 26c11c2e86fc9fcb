"""The Market page's V(t) line: a listing's price over its whole sale window, as SVG coordinates.

Every point is `server.pricing.price_at` at that instant — the same integer function `list_market`
answers with, never a second formula — so today's point is exactly the tool's `unit_price`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from server.clock import rfc3339
from server.models import Listing
from server.pricing import price_at

WIDTH, HEIGHT = 560, 140  # the drawing area, in SVG user units
LEFT, TOP = 48, 10  # room for the price axis' labels
SAMPLES = 200
MAX_STEPS = 400  # up to this many one-credit drops, each is drawn where it happens


@dataclass(frozen=True)
class Chart:
    points: str  # the polyline's "x,y x,y …"
    now_x: float
    now_y: float
    now_price: int
    now_at: str  # RFC 3339
    in_window: bool  # whether `now` lies in the sale window (else the point sits at its nearer end)
    top_price: int
    floor_price: int
    opens: str
    closes: str
    width: int = WIDTH + LEFT + 8
    height: int = HEIGHT + TOP + 24
    left: int = LEFT
    top: int = TOP
    bottom: int = TOP + HEIGHT
    right: int = LEFT + WIDTH


def chart(listing: Listing, now: datetime) -> Chart:
    """The listing's V(t) polyline over [opens_at, closes_at] and the point at `now`."""
    opens, closes = listing.opens_at, listing.closes_at
    span = (closes - opens) if closes > opens else None
    top = max(listing.start_price, listing.floor_price, 1)

    def price(at: datetime) -> int:
        return price_at(listing.start_price, listing.floor_price, opens, closes, at)

    def xy(fraction: float, value: int) -> tuple[float, float, int]:
        return round(LEFT + fraction * WIDTH, 2), round(TOP + HEIGHT - value / top * HEIGHT, 2), value

    points = [xy(0.0, price(opens))]
    if span is not None:
        window = span // timedelta(microseconds=1)
        steps = listing.start_price - listing.floor_price
        if 0 < steps <= MAX_STEPS:  # every step exactly: the instants the integer price drops by one
            instants = [-(-k * window // steps) for k in range(1, steps + 1)]
        else:  # too many steps to draw each: a step line through evenly spaced instants
            instants = [window * i // SAMPLES for i in range(1, SAMPLES + 1)]
        for micros in instants:
            at = opens + timedelta(microseconds=micros)
            points += [xy(micros / window, int(points[-1][2])), xy(micros / window, price(at))]
    clamped = min(max(now, opens), closes)
    fraction = (clamped - opens) / span if span is not None else 0.0
    now_price = price(now)
    x, y, _ = xy(fraction, now_price)
    return Chart(
        points=" ".join(f"{px},{py}" for px, py, _ in points), now_x=x, now_y=y, now_price=now_price,
        now_at=rfc3339(now), in_window=opens <= now <= closes, top_price=top, floor_price=listing.floor_price,
        opens=rfc3339(opens)[:10], closes=rfc3339(closes)[:10],
    )
