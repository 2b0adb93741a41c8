"""Readers of event logs as they come: Taobao UserBehavior, REES46, any CSV through a column
mapping, and JSON lines in the event contract's own shape.

Every row becomes at most one event (or one catalogue record), checked against the event
contract before it is yielded, so a replay never sends a broken event; a row that cannot be
mapped is skipped and counted by reason in :class:`~tailstream.producers.logstats.ReplayStats`
(with its line as an example). What cannot be read *as asked* — a mapping that does not
fit the header, a time without a zone — raises :class:`~tailstream.producers.logstats.LogError`
at once, naming the file and line. A log read to its end without a single usable event
raises :class:`~tailstream.producers.logstats.NothingUsable`.

Files may start with a UTF-8 byte order mark and use CRLF line endings; CSV cells are
trimmed of surrounding spaces, may be quoted, and columns beyond the mapped ones are
ignored. The CSV delimiter (``,``, tab, ``;`` or ``|``) is the one the header uses most.

Derived catalogue records (Taobao, REES46 and CSV logs, which carry the item's text on
their event rows): the first event naming an item is preceded by a record for it, with
that event's time stamp (``ProducedRecord.ts``), so the worker has the item's text when
the event arrives. Such a record *describes* the item of the event right after it; it does
not announce the item earlier (``tailstream eval`` treats it so: the item becomes known
with the event). Catalogue records that are in the log itself (``item`` lines and rows)
carry no time stamp and announce their item from where they stand.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import IO, Any

from tailstream import configs
from tailstream.contract import (
    CATALOGUE,
    EVENT_KINDS,
    SEARCH,
    TRANSACTION_CLASSES,
    InvalidEvent,
    Item,
    Limits,
    validate_event,
    validate_item,
)
from tailstream.producers.logstats import LogError, NothingUsable, ReplayStats
from tailstream.producers.records import ProducedRecord, wire_bytes
from tailstream.producers.timestamps import NaiveTimestamp, parse_ts
from tailstream.settings import Settings

FORMATS = ("taobao", "rees46", "csv", "jsonl")
TAOBAO_KINDS = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "purchase"}
REES46_KINDS = {"view": "click", "cart": "cart", "purchase": "purchase"}
REES46_COLUMNS = {"user_id": "user_id", "item_id": "product_id", "kind": "event_type",
                  "ts": "event_time", "category": "category_code", "brand": "brand",
                  "price": "price"}
MAP_KEYS = ("user_id", "item_id", "kind", "ts", "session", "event_id", "query",
            "result_item_ids", "clicked_item_id", "title", "category", "brand", "price",
            "quantity", "source")
"""Contract fields a CSV column can be mapped to (``--map KEY=COLUMN``)."""
REQUIRED_KEYS = ("item_id", "kind", "ts")
"""Mapped always; ``user_id`` too, unless ``session`` stands in for the user; ``kind``
not when ``--kinds`` gives a default (:data:`ANY_KIND`)."""
ANY_KIND = "*"
"""``--kinds '*=KIND'``: the kind of every row whose raw kind maps to none (or that has
no kind column at all): click-only logs (views of sessions, a search log's clicks)."""
DELIMITERS = (",", "\t", ";", "|")
TEXT_HINTS = {
    "csv": "map a title column (--map title=COL) or more text (brand=COL, category=COL)",
    "rees46": "REES46 has no titles: brand and category are all that tell items apart",
    "jsonl": "give the catalogue records distinct titles",
}
_ID_LIST = re.compile(r"[\s|;,]+")

OnEnd = Callable[["LogReader"], None]


class LogReader:
    """Iterates a log as :class:`ProducedRecord` values; ``stats`` fill as they are consumed.

    Iterating twice reads the file twice (counts keep adding up). At the end of the file
    ``on_end`` is called (the CLI prints :meth:`ReplayStats.summary`), then, when no event
    was usable and ``require_events`` is set, :class:`NothingUsable` is raised. A reader
    closed before the end calls ``on_end`` too (``stats.complete`` is then False).
    """

    def __init__(self, path: str | Path, fmt: str, *, columns: Mapping[str, str] | None = None,
                 kind_map: Mapping[str, str] | None = None, emit_items: bool = True,
                 assume_utc: bool = False, limits: Limits | None = None,
                 tolerance_s: float = 60.0, on_end: OnEnd | None = None,
                 require_events: bool = True) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.columns = check_mapping(fmt, columns, kind_map)
        presets = {"taobao": TAOBAO_KINDS, "rees46": REES46_KINDS}
        kinds = {**presets.get(fmt, {}), **(kind_map or {})}
        self.kind_map = {**{k.lower(): v for k, v in kinds.items()}, **kinds}
        self.emit_items = emit_items
        self.assume_utc = assume_utc
        self.limits = limits or configs.limits(Settings(), future_skew=False)
        self.on_end = on_end
        self.require_events = require_events
        self.stats = ReplayStats(tolerance_s=tolerance_s, text_from=_text_from(fmt,
                                                                              self.columns),
                                 text_hint=TEXT_HINTS.get(fmt, ReplayStats.text_hint))
        self._seen_items: set[str] = set()
        self._texts: Counter[int] = Counter()
        self._latest = -math.inf
        self._tag = hashlib.sha1(self.path.name.encode()).hexdigest()[:6]  # noqa: S324 - an id
        self._ended = False
        self.started = False

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

    @property
    def name(self) -> str:
        return f"{self.path.name} ({self.fmt})"

    def summary(self) -> str:
        return self.stats.summary(self.name)

    def __iter__(self) -> Iterator[ProducedRecord]:
        self._ended, self.started = False, True
        try:
            yield from self._read()
        except GeneratorExit:
            self.finish(complete=False)
            raise
        self.finish(complete=True)

    def finish(self, complete: bool) -> None:
        """End of reading (``complete``: the whole file): call ``on_end`` once, then raise
        :class:`NothingUsable` for a complete file without a usable event."""
        if self._ended:
            return
        self._ended = True
        self.stats.complete = complete
        self.stats.shared_text = sum(n for n in self._texts.values() if n > 1)
        if self.on_end is not None:
            self.on_end(self)
        if complete and self.require_events and not self.stats.total_events:
            raise self.nothing_usable()

    def nothing_usable(self) -> NothingUsable:
        """The error for a file that gave no usable event."""
        guess = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".tsv": "csv"}.get(
            self.path.suffix.lower(), "csv" if self.path.suffix.lower() == ".csv" else "")
        hint = (f" (is it --format {guess}?)" if guess and guess != self.fmt
                and self.fmt != "rees46" and self.stats.rows else "")
        return NothingUsable(f"no usable events in {self.path} ({self.stats.rows:,} rows "
                             "read" + (", every one skipped" if self.stats.rows else "")
                             + f"): nothing to replay{hint}")

    def _read(self) -> Iterator[ProducedRecord]:
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as fh:
                if self.fmt == "taobao":
                    yield from self._taobao(fh)
                elif self.fmt == "jsonl":
                    yield from self._jsonl(fh)
                else:
                    yield from self._csv(fh)
        except UnicodeDecodeError as exc:
            raise LogError(f"{self.path} is not UTF-8 text ({exc.reason}, byte 0x"
                           f"{exc.object[exc.start]:02x}); convert it first, e.g. "
                           f"iconv -f latin1 -t utf-8") from None
        except OSError as exc:
            raise LogError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    # ------------------------------------------------------------------ formats
    def _taobao(self, lines: Iterable[str]) -> Iterator[ProducedRecord]:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            self.stats.rows += 1
            parts = [p.strip() for p in line.rstrip("\r\n").split(",")]
            if len(parts) != 5:
                self.stats.skip("unmappable", n, f"{len(parts)} fields, not 5")
                continue
            user, item, cat, behaviour, ts = parts
            yield from self._tabular(n, {"user_id": user, "item_id": item, "category": cat,
                                         "kind": behaviour, "ts": ts})

    def _csv(self, fh: IO[str]) -> Iterator[ProducedRecord]:
        header_line = fh.readline()
        if not header_line.strip():
            return
        delimiter = max(DELIMITERS, key=header_line.count)
        rows = csv.reader(chain([header_line], fh), delimiter=delimiter)
        if positional(self.columns):  # no header: the first line is a row
            index = {k: int(col) - 1 for k, col in self.columns.items()}
        else:
            index = self._header_index(next(rows), delimiter)
        fallback = index.pop("_category_id", None)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:  # a NUL byte, a field over the size limit
                self.stats.rows += 1
                self.stats.skip("bad_csv", rows.line_num, str(exc))
                continue
            if not any(cell.strip() for cell in row):
                continue
            self.stats.rows += 1
            fields = {k: row[i].strip() if i < len(row) else "" for k, i in index.items()}
            if fallback is not None and not fields.get("category") and fallback < len(row):
                fields["category"] = row[fallback].strip()
            yield from self._tabular(rows.line_num, fields)

    def _header_index(self, header: list[str], delimiter: str) -> dict[str, int]:
        names = [h.strip() for h in header]
        lower = [h.lower() for h in names]
        index: dict[str, int] = {}
        missing = []
        wanted = dict(self.columns)
        if self.fmt == "rees46":
            wanted["_category_id"] = "category_id"
        for key, col in wanted.items():
            if col in names:
                index[key] = names.index(col)
            elif lower.count(col.strip().lower()) == 1:
                index[key] = lower.index(col.strip().lower())
            elif key != "_category_id":
                missing.append(f"{col!r} (for {key})")
        if missing:
            sep = {"\t": "tab"}.get(delimiter, repr(delimiter))
            raise LogError(f"{self.path}: the header has no column {', '.join(missing)}; "
                           f"its columns (separated by {sep}) are: "
                           + ", ".join(repr(n) for n in names[:40]))
        return index

    def _jsonl(self, lines: Iterable[str]) -> Iterator[ProducedRecord]:
        for n, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            self.stats.rows += 1
            try:
                obj = json.loads(text, parse_constant=_no_constant)
            except (ValueError, RecursionError) as exc:
                self.stats.skip("not_json", n, str(exc))
                continue
            if not isinstance(obj, dict):
                self.stats.skip("not_object", n, type(obj).__name__)
                continue
            yield from self._json_object(n, obj)

    # ------------------------------------------------------------------ rows
    def _tabular(self, line: int, f: dict[str, str]) -> Iterator[ProducedRecord]:
        """One row of a tabular log: contract field → cell text ('' when empty)."""
        kind = self._kind(line, f.get("kind", ""))
        if kind is None:
            return
        if kind == CATALOGUE:
            rec = self._catalogue(line, f.get("item_id", ""), f.get("title", ""),
                                  f.get("category", ""), f.get("brand", ""),
                                  _price(f.get("price"), self.limits))
            if rec is not None:
                yield rec
            return
        ts = self._ts(line, f.get("ts", ""))
        if ts is None:
            return
        value = self._tabular_value(line, kind, f, ts)
        rec = self._event(line, kind, value) if value is not None else None
        if rec is None:
            return
        item = value.get("item_id") if value else None
        if item and self.emit_items and item not in self._seen_items:
            derived = self._derived(f, item, ts)
            if derived is not None:
                yield derived
        yield rec

    def _tabular_value(self, line: int, kind: str, f: dict[str, str],
                       ts: float) -> dict[str, Any] | None:
        user = f.get("user_id") or f.get("session", "")
        item = f.get("item_id", "")
        value: dict[str, Any] = {"event_id": f.get("event_id") or self._event_id(line),
                                 "user_id": user, "ts": ts}
        if not user:
            self.stats.skip("missing_user_id", line)
            return None
        if kind == SEARCH:
            if not f.get("query"):
                self.stats.skip("missing_query", line, "" if "query" in self.columns
                                else "no query column: --map query=COL")
                return None
            value["query"] = f["query"]
            clicked = f.get("clicked_item_id") or item
            if clicked:
                value["clicked_item_id"] = clicked
            results = [r for r in _ID_LIST.split(f.get("result_item_ids", "")) if r]
            if results:
                value["result_item_ids"] = results[:self.limits.max_list_items]
        else:
            if not item:
                self.stats.skip("missing_item_id", line)
                return None
            value["item_id"] = item
            price = _price(f.get("price"), self.limits)
            if price is not None and kind in TRANSACTION_CLASSES:
                value["price"] = price
        category = self._category(f)
        if category:
            value["category"] = category
        quantity = f.get("quantity", "")
        if quantity.isdigit() and 1 <= int(quantity) <= self.limits.max_quantity:
            value["quantity"] = int(quantity)
        if f.get("source"):
            value["source"] = _cut(f["source"], self.limits)
        return value

    def _json_object(self, line: int, obj: dict[str, Any]) -> Iterator[ProducedRecord]:
        raw_kind = obj.pop("kind", None)
        kind = self._kind(line, raw_kind if isinstance(raw_kind, str) else "")
        if kind is None:
            return
        if kind == CATALOGUE:
            rec = self._catalogue(line, _text(obj.get("item_id")), _text(obj.get("title")),
                                  _text(obj.get("category")), _text(obj.get("brand")),
                                  _price(obj.get("price"), self.limits))
            if rec is not None:
                yield rec
            return
        if obj.get("ts") is None:
            self.stats.skip("missing_ts", line)
            return
        ts = self._ts(line, obj["ts"])
        if ts is None:
            return
        obj["ts"] = ts
        if obj.get("event_id") in (None, ""):
            obj["event_id"] = self._event_id(line)
        for name in ("event_id", "user_id", "item_id", "clicked_item_id"):
            if isinstance(obj.get(name), str):
                obj[name] = obj[name].strip()
        rec = self._event(line, kind, obj)
        if rec is not None:
            yield rec

    # ------------------------------------------------------------------ parts
    def _kind(self, line: int, raw: str) -> str | None:
        raw = raw.strip()
        kind = self.kind_map.get(raw) or self.kind_map.get(raw.lower()) or raw.lower()
        if kind in EVENT_KINDS or kind == CATALOGUE:
            return kind
        if ANY_KIND in self.kind_map:  # --kinds '*=click': every other row (click-only logs)
            return self.kind_map[ANY_KIND]
        self.stats.skip(f"kind {raw!r}" if raw else "missing_kind", line)
        return None

    def _ts(self, line: int, raw: str | float) -> float | None:
        if raw == "":
            self.stats.skip("missing_ts", line)
            return None
        try:
            ts, form = parse_ts(raw, self.assume_utc)
        except NaiveTimestamp:
            raise LogError(
                f"{self.path}, line {line}: the timestamp {raw!r} has no time zone. A guessed "
                "zone would shift every event, so it is refused: add --assume-utc if the "
                "log's times are UTC, or write them with an offset (2024-01-01T10:00:00+02:00) "
                "or as unix seconds") from None
        except ValueError:
            self.stats.skip("bad_ts", line, repr(raw))
            return None
        if ts < self.limits.min_ts:
            self.stats.skip("ts_before_2000", line, f"{raw!r} read as {form}")
            return None
        self.stats.ts_forms[form] += 1
        return ts

    def _event(self, line: int, kind: str, value: dict[str, Any]) -> ProducedRecord | None:
        """The event as the workers will read it, or None (skipped) if they would refuse it."""
        try:
            event = validate_event(kind, value, self.limits, now=math.inf)
        except InvalidEvent as exc:
            self.stats.skip(f"invalid_{exc.reason}", line, exc.detail)
            return None
        if event.ts < self._latest - self.stats.tolerance_s:
            self.stats.backwards += 1
            self.stats.max_backwards_s = max(self.stats.max_backwards_s,
                                             self._latest - event.ts)
        self._latest = max(self._latest, event.ts)
        self.stats.events[kind] += 1
        return ProducedRecord(kind, event.user_id, wire_bytes(event.to_dict()), ts=event.ts)

    def _catalogue(self, line: int, item_id: str, title: str, category: str, brand: str,
                   price: float | None, ts: float | None = None) -> ProducedRecord | None:
        """A catalogue record; empty text fields are filled (category ``unknown``, title
        from brand and category, else ``item {id}``)."""
        if not item_id:
            self.stats.skip("missing_item_id", line)
            return None
        title = title or " ".join(x for x in (brand, category) if x) or f"item {item_id}"
        try:
            item = validate_item(Item(item_id, _cut(title, self.limits),
                                      _cut(category or "unknown", self.limits),
                                      _cut(brand, self.limits), price).to_dict(), self.limits)
        except InvalidEvent as exc:
            self.stats.skip(f"invalid_{exc.reason}", line, exc.detail)
            return None
        self._seen_items.add(item.item_id)
        self._texts[hash((item.title, item.category, item.brand))] += 1
        self.stats.items += 1
        return ProducedRecord(CATALOGUE, item.item_id, wire_bytes(item.to_dict()), ts=ts)

    def _derived(self, f: dict[str, str], item: str, ts: float) -> ProducedRecord | None:
        category = self._category(f)
        if self.fmt == "taobao":
            title = f"item {item} in category {category}"
        elif self.fmt == "rees46":
            title = " ".join(x for x in (f.get("brand", ""), category.replace(".", " ")) if x)
        else:
            title = f.get("title", "") or (
                "" if {"brand", "category"} & self.columns.keys() else f"item {item}")
        return self._catalogue(0, item, title, category, f.get("brand", ""),
                               _price(f.get("price"), self.limits), ts)

    def _category(self, f: dict[str, str]) -> str:
        category = f.get("category", "")
        if self.fmt == "rees46":
            category = category or "unknown"
        return _cut(category, self.limits)

    def _event_id(self, line: int) -> str:
        return f"{self.fmt}-{self._tag}-{line}"


def positional(columns: Mapping[str, str]) -> bool:
    """Whether a ``--map`` names columns by position (1, 2, …): a CSV without a header.

    >>> positional({"user_id": "1", "item_id": "3"}), positional({"user_id": "uid"})
    (True, False)
    """
    return bool(columns) and all(c.isdigit() and int(c) >= 1 for c in columns.values())


def check_mapping(fmt: str, columns: Mapping[str, str] | None,
                  kind_map: Mapping[str, str] | None) -> dict[str, str]:
    """The column mapping a reader of ``fmt`` uses, or :class:`LogError` saying what is
    wrong with the one given.

    >>> check_mapping("csv", {"user_id": "u", "item_id": "i", "kind": "k", "ts": "t"}, None)
    {'user_id': 'u', 'item_id': 'i', 'kind': 'k', 'ts': 't'}
    >>> check_mapping("csv", {"user": "u"}, None)
    Traceback (most recent call last):
    ...
    tailstream.producers.logstats.LogError: unknown --map key 'user'; the keys are: ...
    """
    if fmt not in FORMATS:
        raise LogError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    for raw, kind in (kind_map or {}).items():
        if kind not in (*EVENT_KINDS, CATALOGUE):
            raise LogError(f"--kinds maps {raw!r} to {kind!r}, which is not a kind; the kinds "
                           f"are: {', '.join((*EVENT_KINDS, CATALOGUE))}")
    if fmt != "csv":
        if columns:
            raise LogError(f"--map is for --format csv; the {fmt} format has fixed columns")
        return dict(REES46_COLUMNS) if fmt == "rees46" else {}
    if not columns:
        raise LogError("--format csv needs a column mapping: --map user_id=COL,item_id=COL,"
                       "kind=COL,ts=COL[,query=COL,title=COL,category=COL,...]")
    unknown = [k for k in columns if k not in MAP_KEYS]
    if unknown:
        raise LogError(f"unknown --map key {unknown[0]!r}; the keys are: {', '.join(MAP_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in columns
               and not (k == "kind" and ANY_KIND in (kind_map or {}))]
    if "user_id" not in columns and "session" not in columns:
        missing.insert(0, "user_id")
    if missing:
        raise LogError(f"--map lacks {', '.join(missing)} (needed: user_id or session, "
                       f"{', '.join(REQUIRED_KEYS)}; a log without a kind column takes "
                       f"--kinds '*=click')")
    numbers = [c for c in columns.values() if c.isdigit()]
    if numbers and not positional(columns):
        raise LogError("--map names columns either all by header name or all by position "
                       f"(1, 2, … for a CSV without a header), not both: {dict(columns)}")
    if SEARCH in (kind_map or {}).values() and "query" not in columns:
        raise LogError("--kinds maps rows to search, but --map has no query column "
                       "(query=COL): a search is replayed with its query")
    return dict(columns)


def _text_from(fmt: str, columns: Mapping[str, str]) -> str:
    if fmt == "taobao":
        return "item and category ids"
    if fmt == "rees46":
        return "brand, category"
    if fmt == "jsonl":
        return ""
    return (", ".join(k for k in ("title", "brand", "category") if k in columns)
            or "item ids only: map title, brand or category for content")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _cut(text: str, limits: Limits) -> str:
    return text[:limits.max_string_chars]


def _price(raw: Any, limits: Limits) -> float | None:
    """A price, or None when it is missing or not one the contract takes (the row stays)."""
    if raw is None or raw == "" or isinstance(raw, bool):
        return None
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 <= value <= limits.max_price else None
