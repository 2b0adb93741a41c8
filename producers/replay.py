"""Replaying real event logs: Taobao UserBehavior, REES46, or any CSV by a column mapping.

Logs are read in file order, which must be time order (the Taobao file and REES46
exports are; sort others first: ``sort -t, -k5 -n``). Event ids are derived from the
file name and line number, so replaying the same file twice is de-duplicated by the
workers rather than counted twice.

Mappings to tailstream's classes:

* Taobao ``behavior_type``: pv → click, cart → cart, fav → fav, buy → purchase.
* REES46 ``event_type``: view → click, cart → cart, purchase → purchase;
  ``remove_from_cart`` is skipped (counted in ``LogReader.stats.skipped``).
* Generic CSV (header row): ``columns`` maps contract fields to CSV columns (``user_id``,
  ``item_id``, ``kind`` and ``ts`` required; ``category``, ``price`` optional),
  ``kind_map`` raw kinds to classes (unmapped values are used as they are). Searches
  cannot be replayed (a log has no result lists); such rows are skipped.

Timestamps: unix seconds, or ISO 8601 / REES46's ``2019-10-01 00:00:00 UTC`` *with* a
zone; a naive time is skipped (``bad_ts``) rather than guessed, since a wrong zone would
silently shift every event. Rows that cannot be mapped are skipped and counted in
:class:`ReplayStats` (``LogReader.stats``), never sent as broken events.

Event ids are ``{format}-{tag}-{line}`` with ``tag`` a hash of the file name: stable
across replays, yet two different files cannot de-duplicate each other's events.

The Taobao log has no item text: with ``emit_items`` the first sighting of an item
produces a catalogue record with a stable textual form (``item 123 in category 456``).
"""

from __future__ import annotations

import csv
import hashlib
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tailstream.contract import EVENT_KINDS, TRANSACTION_CLASSES, Item
from tailstream.producers.records import ProducedRecord, wire_bytes

TAOBAO_KINDS = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "purchase"}
REES46_KINDS = {"view": "click", "cart": "cart", "purchase": "purchase"}
FORMATS = ("taobao", "rees46", "csv")


@dataclass
class ReplayStats:
    """What a :class:`LogReader` read: data rows, events per class, items, skipped rows."""

    rows: int = 0
    events: Counter[str] = field(default_factory=Counter)
    items: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    """Rows not replayed, by reason: the raw kind (``remove_from_cart``), ``unmappable``,
    ``bad_ts`` or ``missing_id``."""


class LogReader:
    """Iterates a log as :class:`ProducedRecord` values; counts what it read and skipped.

    Iterating twice reads the file twice (counts keep adding up). ``stats`` is filled as
    the records are consumed, so read it after the iteration ends.
    """

    def __init__(self, path: str | Path, fmt: str, *, columns: Mapping[str, str] | None = None,
                 kind_map: Mapping[str, str] | None = None, emit_items: bool = True) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
        if fmt == "csv" and not columns:
            raise ValueError("--format csv needs a column mapping (user_id, item_id, kind, ts)")
        self.path = Path(path)
        self.fmt = fmt
        self.columns = dict(columns or {})
        missing = [f for f in ("user_id", "item_id", "kind", "ts") if f not in self.columns]
        if fmt == "csv" and missing:
            raise ValueError(f"column mapping lacks {missing}")
        self.kind_map = dict(kind_map or {})
        self.emit_items = emit_items
        self.stats = ReplayStats()
        self._seen_items: set[str] = set()
        self._tag = hashlib.sha1(self.path.name.encode()).hexdigest()[:6]  # noqa: S324 - an id

    # Shorthands for the counters (kept for callers that read them directly).
    @property
    def rows(self) -> int:
        return self.stats.rows

    @property
    def events(self) -> Counter[str]:
        return self.stats.events

    @property
    def skipped(self) -> Counter[str]:
        return self.stats.skipped

    def __iter__(self) -> Iterator[ProducedRecord]:
        with self.path.open(newline="", encoding="utf-8") as fh:
            if self.fmt == "taobao":
                yield from self._taobao(fh)
            elif self.fmt == "rees46":
                yield from self._rees46(csv.DictReader(fh))
            else:
                yield from self._generic(csv.DictReader(fh))

    def _taobao(self, lines: Iterable[str]) -> Iterator[ProducedRecord]:
        for n, line in enumerate(lines, 1):
            self.stats.rows += 1
            parts = line.rstrip("\r\n").split(",")
            if len(parts) != 5 or parts[3] not in TAOBAO_KINDS:
                self.stats.skipped["unmappable"] += 1
                continue
            user, item, cat, behaviour, ts = parts
            try:
                when = float(ts)
            except ValueError:
                self.stats.skipped["bad_ts"] += 1
                continue
            yield from self._event(n, TAOBAO_KINDS[behaviour], user, item, cat, when,
                                   title=f"item {item} in category {cat}")

    def _rees46(self, rows: Iterable[dict[str, str]]) -> Iterator[ProducedRecord]:
        for n, row in enumerate(rows, 2):
            self.stats.rows += 1
            kind = REES46_KINDS.get(row.get("event_type", ""))
            if kind is None:
                self.stats.skipped[row.get("event_type", "") or "unmappable"] += 1
                continue
            try:
                when = _parse_ts(row["event_time"])
            except (KeyError, ValueError):
                self.stats.skipped["bad_ts"] += 1
                continue
            cat = row.get("category_code") or row.get("category_id") or "unknown"
            brand = row.get("brand") or ""
            title = " ".join(x for x in (brand, cat.replace(".", " ")) if x)
            price = _float(row.get("price"))
            yield from self._event(n, kind, row.get("user_id", ""), row.get("product_id", ""),
                                   cat, when, title=title or f"item {row.get('product_id')}",
                                   brand=brand, price=price)

    def _generic(self, rows: Iterable[dict[str, str]]) -> Iterator[ProducedRecord]:
        col = self.columns
        for n, row in enumerate(rows, 2):
            self.stats.rows += 1
            raw_kind = row.get(col["kind"], "")
            kind = self.kind_map.get(raw_kind, raw_kind)
            if kind not in EVENT_KINDS or kind == "search":
                self.stats.skipped[raw_kind or "unmappable"] += 1
                continue
            try:
                when = _parse_ts(row[col["ts"]])
            except (KeyError, ValueError):
                self.stats.skipped["bad_ts"] += 1
                continue
            cat = row.get(col.get("category", ""), "") or "unknown"
            item = row.get(col["item_id"], "")
            price = _float(row.get(col.get("price", "")))
            yield from self._event(n, kind, row.get(col["user_id"], ""), item, cat, when,
                                   title=f"item {item}", price=price)

    def _event(self, line: int, kind: str, user: str, item: str, cat: str, ts: float, *,
               title: str, brand: str = "", price: float | None = None
               ) -> Iterator[ProducedRecord]:
        if not user or not item:
            self.stats.skipped["missing_id"] += 1
            return
        if self.emit_items and item not in self._seen_items:
            self._seen_items.add(item)
            self.stats.items += 1
            yield ProducedRecord("item", item, wire_bytes(Item(item, title, cat, brand, price)
                                                      .to_dict()), ts=ts)
        value: dict[str, Any] = {"event_id": f"{self.fmt}-{self._tag}-{line}", "user_id": user,
                                 "ts": ts, "item_id": item, "category": cat}
        if price is not None and kind in TRANSACTION_CLASSES:
            value["price"] = price
        self.stats.events[kind] += 1
        yield ProducedRecord(kind, user, wire_bytes(value), ts=ts)


@dataclass(frozen=True)
class LogSpec:
    """A log file and how to read it: what the CLI's ``--format``, ``--map``, ``--kinds``
    and ``--assume-utc`` say, for ``eval``, ``produce replay`` and ``demo --replay`` alike."""

    path: Path
    fmt: str = "taobao"
    columns: Mapping[str, str] | None = None
    kind_map: Mapping[str, str] | None = None
    assume_utc: bool = False

    def reader(self, emit_items: bool = True) -> LogReader:
        """A fresh reader (its ``stats`` fill as its records are consumed)."""
        return LogReader(self.path, self.fmt, columns=self.columns, kind_map=self.kind_map,
                         emit_items=emit_items)

    @property
    def name(self) -> str:
        return f"{self.path.name} ({self.fmt})"


def read_log(path: str | Path, fmt: str, *, columns: Mapping[str, str] | None = None,
             kind_map: Mapping[str, str] | None = None,
             emit_items: bool = True) -> Iterator[ProducedRecord]:
    """Records of a log file in file order (see :class:`LogReader` for the counts)."""
    return iter(LogReader(path, fmt, columns=columns, kind_map=kind_map, emit_items=emit_items))


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


def _parse_ts(raw: str) -> float:
    raw = raw.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    text = raw.replace(" UTC", "+00:00").replace("Z", "+00:00")
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp without a time zone: {raw!r}")
    return dt.timestamp()


def _float(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    # NaN/inf would encode as non-JSON and negative prices are refused: drop the price only.
    return value if math.isfinite(value) and value >= 0 else None
