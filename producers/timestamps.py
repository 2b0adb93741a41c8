"""Timestamps of replayed logs: unix time in seconds, milliseconds, microseconds or
nanoseconds (told apart by size), or ISO 8601 text *with* a time zone.

A number is read by its magnitude, the way every log of this century can be told apart:
below 1e11 it is seconds (up to the year 5138), below 1e14 milliseconds, below 1e17
microseconds, else nanoseconds. A millisecond stamp of 2000 or later is above 9.4e11 and
a second stamp below 1e11, so the two never meet for real data; a value that fits none
(say 1970 in seconds) still reads, and the reader's range check (2000 or later) then
skips it as ``ts_before_2000``.

Text without a zone (``2024-01-01 10:00:00``) is refused with :class:`NaiveTimestamp`
unless ``assume_utc`` is set: a guessed zone would shift every event silently.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

_UNITS = ((1e11, 1.0, "unix s"), (1e14, 1e3, "unix ms"), (1e17, 1e6, "unix us"))
_ZONE_WORDS = (" UTC", " GMT", "UTC", "GMT")


class NaiveTimestamp(ValueError):
    """A date and time without a time zone (and ``assume_utc`` not given)."""


def parse_ts(raw: str | float, assume_utc: bool = False) -> tuple[float, str]:
    """Unix seconds and the form they were read from (``unix s``, ``unix ms``,
    ``unix us``, ``unix ns`` or ``iso``). Raises :class:`NaiveTimestamp` for a time
    without a zone (unless ``assume_utc``), ``ValueError`` for anything unreadable.

    >>> parse_ts("1511658000")
    (1511658000.0, 'unix s')
    >>> parse_ts(1704067200123)
    (1704067200.123, 'unix ms')
    >>> parse_ts(" 2019-10-01 00:00:00 UTC ")
    (1569888000.0, 'iso')
    >>> parse_ts("2024-01-01T02:00:00+02:00")
    (1704067200.0, 'iso')
    >>> parse_ts("2024-01-01 00:00:00")
    Traceback (most recent call last):
    ...
    tailstream.producers.timestamps.NaiveTimestamp: no time zone in '2024-01-01 00:00:00'
    >>> parse_ts("2024-01-01 00:00:00", assume_utc=True)
    (1704067200.0, 'iso')
    """
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"not a timestamp: {type(raw).__name__}")
    if isinstance(raw, int | float):
        try:
            return _number(float(raw))
        except OverflowError:  # a 400-digit JSON integer
            raise ValueError("not a timestamp: out of range") from None
    text = raw.strip()
    try:
        number = float(text)
    except ValueError:
        return _iso(text, assume_utc), "iso"
    return _number(number)


def _number(value: float) -> tuple[float, str]:
    if not math.isfinite(value):
        raise ValueError(f"not a finite timestamp: {value!r}")
    for bound, per_second, form in _UNITS:
        if abs(value) < bound:
            return value / per_second, form
    return value / 1e9, "unix ns"


def _iso(text: str, assume_utc: bool) -> float:
    for word in _ZONE_WORDS:
        if text.endswith(word):
            text = text[: -len(word)].rstrip() + "+00:00"
            break
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a timestamp: {text[:40]!r}") from None
    if when.tzinfo is None:
        if not assume_utc:
            raise NaiveTimestamp(f"no time zone in {text[:40]!r}")
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
