"""Schedule expressions and their slots: pure functions, no I/O.

Three forms, as EventBridge Scheduler and cron write them:

- ``rate(N unit)``: every N ``minute(s)``, ``hour(s)``, ``day(s)`` or (an Impuls extension)
  ``second(s)``.  Slots count from the schedule's start (its creation, to the second) in
  UTC: ``start + k * period`` for k = 1, 2, ...; the time zone plays no part.
- ``cron(minutes hours day-of-month month day-of-week year)``: EventBridge's six fields.
  One of day-of-month and day-of-week must be ``?``.  ``*``, lists ``a,b``, ranges
  ``a-b``, steps ``a/n``, ``*/n``, ``a-b/n``; months ``JAN``-``DEC``; days of the week
  ``1``-``7`` = ``SUN``-``SAT``; years 1970-2199.  Day-of-month also takes ``L`` (the last
  day), ``L-n`` (n days before it), ``LW`` (the last weekday) and ``nW`` (the weekday
  nearest to day n, within the month); day-of-week takes ``L`` (alone: the last day of
  the week, every Saturday), ``nL`` (the last day n of the month) and ``n#k`` (the k-th
  day n of the month).
- ``minute hour day-of-month month day-of-week``: the common five-field cron (day of week
  ``0``-``7``, Sunday is 0 or 7; when both day fields are restricted a day matching either
  counts, as in Vixie cron), and ``@hourly``, ``@daily``, ``@midnight``, ``@weekly``,
  ``@monthly``, ``@yearly``, ``@annually``.

Cron expressions name wall-clock times in the schedule's IANA time zone.  A wall time that
does not exist (the hour skipped when clocks spring forward) is fired once, at the first
instant after the gap (``03:00`` for a ``02:30`` job in Europe/Berlin); a wall time that
happens twice (the hour repeated when clocks fall back) is fired once, at its first
occurrence.  Slots are aware UTC datetimes.
"""

from __future__ import annotations

import bisect
import calendar
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from impuls.errors import InvalidInput

__all__ = ["Cron", "Rate", "Timetable", "newest_slot", "next_slot", "parse", "parse_timezone", "validate"]

#: the longest expression and time zone name accepted
MAX_EXPRESSION = 256
MAX_TIMEZONE = 64
#: the longest rate period: 100 years
MAX_PERIOD = timedelta(days=36500)
#: how far (in years) a cron search looks ahead when the year is ``*``: the Gregorian calendar
#: repeats every 400 years, so a day rule that matches nothing in that span never matches
HORIZON_YEARS = 400
#: the latest year a search goes to (datetime ends at 9999)
LAST_YEAR = 9000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"rate\(\s*(?P<value>\S+)\s+(?P<unit>[A-Za-z]+)\s*\)", re.IGNORECASE)
_CRON = re.compile(r"cron\((?P<body>.*)\)", re.IGNORECASE | re.DOTALL)
_MONTHS = {name: i for i, name in enumerate(
    ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"], start=1)}
_DAYS6 = {"SUN": 1, "MON": 2, "TUE": 3, "WED": 4, "THU": 5, "FRI": 6, "SAT": 7}
_DAYS5 = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}
_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_SIX_FIELDS = "cron(minutes hours day-of-month month day-of-week year)"
_FIVE_FIELDS = "minute hour day-of-month month day-of-week"


def _bad(problem: str) -> InvalidInput:
    return InvalidInput(f"expression: {problem}")


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise ValueError("schedule times must be timezone-aware")
    return ts.astimezone(UTC)


# --- rate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """``rate(N unit)``: every ``period`` from ``start`` (UTC, whole seconds)."""

    text: str
    period: timedelta
    start: datetime

    def next_after(self, after: datetime) -> datetime:
        if after < self.start:
            return self.start + self.period
        return self.start + (((after - self.start) // self.period) + 1) * self.period

    def newest_in(self, lo: datetime, hi: datetime) -> datetime | None:
        if hi < self.start + self.period:
            return None
        newest = self.start + ((hi - self.start) // self.period) * self.period
        return newest if newest >= lo else None


def _parse_rate(text: str, match: re.Match[str], start: datetime) -> Rate:
    value, unit = match["value"], match["unit"].lower()
    if not value.isdigit() or int(value) < 1:
        raise _bad(f"{text}: the value must be a whole number of 1 or more, not {value!r}")
    n = int(value)
    base = unit[:-1] if unit.endswith("s") else unit
    if base not in _UNITS:
        raise _bad(f"{text}: the unit must be one of second(s), minute(s), hour(s), day(s), not {unit!r}")
    if n * _UNITS[base] > MAX_PERIOD.total_seconds():
        raise _bad(f"{text}: the period is longer than {MAX_PERIOD.days} days")
    return Rate(text, timedelta(seconds=n * _UNITS[base]), _utc(start).replace(microsecond=0))


# --- cron fields -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str
    lo: int
    hi: int
    names: dict[str, int] | None = None

    def value(self, token: str, whole: str) -> int:
        word = token.upper()
        if self.names and word in self.names:
            return self.names[word]
        if not token.isdigit():
            hint = f" or a name ({'-'.join(list(self.names)[::len(self.names) - 1])})" if self.names else ""
            raise _bad(f"{self.name} field {whole!r}: {token!r} is not a number{hint}")
        number = int(token)
        if not self.lo <= number <= self.hi:
            raise _bad(f"{self.name} field {whole!r}: {number} is out of range {self.lo}-{self.hi}")
        return number

    def parse(self, text: str) -> set[int]:
        """The values of a list of ``*``, ``a``, ``a-b``, each optionally ``/step``."""
        values: set[int] = set()
        for item in text.split(","):
            if not item:
                raise _bad(f"{self.name} field {text!r}: an empty item in the list")
            body, slash, step_text = item.partition("/")
            step = 1
            if slash:
                if not step_text.isdigit() or int(step_text) < 1:
                    raise _bad(f"{self.name} field {text!r}: the step after '/' must be a whole number "
                               f"of 1 or more, not {step_text!r}")
                step = int(step_text)
            if body == "*":
                first, last = self.lo, self.hi
            elif "-" in body:
                a, _, b = body.partition("-")
                first, last = self.value(a, text), self.value(b, text)
                if first > last:
                    raise _bad(f"{self.name} field {text!r}: the range {body} goes backwards "
                               "(ranges that wrap around are not supported; split it in two)")
            else:
                first = self.value(body, text)
                last = self.hi if slash else first
            values.update(range(first, last + 1, step))
        return values


_MINUTE = _Field("minutes", 0, 59)
_HOUR = _Field("hours", 0, 23)
_DOM = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTHS)
_DOW6 = _Field("day-of-week", 1, 7, _DAYS6)
_DOW5 = _Field("day-of-week", 0, 7, _DAYS5)
_YEAR = _Field("year", 1970, 2199)


def _special(text: str, names: dict[str, int]) -> bool:
    """Whether a field uses ?, L, W or # (outside the names of days)."""
    return any(c in token for token in re.split(r"[,/-]", text.upper()) if token not in names
               for c in "?LW#")


#: a rule for the days of one month: (year, month) -> the matching days
DayRule = Callable[[int, int], set[int]]


def _weekday_near(year: int, month: int, day: int) -> set[int]:
    """Quartz's ``nW``: the weekday nearest to ``day``, not leaving the month."""
    first_weekday, days = calendar.monthrange(year, month)
    if day > days:
        return set()
    weekday = (first_weekday + day - 1) % 7  # Monday 0
    if weekday == 5:  # Saturday: Friday, or Monday when the 1st is a Saturday
        return {day + 2 if day == 1 else day - 1}
    if weekday == 6:  # Sunday: Monday, or Friday when it is the last day
        return {day - 2 if day == days else day + 1}
    return {day}


def _dom_rule(text: str) -> DayRule:
    """EventBridge's day-of-month: a list, ``L``, ``L-n``, ``LW`` or ``nW``."""
    upper = text.upper()
    if upper == "L":
        return lambda y, m: {calendar.monthrange(y, m)[1]}
    if upper == "LW":
        def last_weekday(y: int, m: int) -> set[int]:
            first_weekday, days = calendar.monthrange(y, m)
            last = (first_weekday + days - 1) % 7
            return {days - max(0, last - 4)}
        return last_weekday
    if upper.startswith("L-"):
        offset = upper[2:]
        if not offset.isdigit() or int(offset) > 30:
            raise _bad(f"day-of-month field {text!r}: L-n takes n from 0 to 30")
        n = int(offset)

        def before_last(y: int, m: int) -> set[int]:
            day = calendar.monthrange(y, m)[1] - n
            return {day} if day >= 1 else set()
        return before_last
    if upper.endswith("W"):
        day = _DOM.value(upper[:-1], text) if upper[:-1] else 0
        if not day:
            raise _bad(f"day-of-month field {text!r}: W needs a day before it, as in 15W or LW")
        return lambda y, m: _weekday_near(y, m, day)
    if "L" in upper or "W" in upper:
        raise _bad(f"day-of-month field {text!r}: L and W stand alone (L, L-3, LW, 15W), "
                   "not in lists or ranges")
    days = _DOM.parse(text)
    return lambda y, m: {d for d in days if d <= calendar.monthrange(y, m)[1]}


def _dow_rule(text: str, six: bool) -> DayRule:
    """Day-of-week as a rule for a month's days: a list, and in six fields ``L``, ``nL``, ``n#k``."""
    spec = _DOW6 if six else _DOW5
    upper = text.upper()

    def weekday(value: int) -> int:  # Python's: Monday 0 ... Sunday 6
        return (value - 2) % 7 if six else (value - 1) % 7

    if not six and _special(text, _DAYS5):
        raise _bad(f"day-of-week field {text!r}: ?, L, W and # need the six-field cron(...) form")
    if six and "#" in upper:
        day_text, _, nth_text = upper.partition("#")
        if "," in upper or "-" in day_text or "/" in upper:
            raise _bad(f"day-of-week field {text!r}: # stands alone (as in 6#3 or FRI#3), not in lists")
        wanted = weekday(spec.value(day_text, text))
        if not nth_text.isdigit() or not 1 <= int(nth_text) <= 5:
            raise _bad(f"day-of-week field {text!r}: the number after # must be 1 to 5")
        nth = int(nth_text)

        def nth_weekday(y: int, m: int) -> set[int]:
            first_weekday, days = calendar.monthrange(y, m)
            day = 1 + (wanted - first_weekday) % 7 + 7 * (nth - 1)
            return {day} if day <= days else set()
        return nth_weekday
    if six and upper == "L":  # alone: the last day of every week, Saturday (as in Quartz)
        upper = "7"
    if six and "L" in upper:
        if upper.endswith("L") and not any(c in upper for c in ",-/"):
            wanted = weekday(spec.value(upper[:-1], text))
        else:
            raise _bad(f"day-of-week field {text!r}: L stands alone (as in L, 6L or FRIL), not in lists")

        def last_weekday(y: int, m: int) -> set[int]:
            first_weekday, days = calendar.monthrange(y, m)
            last = (first_weekday + days - 1) % 7
            return {days - (last - wanted) % 7}
        return last_weekday
    weekdays = {weekday(v) for v in spec.parse(upper)}

    def listed(y: int, m: int) -> set[int]:
        first_weekday, days = calendar.monthrange(y, m)
        return {d for d in range(1, days + 1) if (first_weekday + d - 1) % 7 in weekdays}
    return listed


# --- cron ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Cron:
    """A cron expression (six-field or five-field) in a time zone."""

    text: str
    tz: ZoneInfo
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: frozenset[int]
    years: frozenset[int] | None  # None: every year
    days: DayRule
    #: the matching times of a day, as minutes since midnight, in order
    _times: list[int] = field(init=False, repr=False)
    #: (year, month) -> the matching days, in order
    _day_cache: dict[tuple[int, int], list[int]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_times", [h * 60 + m for h in self.hours for m in self.minutes])

    def _month_days(self, year: int, month: int) -> list[int]:
        cache = self._day_cache
        days = cache.get((year, month))
        if days is None:  # (threads may share a Cron: never read back what another may clear)
            if len(cache) > 4096:
                cache.clear()
            days = cache[(year, month)] = sorted(self.days(year, month))
        return days

    def walls_from(self, start: datetime) -> Iterator[datetime]:
        """The matching wall-clock times (naive, whole minutes) at or after ``start``, in order."""
        times = self._times
        last_year = min(LAST_YEAR, max(self.years) if self.years else start.year + HORIZON_YEARS)
        year, month = start.year, start.month
        first = start.date()
        from_minute = start.hour * 60 + start.minute + (1 if start.second or start.microsecond else 0)
        while year <= last_year:
            if self.years is not None and year not in self.years:
                year, month = year + 1, 1
                continue
            if month in self.months:
                for day in self._month_days(year, month):
                    current = date(year, month, day)
                    if current < first:
                        continue
                    begin = bisect.bisect_left(times, from_minute) if current == first else 0
                    for minute_of_day in times[begin:]:
                        yield datetime(year, month, day, minute_of_day // 60, minute_of_day % 60)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)

    def resolve(self, wall: datetime) -> datetime:
        """The instant (UTC) a wall time fires: its first occurrence, or the end of the gap
        it falls in."""
        utc = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        if utc.astimezone(self.tz).replace(tzinfo=None) == wall:
            return utc
        # skipped: fold=1 reads it with the offset after the change (an instant before the
        # gap), fold=0 with the one before (after it); the change is in between, to the second
        lo = wall.replace(tzinfo=self.tz, fold=1).astimezone(UTC)
        lo_s, hi_s = int(lo.timestamp()), int(utc.timestamp())
        while lo_s < hi_s:
            mid = (lo_s + hi_s) // 2
            if datetime.fromtimestamp(mid, self.tz).replace(tzinfo=None) > wall:
                hi_s = mid
            else:
                lo_s = mid + 1
        return datetime.fromtimestamp(hi_s, UTC)

    def next_after(self, after: datetime) -> datetime | None:
        # resolve() never decreases as the wall time grows, and a wall time at or before
        # after's own wall time resolves to after or earlier: so start just past it
        local = after.astimezone(self.tz).replace(tzinfo=None, second=0, microsecond=0)
        for wall in self.walls_from(local + timedelta(minutes=1)):
            instant = self.resolve(wall)
            if instant > after:
                return instant
        return None

    def newest_in(self, lo: datetime, hi: datetime) -> datetime | None:
        """The newest slot in [lo, hi]: look back over doubling windows, then step forward."""
        window = timedelta(minutes=1)
        floor = lo - timedelta(microseconds=1)
        while True:
            begin = max(hi - window, floor)
            found = self.next_after(begin)
            if found is not None and found <= hi:
                while (following := self.next_after(found)) is not None and following <= hi:
                    found = following
                return found
            if begin == floor:
                return None
            window *= 2


def _parse_cron(text: str, body: str, tz: ZoneInfo, six: bool) -> Cron:
    fields = body.split()
    if six:
        if len(fields) == 5:
            raise _bad(f"{text}: cron(...) takes six fields, {_SIX_FIELDS}; for the five-field form "
                       f"({_FIVE_FIELDS}) write it without cron(...)")
        if len(fields) != 6:
            raise _bad(f"{text}: cron(...) takes six fields, {_SIX_FIELDS}; this has {len(fields)}")
        minute, hour, dom, month, dow, year = fields
        if (dom == "?") == (dow == "?"):
            raise _bad(f"{text}: exactly one of day-of-month and day-of-week must be '?' "
                       "(as in cron(0 12 * * ? *) or cron(0 12 ? * MON-FRI *))")
        days = _dow_rule(dow, True) if dom == "?" else _dom_rule(dom)
        years = None if year == "*" else frozenset(_YEAR.parse(year))
    else:
        if len(fields) != 5:
            raise _bad(f"{text}: use rate(N unit), {_SIX_FIELDS} or five fields ({_FIVE_FIELDS})")
        minute, hour, dom, month, dow = fields
        if _special(dom, {}):
            raise _bad(f"day-of-month field {dom!r}: ?, L, W and # need the six-field cron(...) form")
        dom_days, dow_days = _dom_rule(dom), _dow_rule(dow, False)
        if dom.startswith("*") or dow.startswith("*"):  # Vixie cron: both must match
            def days(y: int, m: int) -> set[int]:
                return dom_days(y, m) & dow_days(y, m)
        else:  # both restricted: either matches
            def days(y: int, m: int) -> set[int]:
                return dom_days(y, m) | dow_days(y, m)
        years = None
    cron = Cron(text, tz, tuple(sorted(_MINUTE.parse(minute))), tuple(sorted(_HOUR.parse(hour))),
                frozenset(_MONTH.parse(month)), years, days)
    if next(cron.walls_from(datetime(1970, 1, 1)), None) is None:
        raise _bad(f"{text}: no date ever matches (check the day, month and year fields)")
    return cron


# --- the API ---------------------------------------------------------------------------

#: a parsed expression in its time zone: what :func:`next_slot` reads
Timetable = Rate | Cron


def parse_timezone(name: object) -> ZoneInfo:
    """An IANA time zone (``Europe/Berlin``, ``UTC``), or InvalidInput naming ``timezone``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("timezone: an IANA time zone name such as 'UTC' or 'Europe/Berlin'")
    if len(name) > MAX_TIMEZONE:
        raise InvalidInput(f"timezone: at most {MAX_TIMEZONE} characters")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"timezone: {name!r} is not an IANA time zone name "
                           "(such as 'UTC', 'Europe/Berlin', 'America/New_York')") from None


def parse(expression: object, timezone: object = "UTC", start: datetime = EPOCH) -> Timetable:
    """The timetable of ``expression`` in ``timezone``; a rate counts from ``start``.

    InvalidInput names the field (``expression:`` or ``timezone:``) and the problem."""
    tz = parse_timezone(timezone)
    if not isinstance(expression, str) or not expression.strip():
        raise _bad("a schedule expression such as rate(5 minutes), cron(0 12 * * ? *) or */5 * * * *")
    if len(expression) > MAX_EXPRESSION:
        raise _bad(f"at most {MAX_EXPRESSION} characters")
    text = expression.strip()
    # only a rate reads its start: every cron of the same text and zone is one cache entry
    return _parse_cached(text, tz, _utc(start) if text[:4].lower() == "rate" else EPOCH)


@lru_cache(maxsize=1024)
def _parse_cached(text: str, tz: ZoneInfo, start: datetime) -> Timetable:
    lower = text.lower()
    if lower.startswith("rate"):
        match = _RATE.fullmatch(text)
        if match is None:
            raise _bad(f"{text}: write rate(N unit), as in rate(5 minutes) or rate(1 hour)")
        return _parse_rate(text, match, start)
    if lower.startswith("cron"):
        cron_match = _CRON.fullmatch(text)
        if cron_match is None:
            raise _bad(f"{text}: write {_SIX_FIELDS}, as in cron(0 12 * * ? *)")
        return _parse_cron(text, cron_match["body"], tz, six=True)
    if lower.startswith("at("):
        raise _bad(f"{text}: one-time at(...) schedules are not supported; use rate(...) or cron(...)")
    if text.startswith("@"):
        if lower not in _MACROS:
            raise _bad(f"{text}: not one of {', '.join(sorted(_MACROS))}")
        return _parse_cron(text, _MACROS[lower], tz, six=False)
    return _parse_cron(text, text, tz, six=False)


def validate(expression: object, timezone: object = "UTC") -> None:
    """InvalidInput unless ``expression`` and ``timezone`` are valid."""
    parse(expression, timezone)


def next_slot(schedule: Timetable, after: datetime) -> datetime | None:
    """The first slot strictly after ``after`` (aware), as an aware UTC datetime; None when the
    expression has no slot left (its years are over)."""
    return schedule.next_after(_utc(after))


def newest_slot(schedule: Timetable, lo: datetime, hi: datetime) -> datetime | None:
    """The newest slot in [lo, hi] (aware datetimes), or None if there is none."""
    return schedule.newest_in(_utc(lo), _utc(hi))
