"""Times as the fleet writes them: RFC 3339 in UTC with ``Z``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edgecloud.clock import format_time, now_text, parse_time, utc_now

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def test_times_are_rfc3339_utc_z() -> None:
    moment = datetime(2025, 3, 1, 13, 0, 5, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(moment) == "2025-03-01T12:00:05Z"
    assert parse_time("2025-03-01T12:00:05Z") == datetime(2025, 3, 1, 12, 0, 5, tzinfo=timezone.utc)
    assert parse_time("2025-03-01T13:00:05.5+01:00") == datetime(2025, 3, 1, 12, 0, 5, 500000,
                                                                tzinfo=timezone.utc)
    assert parse_time(format_time(NOW)) == NOW
    with pytest.raises(ValueError):
        format_time(datetime(2025, 1, 1))  # naive
    for bad in ("2025-03-01", "2025-03-01T12:00:05", "2025-03-01 12:00:05Z", "2025-13-01T00:00:00Z"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_now_is_aware_utc_and_its_text_parses_back() -> None:
    before = utc_now().replace(microsecond=0)
    text = now_text()
    assert before.tzinfo is timezone.utc and text.endswith("Z")
    assert before <= parse_time(text) <= utc_now()
