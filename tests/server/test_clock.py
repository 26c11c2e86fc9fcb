"""Times are written one way everywhere: RFC 3339, UTC, microseconds, `Z`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from server.clock import parse_rfc3339, rfc3339

offsets = st.integers(min_value=-23 * 60, max_value=23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
moments = st.datetimes(min_value=datetime(1000, 1, 2), max_value=datetime(9999, 12, 30), timezones=offsets)


@given(moments)
def test_rfc3339_is_the_fixed_width_utc_text_and_reads_back(moment: datetime) -> None:
    text = rfc3339(moment)
    assert text == moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert len(text) == 27
    assert parse_rfc3339(text) == moment


def test_whole_seconds_keep_their_microseconds_digits() -> None:
    assert rfc3339(datetime(2026, 11, 28, 17, 0, tzinfo=UTC)) == "2026-11-28T17:00:00.000000Z"
