"""What a log reader read, and the short block every replaying command prints about it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tailstream.contract import EVENT_KINDS

SHOWN_REASONS = 6
"""Skip reasons listed by name in the summary (the rest are summed)."""


class LogError(ValueError):
    """A log that cannot be read as asked: a mapping that does not fit the header, a time
    without a zone, an unreadable file. The CLI prints the message, no traceback."""


class NothingUsable(LogError):
    """A log read to its end without one usable event."""


@dataclass
class ReplayStats:
    """What a reader read: data rows, events per kind, catalogue records, skipped rows by
    reason (with the first example of each), timestamps by form, time running backwards,
    and items whose text another item has too."""

    rows: int = 0
    events: Counter[str] = field(default_factory=Counter)
    items: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    """Rows not replayed, by reason (``bad_ts``, ``missing_item_id``, ``kind 'x'``, …)."""
    examples: dict[str, str] = field(default_factory=dict)
    """The first row skipped for each reason: ``line 7: '...'``."""
    ts_forms: Counter[str] = field(default_factory=Counter)
    backwards: int = 0
    """Events more than ``tolerance_s`` earlier than the latest event before them."""
    max_backwards_s: float = 0.0
    tolerance_s: float = 60.0
    shared_text: int = 0
    """Catalogue records whose text (title, category, brand) another item has too."""
    text_from: str = ""
    """Where item texts come from (``title``, ``category``, ``ids only``, …), when derived."""
    text_hint: str = "give the items distinct titles"
    """What to do about items sharing their text (depends on the format)."""
    complete: bool = False
    """True once the whole file was read (False while reading, or when stopped early)."""

    @property
    def total_events(self) -> int:
        return sum(self.events.values())

    def skip(self, reason: str, line: int, detail: str = "") -> None:
        """Count a row not replayed (the first one per reason is kept as an example)."""
        self.skipped[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = f"line {line}" + (f": {detail[:60]}" if detail else "")

    @property
    def shared_text_warning(self) -> bool:
        """More than half of the items share their text with another item."""
        return self.items >= 2 and self.shared_text * 2 > self.items

    def summary(self, name: str) -> str:
        """The block printed after a replay.

        >>> s = ReplayStats(rows=5, events=Counter(click=3, search=1), items=2,
        ...                 ts_forms=Counter({"unix s": 4}), complete=True)
        >>> s.skip("bad_ts", 4, "'yesterday'")
        >>> print(s.summary("log.csv (csv)"))
        log.csv (csv): 5 rows read
          events: 4 (click 3, cart 0, fav 0, purchase 0, search 1)
          items: 2 catalogue records
          skipped: 1 row (bad_ts 1, e.g. line 4: 'yesterday')
          timestamps: unix s 4
        """
        more = "" if self.complete else " (stopped before the end of the file)"
        lines = [f"{name}: {self.rows:,} rows read{more}",
                 f"  events: {self.total_events:,} ("
                 + ", ".join(f"{k} {self.events[k]:,}" for k in EVENT_KINDS) + ")"]
        text = (f" (texts from {self.text_from})" if self.text_from and self.items else "")
        lines.append(f"  items: {self.items:,} catalogue records{text}")
        lines.append(f"  skipped: {self._skipped_text()}")
        if self.ts_forms:
            lines.append("  timestamps: " + ", ".join(f"{k} {v:,}" for k, v in
                                                      self.ts_forms.most_common()))
        lines.extend(f"  warning: {w}" for w in self.warnings())
        return "\n".join(lines)

    def _skipped_text(self) -> str:
        n = sum(self.skipped.values())
        if not n:
            return "0 rows"
        top = self.skipped.most_common()
        shown = [f"{r} {c:,}, e.g. {self.examples[r]}" if r in self.examples else f"{r} {c:,}"
                 for r, c in top[:SHOWN_REASONS]]
        rest = sum(c for _, c in top[SHOWN_REASONS:])
        if rest:
            shown.append(f"{len(top) - SHOWN_REASONS} other reasons {rest:,}")
        return f"{n:,} row{'s' if n != 1 else ''} (" + "; ".join(shown) + ")"

    def warnings(self) -> list[str]:
        """What the user should know before trusting a replay of this log."""
        out = []
        if self.backwards:
            out.append(f"{self.backwards:,} events are more than {self.tolerance_s:g} s "
                       f"earlier than an event before them (up to {self.max_backwards_s:,.0f} "
                       "s back): the log is not in time order (`eval` replays it sorted by "
                       "time; `produce replay` and `demo --replay` send it in file order: "
                       "sort it by time first for those)")
        if self.shared_text_warning:
            out.append(f"{self.shared_text:,} of {self.items:,} items "
                       f"({self.shared_text / self.items:.0%}) share their text with another "
                       f"item: the transformer sees them as identical; {self.text_hint}")
        return out
