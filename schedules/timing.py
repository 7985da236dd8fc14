"""When a schedule is due: cron in the schedule's own time zone, intervals, one-offs.

DST follows cronie's rule (implemented by cronsim): a fixed local time that does not exist
(02:30 on a spring-forward night) runs once, at the jump; a fixed local time that occurs twice
(02:30 on a fall-back night) runs once, the first time; expressions with a wildcard hour follow
real time and run in both of the repeated hours.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import islice
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from cronsim import CronSim, CronSimError


class TimingError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    if name not in _zone_names():
        raise TimingError("timezone", f"{name!r} is not an IANA time zone (e.g. Europe/Amsterdam).")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise TimingError("timezone", f"{name!r} is not an IANA time zone.") from None


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


# cronsim gives up when 50 years pass without a match: a valid expression may never match
# (`1 1 */100 * MON#4`: the 1st of a month that is its fourth Monday).
NEVER_MATCHES = (
    "never matches: no occurrence in the next 50 years (day of month and day of week must "
    "both match when either starts with '*')."
)
# More steps than minutes in a repeated hour (see next_cron); reached only by a bug.
_MAX_STEPS = 1000


def validate_cron(expression: str) -> None:
    if len(expression.split()) != 5:
        raise TimingError("cron", "needs exactly 5 fields: minute hour day month weekday.")
    try:
        CronSim(expression, datetime.now(UTC))
    except CronSimError as exc:
        raise TimingError("cron", f"{expression!r} is not valid: {exc}.") from None
    if next_cron(expression, "UTC", after=datetime.now(UTC)) is None:
        raise TimingError("cron", f"{expression!r} {NEVER_MATCHES}")


def explain_cron(expression: str) -> str:
    try:
        return CronSim(expression, datetime.now(UTC)).explain()
    except (CronSimError, ValueError):
        return ""


def next_cron(expression: str, tz_name: str, *, after: datetime) -> datetime | None:
    """The first occurrence strictly after `after` (aware), in UTC; None when there is none
    in the next 50 years or before the end of the calendar.

    Inside a repeated hour (`after` is 02:10, the second time, fold=1) cronsim drops the fold
    and answers the first pass's 02:30, which is before `after`: a schedule would be due again
    at every tick until the hour had passed. So step on to the first answer after it.
    """
    try:
        occurrences = CronSim(expression, after.astimezone(zone(tz_name)))
        for occurrence in islice(occurrences, _MAX_STEPS):
            at = occurrence.astimezone(UTC)
            if at > after:
                return at
    except OverflowError:
        return None  # past the year 9999
    return None  # cronsim gave up (50 years without a match)


def next_interval(*, anchor: datetime, interval_seconds: int, after: datetime) -> datetime:
    """The first point of the grid anchor + k·interval strictly after `after`.

    Keeping the grid (rather than after + interval) stops drift; missed points after downtime
    are skipped, so they coalesce into the one run that is materialised now.
    """
    if anchor > after:
        return anchor
    steps = math.floor((after - anchor).total_seconds() / interval_seconds) + 1
    return anchor + timedelta(seconds=steps * interval_seconds)


def cron_preview(expression: str, tz_name: str, *, after: datetime, count: int = 5) -> dict:
    """What the schedule form shows as you type: the expression in words and its next
    `count` runs in the schedule's zone (ISO 8601 with the offset), or the problem, named
    by field ("cron" or "timezone")."""
    try:
        tz = zone(tz_name or "UTC")
        validate_cron(expression)
    except TimingError as exc:
        return {"ok": False, "field": exc.field, "error": exc.message}
    runs, moment = [], after
    for _ in range(count):
        nxt = next_cron(expression, tz_name or "UTC", after=moment)
        if nxt is None:
            break
        runs.append(nxt.astimezone(tz).isoformat())
        moment = nxt
    return {"ok": True, "description": explain_cron(expression), "next": runs, "timezone": tz.key}


def zone_names() -> list[str]:
    """Every IANA zone name this system accepts, sorted (the schedule form's choices)."""
    return sorted(_zone_names())
