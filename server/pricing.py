"""The market's linearly decaying unit price (SPEC §5), in integer credits."""

from __future__ import annotations

from datetime import datetime, timedelta


def price_at(start: int, floor: int, opens_at: datetime, closes_at: datetime, now: datetime) -> int:
    """`start − ⌊(start − floor) · clamp(t − opens, 0, closes − opens) / (closes − opens)⌋`.

    Times are compared in whole microseconds so the result is exact integer arithmetic.
    """
    window = _micros(closes_at - opens_at)
    if window <= 0:
        return floor
    elapsed = min(max(_micros(now - opens_at), 0), window)
    return start - ((start - floor) * elapsed) // window


def is_open(opens_at: datetime, closes_at: datetime, now: datetime) -> bool:
    """A listing can be bought from `opens_at` until, and not after, `closes_at`."""
    return opens_at <= now <= closes_at


def _micros(delta: timedelta) -> int:
    # differences of aware datetimes are exact in any time zone; timestamp() would go through a float
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
