"""Rolling per-class counts (click / cart / purchase …) for the current class mix.

Two estimators of "how many events of each class lately", both with O(#classes) state
and a plain JSON-able state for a Faust changelog table:

* :class:`HoppingWindowCounts` — hopping (sliding) windows of length ``size`` advancing
  by ``step`` (Kafka Streams / Faust semantics: window ``k`` covers
  ``[k·step, k·step + size)``, so each event falls into ``size/step`` windows). Kept as a
  ring of ``size/step`` step-buckets: the counts at ``now`` are the sum of the buckets of
  the window that contains ``now`` and closes at the next step boundary, i.e. events in
  ``(now − size, now]`` with the old end rounded up to a step boundary (at most one step
  of the oldest data is dropped early). Counts jump when a bucket leaves the window.
* :class:`DecayedCounts` — exponentially decayed counts ``n_c(now) = Σ w · 2^(−(now − t)/h)``
  via forward decay (Cormode et al., "Forward Decay: A Practical Time Decay Model for
  Streaming Systems", ICDE 2009): an event adds ``w · 2^((t − t0)/h)`` once; reads
  multiply by ``2^(−(now − t0)/h)``. Smooth in time by construction (no window edges),
  and with a half-life of ``h`` it weighs about the last ``h / ln 2`` seconds.

:func:`class_shares` turns either's counts into the class mix ``π_c = n_c / Σ n``, which
:func:`tailstream.models.imbalance.policies.class_weights` consumes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

Counts = dict[str, float]
State = dict[str, Any]


def class_shares(counts: Mapping[str, float]) -> Counts:
    """``π_c = n_c / Σ n`` (negative counts treated as 0; all zeros when nothing counted).

    >>> class_shares({"click": 90.0, "cart": 8.0, "purchase": 2.0})
    {'click': 0.9, 'cart': 0.08, 'purchase': 0.02}
    >>> class_shares({"click": 0.0})
    {'click': 0.0}
    """
    clean = {c: max(float(n), 0.0) for c, n in counts.items()}
    total = sum(clean.values())
    if total <= 0:
        return dict.fromkeys(clean, 0.0)
    return {c: n / total for c, n in clean.items()}


class ClassCounts(Protocol):
    """What both rolling counters offer (for code that takes either)."""

    def add(self, cls: str, ts: float, weight: float = 1.0) -> bool: ...

    def counts(self, now: float) -> Counts: ...

    def shares(self, now: float) -> Counts: ...

    def to_state(self) -> State: ...


class HoppingWindowCounts:
    """Per-class counts over a hopping window, from a ring of ``size/step`` step-buckets.

    Bucket ``b = ⌊ts / step⌋``; ``counts(now)`` sums buckets ``⌊now/step⌋ − size/step < b ≤
    ⌊now/step⌋``. An event whose bucket has already left the window of the newest event
    seen (the watermark) is *late*: it is ignored and counted in ``late``. Out-of-order
    events still inside that window are counted normally. Every class ever seen appears
    in ``counts`` (0.0 when absent from the window), so downstream weights keep all classes.

    >>> w = HoppingWindowCounts(size_s=10, step_s=5)
    >>> for cls, ts in [("click", 0), ("cart", 4), ("click", 6)]:
    ...     _ = w.add(cls, ts)
    >>> w.counts(now=9)      # buckets [0, 5) and [5, 10)
    {'click': 2.0, 'cart': 1.0}
    >>> w.add("click", 12)
    True
    >>> w.counts(now=12)     # buckets [5, 10) and [10, 15)
    {'click': 2.0, 'cart': 0.0}
    >>> w.add("cart", 3), w.late   # bucket [0, 5) has left the window of ts=12
    (False, 1)
    """

    def __init__(self, size_s: float = 3600.0, step_s: float = 300.0) -> None:
        if not size_s > 0 or not step_s > 0:
            raise ValueError("size_s and step_s must be positive")
        n = round(size_s / step_s)
        if n < 1 or abs(n * step_s - size_s) > 1e-9 * size_s:
            raise ValueError("size_s must be a whole multiple of step_s")
        self.size_s = float(size_s)
        self.step_s = float(step_s)
        self.n_buckets = n
        self.late = 0
        self.late_weight = 0.0
        self._watermark: int | None = None  # newest bucket index seen
        self._epoch: list[int | None] = [None] * n  # bucket index each ring slot holds
        self._buckets: list[Counts] = [{} for _ in range(n)]
        self._classes: dict[str, None] = {}  # insertion-ordered set

    def _bucket(self, ts: float) -> int:
        return math.floor(ts / self.step_s)

    def add(self, cls: str, ts: float, weight: float = 1.0) -> bool:
        """Count ``weight`` for ``cls`` at ``ts``; False (and ``late += 1``) if too old."""
        b = self._bucket(ts)
        if self._watermark is not None and b <= self._watermark - self.n_buckets:
            self.late += 1
            self.late_weight += weight
            return False
        slot = b % self.n_buckets
        if self._epoch[slot] != b:
            # The slot holds an older bucket (b − k·n): it has left every window that
            # contains b, so it is recycled. (A newer one would have made this event late.)
            self._epoch[slot] = b
            self._buckets[slot] = {}
        bucket = self._buckets[slot]
        bucket[cls] = bucket.get(cls, 0.0) + weight
        self._classes.setdefault(cls, None)
        if self._watermark is None or b > self._watermark:
            self._watermark = b
        return True

    def window(self, now: float) -> tuple[float, float]:
        """``[start, end)`` of the window that ``counts(now)`` covers."""
        end = (self._bucket(now) + 1) * self.step_s
        return end - self.size_s, end

    def counts(self, now: float) -> Counts:
        """Counts per class in ``window(now)``.

        Meant for ``now`` at or after the watermark; for a ``now`` far in the past, buckets
        already recycled are missing. Events with ``ts > now`` in ``now``'s own bucket count.
        """
        top = self._bucket(now)
        out = dict.fromkeys(self._classes, 0.0)
        for epoch, bucket in zip(self._epoch, self._buckets, strict=True):
            if epoch is not None and top - self.n_buckets < epoch <= top:
                for cls, n in bucket.items():
                    out[cls] += n
        return out

    def shares(self, now: float) -> Counts:
        return class_shares(self.counts(now))

    @property
    def watermark(self) -> float | None:
        """Start of the newest bucket seen (seconds), or None before any event."""
        return None if self._watermark is None else self._watermark * self.step_s

    # -- changelog state ------------------------------------------------------------
    def to_state(self) -> State:
        """Plain JSON-able dict (only buckets still in the watermark's window)."""
        buckets = []
        if self._watermark is not None:
            for epoch, bucket in sorted(
                    ((e, b) for e, b in zip(self._epoch, self._buckets, strict=True)
                     if e is not None and e > self._watermark - self.n_buckets),
                    key=lambda eb: eb[0]):
                buckets.append([epoch, dict(bucket)])
        return {
            "kind": "hopping",
            "size_s": self.size_s,
            "step_s": self.step_s,
            "late": self.late,
            "late_weight": self.late_weight,
            "watermark": self._watermark,
            "classes": list(self._classes),
            "buckets": buckets,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> HoppingWindowCounts:
        out = cls(float(state["size_s"]), float(state["step_s"]))
        out.late = int(state.get("late", 0))
        out.late_weight = float(state.get("late_weight", 0.0))
        wm = state.get("watermark")
        out._watermark = None if wm is None else int(wm)
        out._classes = dict.fromkeys(state.get("classes", []))
        for epoch, bucket in state.get("buckets", []):
            slot = int(epoch) % out.n_buckets
            out._epoch[slot] = int(epoch)
            out._buckets[slot] = {str(c): float(n) for c, n in bucket.items()}
            for c in bucket:
                out._classes.setdefault(str(c), None)
        return out


class DecayedCounts:
    """Exponentially decayed per-class counts: ``n_c(now) = Σ_events w · 2^(−(now − t)/h)``.

    Each count halves every ``half_life_s`` without new events, exactly (the factors are
    powers of two). Events may arrive in any order; an event after ``now`` counts more
    than its weight (``2^((t − now)/h) > 1``), so read at or after the newest event.

    >>> d = DecayedCounts(half_life_s=60)
    >>> _ = d.add("click", ts=0, weight=8)
    >>> _ = d.add("purchase", ts=60, weight=1)
    >>> d.counts(now=60), d.counts(now=120)
    ({'click': 4.0, 'purchase': 1.0}, {'click': 2.0, 'purchase': 0.5})
    >>> d.shares(now=120)
    {'click': 0.8, 'purchase': 0.2}
    """

    # Rebase once boosts pass 2^64, far from float overflow (2^1024).
    _REBASE_EXPONENT = 64.0

    def __init__(self, half_life_s: float) -> None:
        if not half_life_s > 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = float(half_life_s)
        self._t0: float | None = None
        self._boosted: Counts = {}

    def add(self, cls: str, ts: float, weight: float = 1.0) -> bool:
        """Count ``weight`` for ``cls`` at ``ts`` (always accepted; returns True)."""
        if self._t0 is None:
            self._t0 = float(ts)
        exponent = (ts - self._t0) / self.half_life_s
        if exponent > self._REBASE_EXPONENT:
            self._rebase(float(ts))
            exponent = 0.0
        self._boosted[cls] = self._boosted.get(cls, 0.0) + weight * math.pow(2.0, exponent)
        return True

    def add_many(self, cls: str, ts: Sequence[float]) -> None:
        """``add(cls, t)`` for every ``t`` (weight 1), with one sum: forward decay makes
        the boosts of a batch add up exactly.

        >>> a, b = DecayedCounts(60), DecayedCounts(60)
        >>> for t in (0.0, 30.0, 60.0):
        ...     _ = a.add("click", t)
        >>> b.add_many("click", [0.0, 30.0, 60.0])
        >>> a.counts(60) == b.counts(60)
        True
        """
        if not ts:
            return
        if self._t0 is None:
            self._t0 = float(ts[0])
        newest = max(ts)
        if (newest - self._t0) / self.half_life_s > self._REBASE_EXPONENT:
            self._rebase(float(newest))
        t0, h = self._t0, self.half_life_s
        boost = math.fsum(math.pow(2.0, (t - t0) / h) for t in ts)
        self._boosted[cls] = self._boosted.get(cls, 0.0) + boost

    def _rebase(self, ts: float) -> None:
        assert self._t0 is not None
        factor = math.pow(2.0, -(ts - self._t0) / self.half_life_s)
        self._boosted = {c: v * factor for c, v in self._boosted.items()}
        self._t0 = ts

    def counts(self, now: float) -> Counts:
        if self._t0 is None:
            return {}
        factor = math.pow(2.0, -(now - self._t0) / self.half_life_s)
        return {c: v * factor for c, v in self._boosted.items()}

    def shares(self, now: float) -> Counts:
        """Class mix; independent of ``now`` (every class decays by the same factor)."""
        return class_shares(self.counts(now))

    # -- changelog state ------------------------------------------------------------
    def to_state(self) -> State:
        return {"kind": "decayed", "half_life_s": self.half_life_s, "t0": self._t0,
                "boosted": dict(self._boosted)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DecayedCounts:
        out = cls(float(state["half_life_s"]))
        t0 = state.get("t0")
        out._t0 = None if t0 is None else float(t0)
        out._boosted = {str(c): float(v) for c, v in state.get("boosted", {}).items()}
        return out
