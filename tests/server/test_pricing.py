"""The unit price decays linearly from start to floor, in exact integer arithmetic (SPEC §5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.pricing import is_open, price_at

OPENS = datetime(2026, 11, 1, tzinfo=UTC)
CLOSES = datetime(2027, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def reference(start: int, floor: int, opens: datetime, closes: datetime, now: datetime) -> int:
    """SPEC §5 written out again, through timedelta floor division (exact) rather than the module's helper."""
    window = (closes - opens) // US
    elapsed = min(max((now - opens) // US, 0), window)
    return start - (start - floor) * elapsed // window


@pytest.mark.parametrize("now", [OPENS - timedelta(days=400), OPENS - US, OPENS])
def test_price_is_start_until_the_listing_opens(now: datetime) -> None:
    assert price_at(100, 20, OPENS, CLOSES, now) == 100


@pytest.mark.parametrize("now", [CLOSES, CLOSES + US, CLOSES + timedelta(days=3650)])
def test_price_is_floor_from_the_close_on(now: datetime) -> None:
    assert price_at(100, 20, OPENS, CLOSES, now) == 20


def test_price_halfway_through_the_window_is_halfway_between_start_and_floor() -> None:
    half = OPENS + (CLOSES - OPENS) / 2
    assert price_at(100, 20, OPENS, CLOSES, half) == 60


def test_price_floors_the_decayed_amount_so_it_rounds_up() -> None:
    closes = OPENS + 3 * US
    # 100 · 1/3 = 33.3 decayed → 67 (not 66); 100 · 2/3 = 66.6 decayed → 34 (not 33)
    assert [price_at(100, 0, OPENS, closes, OPENS + k * US) for k in range(4)] == [100, 67, 34, 0]


def test_price_is_always_an_int() -> None:
    moments = [OPENS - US, OPENS, OPENS + timedelta(days=7, microseconds=13), CLOSES, CLOSES + US]
    assert all(type(price_at(97, 13, OPENS, CLOSES, m)) is int for m in moments)


def test_floor_equal_to_start_is_a_flat_price() -> None:
    moments = [OPENS - US, OPENS, OPENS + timedelta(days=17), CLOSES, CLOSES + US]
    assert {price_at(42, 42, OPENS, CLOSES, m) for m in moments} == {42}


def test_price_moves_on_a_single_microsecond() -> None:
    # one credit of decay per microsecond of window: every microsecond counts, none is lost to a float
    window = (CLOSES - OPENS) // US
    start = 10**15 + window
    floor = 10**15
    assert price_at(start, floor, OPENS, CLOSES, OPENS + US) == start - 1
    assert price_at(start, floor, OPENS, CLOSES, CLOSES - US) == floor + 1
    middle = OPENS + timedelta(days=31, seconds=7, microseconds=123_457)
    assert price_at(start, floor, OPENS, CLOSES, middle) - price_at(start, floor, OPENS, CLOSES, middle + US) == 1


def test_price_is_the_same_whatever_time_zone_the_moments_are_given_in() -> None:
    now = OPENS + (CLOSES - OPENS) / 4
    in_utc = price_at(100, 20, OPENS, CLOSES, now)
    for offset in (timedelta(hours=2), timedelta(hours=-7), timedelta(hours=5, minutes=30)):
        zone = timezone(offset)
        assert price_at(100, 20, OPENS, CLOSES, now.astimezone(zone)) == in_utc == 80
        assert price_at(100, 20, OPENS.astimezone(zone), CLOSES, now) == in_utc


moments = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)
)


@given(
    start=st.integers(min_value=0, max_value=10**18),
    drop=st.integers(min_value=0, max_value=10**18),
    now=moments,
    later=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=500)),
)
def test_price_matches_the_formula_stays_in_bounds_and_never_rises(
    start: int, drop: int, now: datetime, later: timedelta
) -> None:
    floor = max(start - drop, 0)
    price = price_at(start, floor, OPENS, CLOSES, now)
    assert price == reference(start, floor, OPENS, CLOSES, now)
    assert floor <= price <= start
    assert price_at(start, floor, OPENS, CLOSES, now + later) <= price


def test_a_listing_is_open_from_its_opening_through_its_closing_microsecond() -> None:
    assert not is_open(OPENS, CLOSES, OPENS - US)
    assert is_open(OPENS, CLOSES, OPENS)
    assert is_open(OPENS, CLOSES, OPENS + (CLOSES - OPENS) / 2)
    assert is_open(OPENS, CLOSES, CLOSES)
    assert not is_open(OPENS, CLOSES, CLOSES + US)


def test_is_open_compares_instants_not_wall_clock_readings() -> None:
    # 23:30 at UTC-1 on the last day is 00:30 UTC the next day: after the close
    late = datetime(2026, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1)))
    assert not is_open(OPENS, CLOSES, late)
    assert is_open(OPENS, CLOSES, late - timedelta(minutes=31))
