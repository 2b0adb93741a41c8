"""Replaying real event logs: Taobao UserBehavior, REES46, any CSV by a column mapping, or
JSON lines in the event contract's shape — the same for ``tailstream eval``,
``tailstream produce replay`` and ``tailstream demo --replay`` (docs/events.md, "Replaying
logs").

Logs are read in file order, which must be time order (the Taobao file and REES46
exports are; sort others first, e.g. ``sort -t, -k5 -n``): a reader counts the events
that go back in time by more than a tolerance and the summary warns about them. Event ids
not in the log are derived from the file name and line number, so replaying the same file
twice is de-duplicated by the workers rather than counted twice.

Mappings to tailstream's kinds (``--kinds RAW=KIND`` adds to or overrides them):

* Taobao ``behavior_type``: pv → click, cart → cart, fav → fav, buy → purchase.
* REES46 ``event_type``: view → click, cart → cart, purchase → purchase;
  ``remove_from_cart`` is skipped (counted in ``LogReader.stats.skipped``).
* CSV (header row): ``columns`` (``--map``) maps contract fields to columns, ``kind_map``
  (``--kinds``) raw kinds to kinds; raw values that already name a kind are kept.
* JSON lines: one object per line in the contract's shape plus ``kind``.

The readers themselves are in :mod:`tailstream.producers.readers`, their counts and the
printed summary in :mod:`tailstream.producers.logstats`, timestamps in
:mod:`tailstream.producers.timestamps`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tailstream.contract import Limits
from tailstream.producers.logstats import LogError, NothingUsable, ReplayStats
from tailstream.producers.readers import (
    FORMATS,
    MAP_KEYS,
    REES46_KINDS,
    TAOBAO_KINDS,
    LogReader,
    OnEnd,
    check_mapping,
)
from tailstream.producers.records import ProducedRecord

__all__ = ["FORMATS", "MAP_KEYS", "REES46_KINDS", "TAOBAO_KINDS", "LogError", "LogReader",
           "LogSpec", "NothingUsable", "ReplayStats", "pace", "parse_pairs", "read_log"]

PREFLIGHT_ROWS = 2000
"""Rows :meth:`LogSpec.check` reads before a command starts anything."""


@dataclass(frozen=True)
class LogSpec:
    """A log file and how to read it: what the CLI's ``--format``, ``--map``, ``--kinds``
    and ``--assume-utc`` say, for ``eval``, ``produce replay`` and ``demo --replay`` alike.

    ``on_end`` is called with each reader at the end of its file (the CLI prints the
    summary there); ``limits`` are the contract's bounds every replayed event must meet
    (default: the defaults, with no bound on future times).
    """

    path: Path
    fmt: str = "taobao"
    columns: Mapping[str, str] | None = None
    kind_map: Mapping[str, str] | None = None
    assume_utc: bool = False
    limits: Limits | None = field(default=None, compare=False)
    tolerance_s: float = 60.0
    on_end: OnEnd | None = field(default=None, compare=False, repr=False)
    readers: list[LogReader] = field(default_factory=list, compare=False, repr=False)
    """Every reader :meth:`reader` made, for :meth:`finish`."""

    def __post_init__(self) -> None:
        check_mapping(self.fmt, self.columns, self.kind_map)

    def reader(self, emit_items: bool = True) -> LogReader:
        """A fresh reader (its ``stats`` fill as its records are consumed)."""
        reader = LogReader(self.path, self.fmt, columns=self.columns, kind_map=self.kind_map,
                           emit_items=emit_items, assume_utc=self.assume_utc,
                           limits=self.limits, tolerance_s=self.tolerance_s,
                           on_end=self.on_end)
        self.readers.append(reader)
        return reader

    def finish(self) -> None:
        """End the readers that were left before the end of their file (a command that
        stops after ``--events``/``--max-events``/``--seconds``): ``on_end`` now, with
        ``stats.complete`` False, rather than whenever the garbage collector closes them."""
        for reader in self.readers:
            if reader.started:
                reader.finish(complete=False)

    @property
    def name(self) -> str:
        return f"{self.path.name} ({self.fmt})"

    def check(self, rows: int = PREFLIGHT_ROWS) -> ReplayStats:
        """Read the first ``rows`` rows, so a command fails before it starts anything:
        raises :class:`LogError` for a mapping that does not fit the header or a time
        without a zone, and :class:`NothingUsable` (after ``on_end``) for a file that ends
        within those rows without a usable event."""
        reader = LogReader(self.path, self.fmt, columns=self.columns, kind_map=self.kind_map,
                           assume_utc=self.assume_utc, limits=self.limits,
                           tolerance_s=self.tolerance_s, require_events=False)
        for _ in reader:
            if reader.stats.rows >= rows:
                return reader.stats  # the reader is closed without a word (no on_end)
        if not reader.stats.total_events:
            if self.on_end is not None:
                self.on_end(reader)
            raise reader.nothing_usable()
        return reader.stats


def parse_pairs(text: str | Iterable[str] | None, flag: str) -> dict[str, str]:
    """``KEY=VALUE,KEY=VALUE`` (or several such strings, one per flag given) as a dict.

    >>> parse_pairs("user_id=uid, item_id = sku", "--map")
    {'user_id': 'uid', 'item_id': 'sku'}
    >>> parse_pairs(["view=click", "buy=purchase"], "--kinds")
    {'view': 'click', 'buy': 'purchase'}
    >>> parse_pairs("user_id", "--map")
    Traceback (most recent call last):
    ...
    tailstream.producers.logstats.LogError: --map wants KEY=VALUE pairs, got 'user_id'
    """
    if text is None:
        return {}
    parts = [text] if isinstance(text, str) else list(text)
    out: dict[str, str] = {}
    for chunk in parts:
        for pair in chunk.split(","):
            if not pair.strip():
                continue
            key, eq, value = pair.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise LogError(f"{flag} wants KEY=VALUE pairs, got {pair.strip()!r}")
            out[key.strip()] = value.strip()
    return out


def read_log(path: str | Path, fmt: str, *, columns: Mapping[str, str] | None = None,
             kind_map: Mapping[str, str] | None = None, emit_items: bool = True,
             assume_utc: bool = False) -> Iterator[ProducedRecord]:
    """Records of a log file in file order (see :class:`LogReader` for the counts)."""
    return iter(LogReader(path, fmt, columns=columns, kind_map=kind_map,
                          emit_items=emit_items, assume_utc=assume_utc))


def pace(records: Iterable[ProducedRecord], speed: float | None) -> Iterator[ProducedRecord]:
    """Release records so event time runs ``speed`` times faster than wall time.

    ``None`` or 0: as fast as possible. Sleeps in chunks of at least 5 ms, not per record.
    """
    if speed is not None and speed < 0:
        raise ValueError("speed must be positive (or None/0 for as fast as possible)")
    if not speed:
        yield from records
        return
    start_wall: float | None = None
    start_ts: float | None = None
    for rec in records:
        if rec.ts is not None:
            if start_ts is None:
                start_wall, start_ts = time.monotonic(), rec.ts
            else:
                assert start_wall is not None
                due = start_wall + (rec.ts - start_ts) / speed
                ahead = due - time.monotonic()
                if ahead > 0.005:
                    time.sleep(ahead)
        yield rec
