"""Schedules: expressions and their slots (DST days included), and the scheduler firing them on
SQLite with an injected clock: catch-up, no double firing across nodes and restarts."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, insert, select

from impuls.errors import InvalidInput
from impuls.events.scheduler import Scheduler, ScheduleStore
from impuls.events.schedules import Cron, newest_slot, next_slot, parse, validate
from impuls.store.db import open_engine
from impuls.store.schema import events, functions

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def slots(expression: str, after: datetime, count: int, timezone: str = "UTC",
          start: datetime | None = None) -> list[datetime]:
    """The first ``count`` slots after ``after``."""
    timetable = parse(expression, timezone, start or after)
    found: list[datetime] = []
    while len(found) < count:
        following = next_slot(timetable, found[-1] if found else after)
        assert following is not None
        found.append(following)
    return found


def slots_between(expression: str, lo: datetime, hi: datetime, timezone: str = "UTC") -> list[datetime]:
    timetable = parse(expression, timezone)
    found: list[datetime] = []
    current = lo
    while (following := next_slot(timetable, current)) is not None and following <= hi:
        found.append(following)
        current = following
    return found


def bad(expression: str, timezone: str = "UTC") -> str:
    with pytest.raises(InvalidInput) as caught:
        validate(expression, timezone)
    return caught.value.message


# --- rate --------------------------------------------------------------------------------------


def test_rate_counts_from_the_start_in_whole_seconds() -> None:
    start = utc(2024, 5, 1, 10, 17, 3) + timedelta(microseconds=437_000)
    assert slots("rate(5 minutes)", start, 3) == [utc(2024, 5, 1, 10, 22, 3), utc(2024, 5, 1, 10, 27, 3),
                                                 utc(2024, 5, 1, 10, 32, 3)]
    rate = parse("rate(1 hour)", "UTC", start)
    assert next_slot(rate, utc(2024, 5, 1, 12, 17, 3)) == utc(2024, 5, 1, 13, 17, 3)  # strictly after
    assert next_slot(rate, utc(2024, 5, 1, 12, 17, 2)) == utc(2024, 5, 1, 12, 17, 3)
    assert next_slot(rate, utc(2000, 1, 1)) == utc(2024, 5, 1, 11, 17, 3)  # before the start: the first


@pytest.mark.parametrize("expression, seconds", [
    ("rate(1 second)", 1), ("rate(30 seconds)", 30), ("rate(1 minute)", 60), ("rate(2 minutes)", 120),
    ("rate(1 hour)", 3600), ("rate(12 hours)", 43200), ("rate(1 day)", 86400), ("rate(7 days)", 604800),
    ("rate( 3  minutes )", 180), ("RATE(3 Minutes)", 180),
])
def test_rate_units(expression: str, seconds: int) -> None:
    start = utc(2024, 1, 1)
    assert next_slot(parse(expression, "UTC", start), start) == start + timedelta(seconds=seconds)


def test_rate_ignores_daylight_saving_time() -> None:
    start = utc(2024, 3, 30, 12)  # a day before Berlin springs forward
    assert slots("rate(1 day)", start, 2, "Europe/Berlin") == [utc(2024, 3, 31, 12), utc(2024, 4, 1, 12)]


def test_newest_slot_of_a_rate() -> None:
    rate = parse("rate(10 minutes)", "UTC", utc(2024, 1, 1))
    assert newest_slot(rate, utc(2024, 1, 1), utc(2024, 1, 1, 5, 3)) == utc(2024, 1, 1, 5)
    assert newest_slot(rate, utc(2024, 1, 1, 5, 1), utc(2024, 1, 1, 5, 3)) is None
    assert newest_slot(rate, utc(2024, 1, 1), utc(2024, 1, 1, 0, 9)) is None  # the start is no slot


# --- six-field cron --------------------------------------------------------------------------


def test_noon_every_day() -> None:
    assert slots("cron(0 12 * * ? *)", utc(2024, 2, 28, 12), 3) == [
        utc(2024, 2, 29, 12), utc(2024, 3, 1, 12), utc(2024, 3, 2, 12)]
    assert slots("cron(0 12 * * ? *)", utc(2024, 2, 28, 11, 59, 59), 1) == [utc(2024, 2, 28, 12)]


def test_every_15_minutes_on_weekdays() -> None:
    friday_night = utc(2024, 5, 3, 23, 30)
    assert slots("cron(0/15 * ? * MON-FRI *)", friday_night, 3) == [
        utc(2024, 5, 3, 23, 45), utc(2024, 5, 6, 0, 0), utc(2024, 5, 6, 0, 15)]
    week = slots_between("cron(0/15 * ? * MON-FRI *)", utc(2024, 5, 5), utc(2024, 5, 12))
    assert len(week) == 5 * 24 * 4
    assert {s.weekday() for s in week} == {0, 1, 2, 3, 4}
    assert slots_between("cron(0/15 * ? * 2-6 *)", utc(2024, 5, 5), utc(2024, 5, 12)) == week


@pytest.mark.parametrize("expression, after, expected", [
    ("cron(0 10 * * ? *)", utc(2024, 1, 1, 10), [utc(2024, 1, 2, 10)]),
    ("cron(15 12 * * ? *)", utc(2024, 1, 1), [utc(2024, 1, 1, 12, 15)]),
    ("cron(0 18 ? * MON-FRI *)", utc(2024, 6, 7, 18), [utc(2024, 6, 10, 18), utc(2024, 6, 11, 18)]),
    ("cron(0 8 1 * ? *)", utc(2024, 1, 15), [utc(2024, 2, 1, 8), utc(2024, 3, 1, 8)]),
    ("cron(0/10 * ? * MON-FRI *)", utc(2024, 6, 7, 23, 55), [utc(2024, 6, 10)]),
    ("cron(0/5 8-17 ? * MON-FRI *)", utc(2024, 6, 10, 17, 55), [utc(2024, 6, 11, 8)]),
    ("cron(0 9 ? * 2#1 *)", utc(2024, 1, 1, 9), [utc(2024, 2, 5, 9), utc(2024, 3, 4, 9)]),  # first Monday
    ("cron(0 0 1 JAN,JUL ? *)", utc(2024, 1, 1), [utc(2024, 7, 1), utc(2025, 1, 1)]),
    ("cron(0 0 1 jan-mar/2 ? *)", utc(2024, 1, 1), [utc(2024, 3, 1), utc(2025, 1, 1)]),
    ("cron(30 6 ? * SUN,sat *)", utc(2024, 6, 7), [utc(2024, 6, 8, 6, 30), utc(2024, 6, 9, 6, 30)]),
    ("cron(0 12 1,15 * ? 2024-2025)", utc(2025, 12, 1, 12), [utc(2025, 12, 15, 12)]),
    ("cron(5,10-12 * * * ? *)", utc(2024, 1, 1, 0, 5),
     [utc(2024, 1, 1, 0, 10), utc(2024, 1, 1, 0, 11), utc(2024, 1, 1, 0, 12), utc(2024, 1, 1, 1, 5)]),
    ("cron(0 0 ? * * *)", utc(2024, 12, 31, 0, 0, 1), [utc(2025, 1, 1)]),
    ("cron(0 0 29 2 ? *)", utc(2096, 3, 1), [utc(2104, 2, 29)]),  # 2100 is no leap year
])
def test_six_fields(expression: str, after: datetime, expected: list[datetime]) -> None:
    assert slots(expression, after, len(expected)) == expected


def test_a_year_ends_the_schedule() -> None:
    timetable = parse("cron(0 0 1 1 ? 2030)")
    assert next_slot(timetable, utc(2024, 6, 1)) == utc(2030, 1, 1)
    assert next_slot(timetable, utc(2030, 1, 1)) is None


@pytest.mark.parametrize("expression, months", [
    # last day of the month
    ("cron(0 18 L * ? *)", {1: 31, 2: 29, 4: 30}),
    ("cron(0 18 L-2 * ? *)", {1: 29, 2: 27, 4: 28}),
    # last weekday: 2024-03-31 is a Sunday, 2024-08-31 a Saturday
    ("cron(0 18 LW * ? *)", {1: 31, 3: 29, 8: 30}),
    # weekday nearest the 15th: 2024-06-15 is a Saturday, 2024-09-15 a Sunday
    ("cron(0 18 15W * ? *)", {5: 15, 6: 14, 9: 16}),
    # nearest the 1st, within the month: 2024-06-01 is a Saturday
    ("cron(0 18 1W * ? *)", {6: 3, 7: 1}),
    # the third Friday
    ("cron(0 18 ? * 6#3 *)", {1: 19, 2: 16, 3: 15}),
    ("cron(0 18 ? * FRI#3 *)", {1: 19, 2: 16, 3: 15}),
    # the last Friday
    ("cron(0 18 ? * 6L *)", {1: 26, 2: 23, 5: 31}),
    ("cron(0 18 ? * FRIL *)", {1: 26, 2: 23, 5: 31}),
    # L alone: the last day of the week, Saturday
    ("cron(0 18 ? * L *)", {1: 6}),
])
def test_l_w_and_hash(expression: str, months: dict[int, int]) -> None:
    timetable = parse(expression)
    for month, day in months.items():
        first = next_slot(timetable, utc(2024, month, 1) - timedelta(seconds=1))
        assert first is not None and (first.month, first.day, first.hour) == (month, day, 18), (month, first)


def test_fifth_monday_of_february_is_rare() -> None:
    # only leap years whose February starts on a Monday
    assert slots("cron(0 0 ? 2 2#5 *)", utc(2024, 1, 1), 2) == [utc(2044, 2, 29), utc(2072, 2, 29)]


# --- five fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("expression, after, expected", [
    ("*/5 * * * *", utc(2024, 1, 1, 0, 3), [utc(2024, 1, 1, 0, 5), utc(2024, 1, 1, 0, 10)]),
    ("0 9 * * 1-5", utc(2024, 6, 7, 9), [utc(2024, 6, 10, 9)]),
    ("0 9 * * MON-FRI", utc(2024, 6, 7, 9), [utc(2024, 6, 10, 9)]),
    ("0 0 * * 0", utc(2024, 6, 3), [utc(2024, 6, 9)]),  # Sunday is 0 ...
    ("0 0 * * 7", utc(2024, 6, 3), [utc(2024, 6, 9)]),  # ... and 7
    ("0 0 * * SUN", utc(2024, 6, 3), [utc(2024, 6, 9)]),
    ("30 4 1,15 * *", utc(2024, 6, 2), [utc(2024, 6, 15, 4, 30), utc(2024, 7, 1, 4, 30)]),
    ("0 0 1 */3 *", utc(2024, 2, 1), [utc(2024, 4, 1), utc(2024, 7, 1)]),
    ("15 14 1 * *", utc(2024, 1, 1), [utc(2024, 1, 1, 14, 15)]),
    # both day fields restricted: a day matching either (the 13th, or a Friday)
    ("0 0 13 * 5", utc(2024, 9, 1), [utc(2024, 9, 6), utc(2024, 9, 13), utc(2024, 9, 20)]),
    ("0 0 13 * 5", utc(2024, 10, 5), [utc(2024, 10, 11), utc(2024, 10, 13), utc(2024, 10, 18)]),
    # a day field starting with * does not widen: both must match
    ("0 0 */2 * 1", utc(2024, 7, 1), [utc(2024, 7, 15), utc(2024, 7, 29)]),
    ("@hourly", utc(2024, 1, 1, 0, 30), [utc(2024, 1, 1, 1)]),
    ("@daily", utc(2024, 1, 1, 0, 30), [utc(2024, 1, 2)]),
    ("@weekly", utc(2024, 6, 3), [utc(2024, 6, 9)]),
    ("@monthly", utc(2024, 6, 3), [utc(2024, 7, 1)]),
    ("@yearly", utc(2024, 6, 3), [utc(2025, 1, 1)]),
])
def test_five_fields(expression: str, after: datetime, expected: list[datetime]) -> None:
    assert slots(expression, after, len(expected)) == expected


def test_five_and_six_fields_agree() -> None:
    lo, hi = utc(2024, 1, 1), utc(2024, 2, 1)
    five = slots_between("*/10 8-17 * * 1-5", lo, hi)
    assert five == slots_between("cron(0/10 8-17 ? * MON-FRI *)", lo, hi) and len(five) == 23 * 10 * 6
    assert slots_between("0 0 * * 0", lo, hi) == slots_between("cron(0 0 ? * 1 *)", lo, hi)


# --- time zones and daylight saving time ------------------------------------------------------


def local(ts: datetime, tz: ZoneInfo) -> str:
    return ts.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")


def test_berlin_spring_forward_runs_a_skipped_time_once_after_the_gap() -> None:
    # 2024-03-31: 02:00 CET becomes 03:00 CEST; 02:30 does not exist
    found = slots_between("cron(30 2 * * ? *)", utc(2024, 3, 29), utc(2024, 4, 2), "Europe/Berlin")
    assert [local(s, BERLIN) for s in found] == [
        "2024-03-29 02:30 CET", "2024-03-30 02:30 CET", "2024-03-31 03:00 CEST", "2024-04-01 02:30 CEST"]
    assert found[2] == utc(2024, 3, 31, 1)  # the first instant after the gap


def test_berlin_spring_forward_every_15_minutes() -> None:
    found = slots_between("cron(0/15 * * * ? *)", utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 1, 30),
                          "Europe/Berlin")
    # 02:00, 02:15, 02:30 and 02:45 do not exist: they fire once, with 03:00
    assert [local(s, BERLIN) for s in found] == [
        "2024-03-31 01:45 CET", "2024-03-31 03:00 CEST", "2024-03-31 03:15 CEST", "2024-03-31 03:30 CEST"]


def test_berlin_fall_back_runs_a_repeated_time_once() -> None:
    # 2024-10-27: 03:00 CEST becomes 02:00 CET; 02:30 happens twice
    found = slots_between("cron(30 2 * * ? *)", utc(2024, 10, 25), utc(2024, 10, 29), "Europe/Berlin")
    assert [local(s, BERLIN) for s in found] == [
        "2024-10-25 02:30 CEST", "2024-10-26 02:30 CEST", "2024-10-27 02:30 CEST", "2024-10-28 02:30 CET"]
    # asked from within the second 02:30, the next one is tomorrow's
    timetable = parse("cron(30 2 * * ? *)", "Europe/Berlin")
    assert next_slot(timetable, utc(2024, 10, 27, 1, 15)) == utc(2024, 10, 28, 1, 30)
    assert next_slot(timetable, utc(2024, 10, 27, 0, 30)) == utc(2024, 10, 28, 1, 30)


def test_berlin_fall_back_hourly_fires_each_wall_time_once() -> None:
    found = slots_between("cron(0 * * * ? *)", utc(2024, 10, 26, 21, 30), utc(2024, 10, 27, 3, 30),
                          "Europe/Berlin")
    assert [local(s, BERLIN) for s in found] == [
        "2024-10-27 00:00 CEST", "2024-10-27 01:00 CEST", "2024-10-27 02:00 CEST",
        "2024-10-27 03:00 CET", "2024-10-27 04:00 CET"]


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2024-03-10: 02:00 EST becomes 03:00 EDT
    spring = slots_between("cron(30 2 * * ? *)", utc(2024, 3, 9), utc(2024, 3, 12), "America/New_York")
    assert [local(s, NEW_YORK) for s in spring] == [
        "2024-03-09 02:30 EST", "2024-03-10 03:00 EDT", "2024-03-11 02:30 EDT"]
    # 2024-11-03: 02:00 EDT becomes 01:00 EST; 01:30 happens twice
    fall = slots_between("30 1 * * *", utc(2024, 11, 2), utc(2024, 11, 5), "America/New_York")
    assert [local(s, NEW_YORK) for s in fall] == [
        "2024-11-02 01:30 EDT", "2024-11-03 01:30 EDT", "2024-11-04 01:30 EST"]
    assert fall[1] == utc(2024, 11, 3, 5, 30)


def test_times_outside_the_change_are_plain_local_times() -> None:
    assert slots("cron(0 9 * * ? *)", utc(2024, 7, 1), 1, "America/New_York") == [utc(2024, 7, 1, 13)]
    assert slots("0 9 * * *", utc(2024, 1, 1), 1, "Europe/Berlin") == [utc(2024, 1, 1, 8)]
    assert slots("cron(0 9 * * ? *)", utc(2024, 7, 1), 1, "Asia/Kolkata") == [utc(2024, 7, 1, 3, 30)]


def test_a_skipped_day_fires_once() -> None:
    # Samoa skipped 2011-12-30 entirely (from UTC-10 to UTC+14)
    found = slots_between("@daily", utc(2011, 12, 27, 12), utc(2012, 1, 1, 9), "Pacific/Apia")
    assert [s.astimezone(ZoneInfo("Pacific/Apia")).date().isoformat() for s in found] == [
        "2011-12-28", "2011-12-29", "2011-12-31", "2012-01-01"]


def test_newest_slot_of_a_cron() -> None:
    cron = parse("cron(0 0 1 1 ? *)")
    assert newest_slot(cron, utc(2000, 1, 1), utc(2024, 6, 1)) == utc(2024, 1, 1)
    assert newest_slot(cron, utc(2024, 1, 2), utc(2024, 6, 1)) is None
    every_minute = parse("* * * * *")
    assert newest_slot(every_minute, utc(2020, 1, 1), utc(2024, 3, 1, 12, 30, 30)) == utc(2024, 3, 1, 12, 30)
    at = utc(2024, 3, 1, 12, 30)
    assert newest_slot(every_minute, at, at) == at
    berlin = parse("cron(30 2 * * ? *)", "Europe/Berlin")
    assert newest_slot(berlin, utc(2024, 3, 1), utc(2024, 3, 31, 1, 30)) == utc(2024, 3, 31, 1)


def test_aware_datetimes_only() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_slot(parse("rate(1 minute)"), datetime(2024, 1, 1))


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("expression, words", [
    ("", "a schedule expression"),
    ("   ", "a schedule expression"),
    ("rate(0 minutes)", "1 or more"),
    ("rate(-1 minutes)", "1 or more"),
    ("rate(1.5 hours)", "whole number"),
    ("rate(five minutes)", "whole number"),
    ("rate(5 fortnights)", "unit must be one of"),
    ("rate(5)", "write rate(N unit)"),
    ("rate(5 minutes", "write rate(N unit)"),
    ("rate(100000 days)", "longer than"),
    ("cron(0 12 * * * *)", "exactly one of day-of-month and day-of-week must be '?'"),
    ("cron(0 12 ? * ? *)", "exactly one of day-of-month and day-of-week must be '?'"),
    ("cron(0 12 * *)", "takes six fields"),
    ("cron(0 12 * * ? * *)", "takes six fields"),
    ("cron(*/5 * * * *)", "without cron(...)"),
    ("cron(60 * * * ? *)", "minutes field '60': 60 is out of range 0-59"),
    ("cron(0 24 * * ? *)", "hours field '24': 24 is out of range 0-23"),
    ("cron(0 0 0 * ? *)", "day-of-month field '0'"),
    ("cron(0 0 32 * ? *)", "day-of-month field '32'"),
    ("cron(0 0 1 13 ? *)", "month field '13'"),
    ("cron(0 0 1 FOO ? *)", "'FOO' is not a number or a name (JAN-DEC)"),
    ("cron(0 0 ? * 8 *)", "day-of-week field '8': 8 is out of range 1-7"),
    ("cron(0 0 ? * 0 *)", "day-of-week field '0': 0 is out of range 1-7"),
    ("cron(0 0 ? * MON-SUN *)", "goes backwards"),
    ("cron(0 0 ? * 2#6 *)", "after # must be 1 to 5"),
    ("cron(0 0 ? * MON#2,FRI *)", "# stands alone"),
    ("cron(0 0 ? * L,2 *)", "L stands alone"),
    ("cron(0 0 L,3 * ? *)", "L and W stand alone"),
    ("cron(0 0 W * ? *)", "W needs a day"),
    ("cron(0 0 L-31 * ? *)", "L-n takes n from 0 to 30"),
    ("cron(0 0 1 1 ? 1969)", "year field '1969'"),
    ("cron(0 0 1 1 ? 2200)", "year field '2200'"),
    ("cron(0 0 31 2 ? *)", "no date ever matches"),
    ("cron(0 0 30 2,4 ? *)", None),  # valid: April has a 30th
    ("cron(0/0 * * * ? *)", "step after '/' must be a whole number of 1 or more"),
    ("cron(1,,2 * * * ? *)", "an empty item"),
    ("* * * *", "use rate(N unit)"),
    ("* * * * * *", "use rate(N unit)"),
    ("0 0 L * *", "need the six-field cron(...) form"),
    ("0 0 * * MON#2", "need the six-field cron(...) form"),
    ("0 0 ? * MON", "need the six-field cron(...) form"),
    ("0 0 * * 8", "day-of-week field '8': 8 is out of range 0-7"),
    ("@reboot", "not one of"),
    ("at(2030-01-01T00:00:00)", "not supported"),
    ("x" * 300, "at most 256 characters"),
])
def test_invalid_expressions_name_the_problem(expression: str, words: str | None) -> None:
    if words is None:
        validate(expression)
        return
    message = bad(expression)
    assert message.startswith("expression: ") and words in message, message


@pytest.mark.parametrize("timezone", ["Europe/Berln", "utc", "", "/etc/passwd", "../x", "Z" * 100, 5, None])
def test_invalid_time_zones(timezone: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate("rate(1 minute)", timezone)
    assert caught.value.message.startswith("timezone: "), caught.value.message


def test_a_cron_is_parsed_once() -> None:
    first = parse("cron(0 12 * * ? *)", "Europe/Berlin", utc(2024, 1, 1))
    assert isinstance(first, Cron) and parse("cron(0 12 * * ? *)", "Europe/Berlin", utc(2025, 1, 1)) is first


# --- the scheduler ------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def add_function(db: Engine, name: str) -> None:
    now = datetime.now(UTC)
    with db.begin() as conn:
        conn.execute(insert(functions).values(
            id=str(uuid.uuid4()), name=name, description="", runtime="python3.11", handler="h.handler",
            code_sha256="0" * 64, code_size=1, code_kind="source", memory_mb=128, timeout_sec=30,
            environment="{}", status="active", max_concurrency=10, ephemeral_storage_mb=512, revision=1,
            created_at=now, updated_at=now))


def queued(db: Engine, function: str | None = None) -> list[dict[str, Any]]:
    """The scheduled events, oldest first, with their payloads decoded."""
    query = select(events).where(events.c.source == "schedule").order_by(events.c.created_at)
    if function is not None:
        query = query.where(events.c.function_name == function)
    with db.connect() as conn:
        rows = conn.execute(query).all()
    return [{**row._mapping, "payload": json.loads(row.payload)} for row in rows]


T0 = utc(2024, 5, 1, 10, 0, 0)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{tmp_path}/impuls.db")
    add_function(engine, "fn")
    yield engine
    engine.dispose()


def store_at(db: Engine, now: datetime) -> ScheduleStore:
    return ScheduleStore(db, clock=Clock(now))


def scheduler(db: Engine, node: str = "node-a") -> Scheduler:
    return Scheduler(db, node, account="123456789012", region="eu-central-1")


def test_a_slot_fires_once_with_eventbridges_payload(db: Engine) -> None:
    store_at(db, T0 + timedelta(microseconds=250)).create(
        "fn", {"name": "tick", "expression": "rate(1 minute)"})
    s = scheduler(db)
    assert s.fire_due(T0 + timedelta(seconds=59)) == 0
    assert s.fire_due(T0 + timedelta(seconds=60)) == 1
    assert s.fire_due(T0 + timedelta(seconds=61)) == 0
    [event] = queued(db)
    assert (event["function_name"], event["qualifier"], event["source"], event["state"]) == (
        "fn", "$LATEST", "schedule", "queued")
    assert event["payload"] == {
        "version": "0", "id": event["request_id"], "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": "2024-05-01T10:01:00Z", "region": "eu-central-1",
        "resources": ["arn:aws:scheduler:eu-central-1:123456789012:schedule/fn/tick"], "detail": {}}
    schedule = store_at(db, T0).get("fn", "tick")
    assert schedule.last_slot == T0 + timedelta(minutes=1) and schedule.next_slot == T0 + timedelta(minutes=2)


def test_a_given_payload_is_sent_as_it_is(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "p", "expression": "rate(1 minute)", "payload": {"job": [1, "x"]}})
    assert scheduler(db).fire_due(T0 + timedelta(minutes=1)) == 1
    assert queued(db)[0]["payload"] == {"job": [1, "x"]}


def test_catch_up_one_fires_the_newest_missed_slot_once(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "m", "expression": "rate(1 minute)"})
    s = scheduler(db)
    s.started_at = T0 + timedelta(minutes=10, seconds=30)  # down from before the first slot
    assert s.fire_due(T0 + timedelta(minutes=10, seconds=30)) == 1
    assert [e["payload"]["time"] for e in queued(db)] == ["2024-05-01T10:10:00Z"]
    schedule = store_at(db, T0).get("fn", "m")
    assert schedule.last_slot == T0 + timedelta(minutes=10)
    assert schedule.next_slot == T0 + timedelta(minutes=11)
    assert s.fire_due(T0 + timedelta(minutes=10, seconds=59)) == 0
    assert s.fire_due(T0 + timedelta(minutes=11)) == 1


def test_catch_up_none_skips_slots_missed_before_the_start(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "n", "expression": "rate(1 minute)", "catch_up": "none"})
    s = scheduler(db)
    s.started_at = T0 + timedelta(minutes=10, seconds=30)
    assert s.fire_due(T0 + timedelta(minutes=10, seconds=30)) == 0
    schedule = store_at(db, T0).get("fn", "n")
    assert (schedule.last_slot, schedule.next_slot) == (None, T0 + timedelta(minutes=11))
    # slots after the start fire, even late
    assert s.fire_due(T0 + timedelta(minutes=11, seconds=20)) == 1
    assert [e["payload"]["time"] for e in queued(db)] == ["2024-05-01T10:11:00Z"]


def test_catch_up_none_fires_a_slot_just_before_the_start(db: Engine) -> None:
    # within the grace: another node may have been about to fire it
    store_at(db, T0).create("fn", {"name": "n", "expression": "rate(1 minute)", "catch_up": "none"})
    s = scheduler(db)
    s.started_at = T0 + timedelta(minutes=1, seconds=3)
    assert s.fire_due(T0 + timedelta(minutes=1, seconds=3)) == 1


def test_the_first_round_is_the_start_without_start(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "n", "expression": "rate(1 minute)", "catch_up": "none"})
    s = scheduler(db)
    assert s.fire_due(T0 + timedelta(hours=1, seconds=30)) == 0 and s.started_at is not None
    assert s.fire_due(T0 + timedelta(hours=1, minutes=1)) == 1


def test_a_disabled_schedule_does_not_fire_and_does_not_catch_up_when_enabled(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "d", "expression": "rate(1 minute)", "enabled": False})
    s = scheduler(db)
    assert s.fire_due(T0 + timedelta(minutes=5)) == 0
    store_at(db, T0 + timedelta(minutes=5, seconds=30)).update("fn", "d", {"enabled": True})
    assert s.fire_due(T0 + timedelta(minutes=5, seconds=30)) == 0
    assert s.fire_due(T0 + timedelta(minutes=6)) == 1
    assert [e["payload"]["time"] for e in queued(db)] == ["2024-05-01T10:06:00Z"]


def ticks(s: Scheduler, start: datetime, end: datetime, step: timedelta) -> int:
    fired, now = 0, start
    while now <= end:
        fired += s.fire_due(now)
        now += step
    return fired


def test_scheduler_across_berlins_spring_forward(db: Engine) -> None:
    store_at(db, utc(2024, 3, 29, 12)).create(
        "fn", {"name": "night", "expression": "cron(30 2 * * ? *)", "timezone": "Europe/Berlin"})
    s = scheduler(db)
    assert ticks(s, utc(2024, 3, 29, 12), utc(2024, 4, 1, 12), timedelta(minutes=5)) == 3
    assert [e["payload"]["time"] for e in queued(db)] == [
        "2024-03-30T01:30:00Z", "2024-03-31T01:00:00Z", "2024-04-01T00:30:00Z"]


def test_scheduler_across_berlins_fall_back(db: Engine) -> None:
    store_at(db, utc(2024, 10, 25, 12)).create(
        "fn", {"name": "night", "expression": "cron(30 2 * * ? *)", "timezone": "Europe/Berlin"})
    s = scheduler(db)
    assert ticks(s, utc(2024, 10, 25, 12), utc(2024, 10, 28, 12), timedelta(minutes=5)) == 3
    assert [e["payload"]["time"] for e in queued(db)] == [
        "2024-10-26T00:30:00Z", "2024-10-27T00:30:00Z", "2024-10-28T01:30:00Z"]


def test_scheduler_across_new_yorks_fall_back(db: Engine) -> None:
    store_at(db, utc(2024, 11, 2, 12)).create(
        "fn", {"name": "night", "expression": "30 1 * * *", "timezone": "America/New_York"})
    s = scheduler(db)
    assert ticks(s, utc(2024, 11, 2, 12), utc(2024, 11, 4, 12), timedelta(minutes=5)) == 2
    assert [e["payload"]["time"] for e in queued(db)] == ["2024-11-03T05:30:00Z", "2024-11-04T06:30:00Z"]


def test_a_restarted_scheduler_does_not_fire_a_slot_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/impuls.db"
    first = open_engine(url)
    add_function(first, "fn")
    store_at(first, T0).create("fn", {"name": "r", "expression": "rate(1 minute)"})
    assert scheduler(first).fire_due(T0 + timedelta(minutes=1)) == 1
    first.dispose()
    second = open_engine(url)  # a new process on the same database
    again = scheduler(second)
    assert again.fire_due(T0 + timedelta(minutes=1)) == 0
    assert again.fire_due(T0 + timedelta(minutes=1, seconds=30)) == 0
    assert again.fire_due(T0 + timedelta(minutes=2)) == 1
    assert [e["payload"]["time"] for e in queued(second)] == ["2024-05-01T10:01:00Z", "2024-05-01T10:02:00Z"]
    second.dispose()


def test_two_nodes_firing_the_same_slots_fire_each_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/impuls.db"
    engines = [open_engine(url), open_engine(url)]
    names = [f"fn{i}" for i in range(4)]
    for name in names:
        add_function(engines[0], name)
        for j in range(5):
            store_at(engines[0], T0).create(name, {"name": f"s{j}", "expression": "rate(1 minute)"})
    nodes = [scheduler(engines[0], "node-a"), scheduler(engines[1], "node-b")]
    rounds = 6
    counts = [0, 0]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            for minute in range(1, rounds + 1):
                barrier.wait(timeout=60)
                counts[i] += nodes[i].fire_due(T0 + timedelta(minutes=minute))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(counts) == len(names) * 5 * rounds
    fired = queued(engines[0])
    keys = [(e["function_name"], e["payload"]["resources"][0], e["payload"]["time"]) for e in fired]
    assert len(keys) == len(set(keys)) == len(names) * 5 * rounds
    for engine in engines:
        engine.dispose()


def test_a_bad_schedule_does_not_stop_the_others(db: Engine, caplog: pytest.LogCaptureFixture) -> None:
    store_at(db, T0).create("fn", {"name": "a", "expression": "rate(1 minute)"})
    store_at(db, T0).create("fn", {"name": "b", "expression": "rate(1 minute)"})
    from sqlalchemy import update

    from impuls.store.schema import schedules
    with db.begin() as conn:  # as if its zone vanished from the system
        conn.execute(update(schedules).where(schedules.c.name == "a").values(timezone="Nowhere/Gone"))
    s = scheduler(db)
    assert s.fire_due(T0 + timedelta(minutes=1)) == 1
    assert s.fire_due(T0 + timedelta(minutes=2)) == 1
    assert sum("cannot fire" in r.message for r in caplog.records) == 1  # reported once


def test_a_schedule_changed_while_firing_is_left_alone(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "c", "expression": "rate(1 minute)"})
    s = scheduler(db)
    real_fire = s._fire

    def change_first(row: Any, now: datetime) -> int:  # a PATCH between the read and the write
        store_at(db, T0 + timedelta(minutes=1)).update("fn", "c", {"enabled": False})
        return real_fire(row, now)

    s._fire = change_first  # type: ignore[method-assign]
    assert s.fire_due(T0 + timedelta(minutes=1)) == 0
    assert queued(db) == []


def test_the_loop_fires_calls_on_fired_and_survives_errors(db: Engine) -> None:
    store_at(db, T0).create("fn", {"name": "l", "expression": "rate(1 minute)"})
    calls = {"clock": 0}

    def clock() -> datetime:
        calls["clock"] += 1
        if calls["clock"] == 2:  # the first round's
            raise RuntimeError("clock broke")
        return T0 + timedelta(minutes=30)

    async def main() -> int:
        s = Scheduler(db, "node-a", "123456789012", "eu-central-1", clock=clock)
        fired = asyncio.Event()
        s.on_fired = fired.set
        await s.start()
        try:
            await asyncio.wait_for(fired.wait(), 30)
        finally:
            await s.close()
        return len(queued(db))

    assert asyncio.run(main()) == 1


def test_the_loop_fires_rate_one_second_each_second(db: Engine) -> None:
    store_at(db, datetime.now(UTC)).create("fn", {"name": "fast", "expression": "rate(1 second)"})

    async def main() -> list[dict[str, Any]]:
        s = Scheduler(db, "node-a", "123456789012", "eu-central-1")
        rounds: list[int] = []
        enough = asyncio.Event()

        def on_fired() -> None:
            rounds.append(1)
            if len(rounds) >= 3:
                enough.set()

        s.on_fired = on_fired
        await s.start()
        try:
            await asyncio.wait_for(enough.wait(), 60)
        finally:
            await s.close()
        return queued(db)

    fired = asyncio.run(main())
    times = [datetime.fromisoformat(e["payload"]["time"].replace("Z", "+00:00")) for e in fired]
    assert len(times) >= 3 and len(set(times)) == len(times)
    assert all(later > earlier for earlier, later in itertools.pairwise(times))


def test_a_node_that_read_a_slot_another_node_fired_meanwhile_fires_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/impuls.db"
    engine_a, engine_b = open_engine(url), open_engine(url)
    add_function(engine_a, "fn")
    store_at(engine_a, T0).create("fn", {"name": "x", "expression": "cron(* * * * ? *)"})
    node_a, node_b = scheduler(engine_a, "node-a"), scheduler(engine_b, "node-b")
    now = T0 + timedelta(minutes=1)
    real_fire = node_a._fire

    def b_first(row: Any, at: datetime) -> int:  # node-a has read the row; node-b fires first
        assert node_b.fire_due(now) == 1
        return real_fire(row, at)

    node_a._fire = b_first  # type: ignore[method-assign]
    assert node_a.fire_due(now) == 0
    assert len(queued(engine_a)) == 1
    engine_a.dispose()
    engine_b.dispose()


# --- against a brute-force reading of the rules ---------------------------------------------


def brute_force(minutes: set[int], hours: set[int], days: set[int] | None, weekdays: set[int] | None,
                tz: ZoneInfo, lo: datetime, hi: datetime) -> list[datetime]:
    """Every wall minute around [lo, hi] that matches, fired as the rules say: its first
    occurrence, or the first instant after the gap it falls in; those in (lo, hi]."""
    found = set()
    wall = lo.astimezone(tz).replace(tzinfo=None, second=0, microsecond=0) - timedelta(days=2)
    end = hi.astimezone(tz).replace(tzinfo=None) + timedelta(days=2)
    while wall <= end:
        day_ok = (wall.day in days) if days is not None else ((wall.isoweekday() % 7) in (weekdays or set()))
        if wall.minute in minutes and wall.hour in hours and day_ok:
            instant = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
            if instant.astimezone(tz).replace(tzinfo=None) != wall:  # skipped: the gap's end
                instant = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
                while instant.astimezone(tz).replace(tzinfo=None) <= wall:
                    instant += timedelta(minutes=1)
                instant = instant.replace(second=0)
            if lo < instant <= hi:
                found.add(instant)
        wall += timedelta(minutes=1)
    return sorted(found)


@pytest.mark.parametrize("zone, around", [
    ("Europe/Berlin", utc(2024, 3, 31)), ("Europe/Berlin", utc(2024, 10, 27)),
    ("America/New_York", utc(2024, 3, 10, 6)), ("America/New_York", utc(2024, 11, 3, 5)),
    ("Australia/Lord_Howe", utc(2024, 4, 6, 14)), ("Australia/Lord_Howe", utc(2024, 10, 5, 15)),  # 30 min
    ("Pacific/Apia", utc(2011, 12, 29, 12)), ("UTC", utc(2024, 2, 28)),
])
def test_slots_match_a_brute_force_reading(zone: str, around: datetime) -> None:
    import random

    rng = random.Random(f"{zone}{around}")
    names = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
    compared = 0
    for _ in range(8):
        minutes = set(rng.sample(range(60), rng.choice([1, 2, 4, 15])))
        hours = set(rng.sample(range(24), rng.choice([1, 3, 12, 24])))
        lo, hi = around - timedelta(days=1, minutes=rng.randrange(60)), around + timedelta(days=2)
        if rng.random() < 0.5:
            days: set[int] | None = set(rng.sample(range(1, 32), rng.choice([5, 20, 31])))
            weekdays = None
            dom, dow = ",".join(map(str, sorted(days))), "?"
        else:
            days, weekdays = None, set(rng.sample(range(7), rng.choice([2, 5, 7])))
            dom, dow = "?", ",".join(names[w] for w in sorted(weekdays))
        expression = (f"cron({','.join(map(str, sorted(minutes)))} {','.join(map(str, sorted(hours)))} "
                      f"{dom} * {dow} *)")
        expected = brute_force(minutes, hours, days, weekdays, ZoneInfo(zone), lo, hi)
        assert slots_between(expression, lo, hi, zone) == expected, expression
        compared += len(expected)
    assert compared > 8
