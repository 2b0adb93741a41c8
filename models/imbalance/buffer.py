"""A bounded replay buffer that over-keeps the rare: minority classes and tail items.

Routing of each offered :class:`Sample` (``offer``), in this order:

1. **Minority class** (live share of its class ``π_c < minority_share``; a class absent from
   the shares counts as 0, so at cold start everything is kept): appended to a per-class
   FIFO ``deque(maxlen=capacity_per_class)``: the newest are kept, the oldest evicted.
   Rare events are few, so keeping *all recent* ones is cheap and matches drift best.
2. **Tail item** of a majority class (``tier == "tail"``): appended to one FIFO deque of
   ``tail_capacity``; the long tail would otherwise vanish in the click reservoir.
3. **Everything else** (majority class, head/torso item): a per-class reservoir of
   ``capacity_per_class`` kept with Vitter's Algorithm R ("Random Sampling with a
   Reservoir", ACM TOMS 1985): the n-th sample offered to the reservoir of its class
   replaces a uniformly chosen slot with probability ``capacity / n``, so at every moment
   each of the n samples is held with the same probability ``min(1, capacity / n)``.

Routes 1 and 2 are the *rare* samples: ``new_since_last_take`` counts them for the
``buffer`` trigger (:mod:`~tailstream.models.imbalance.triggers`).

Memory is strictly bounded: at most ``2 · capacity_per_class`` samples per class plus
``tail_capacity``. The whole state, random generator included, round-trips through
JSON-able dicts (``to_state`` / ``from_state``) for a Faust changelog table or Redis; a
restored buffer continues exactly as the original would have.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tailstream.contract import TAIL

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Sample:
    """One training interaction (immutable; copies via :func:`dataclasses.replace`).

    >>> s = Sample("e1", "u1", "i1", "purchase", 12.5, item_text="red tee")
    >>> Sample.from_dict(s.to_dict()) == s
    True
    """

    event_id: str
    user_id: str
    item_id: str
    label: str  # event class: click | cart | fav | purchase
    ts: float
    tier: str = "tail"  # item popularity tier at the time: head | torso | tail
    weight: float = 1.0
    user_text: str = ""  # user context as text (recent queries / item titles)
    item_text: str = ""  # item text (title, category, brand, price bucket)
    user_kinds: str = ""  # each context entry's event kind, space-separated ("": unknown)
    features: tuple[float, ...] = ()
    """The streaming count features as known before the event
    (:func:`~tailstream.models.imbalance.features.feature_vector`; empty: unknown)."""
    fast: tuple[float, ...] = ()
    """The river fast path's class probabilities for the event, made before learning from
    it (:data:`~tailstream.contract.CLASSES` order; empty: unknown): what the decision
    layer may stack beside the head's."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id, "user_id": self.user_id, "item_id": self.item_id,
            "label": self.label, "ts": self.ts, "tier": self.tier, "weight": self.weight,
            "user_text": self.user_text, "item_text": self.item_text,
            "user_kinds": self.user_kinds, "features": list(self.features),
            "fast": list(self.fast),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sample:
        return cls(
            event_id=str(d["event_id"]), user_id=str(d["user_id"]), item_id=str(d["item_id"]),
            label=str(d["label"]), ts=float(d["ts"]), tier=str(d.get("tier", "tail")),
            weight=float(d.get("weight", 1.0)), user_text=str(d.get("user_text", "")),
            item_text=str(d.get("item_text", "")), user_kinds=str(d.get("user_kinds", "")),
            features=tuple(float(v) for v in d.get("features") or ()),
            fast=tuple(float(v) for v in d.get("fast") or ()),
        )


class MinorityBuffer:
    """Minority classes FIFO, tail items FIFO, majority classes by reservoir.

    >>> buf = MinorityBuffer(capacity_per_class=2, minority_share=0.1, tail_capacity=2)
    >>> shares = {"click": 0.9, "purchase": 0.02}
    >>> for n in range(3):
    ...     _ = buf.offer(Sample(f"p{n}", "u", "i", "purchase", n, tier="head"), shares)
    >>> [s.event_id for s in buf.minority()]   # newest two purchases kept
    ['p1', 'p2']
    >>> buf.offer(Sample("c0", "u", "i", "click", 3.0, tier="tail"), shares)
    True
    >>> buf.sizes(), buf.new_since_last_take     # three purchases and a tail click are new
    ({'purchase': 2, 'tail': 1}, 4)
    """

    def __init__(self, capacity_per_class: int = 5000, minority_share: float = 0.10,
                 tail_capacity: int = 5000, seed: int = 0) -> None:
        if capacity_per_class < 1 or tail_capacity < 0:
            raise ValueError("need capacity_per_class >= 1 and tail_capacity >= 0")
        if not 0.0 <= minority_share <= 1.0:
            raise ValueError("minority_share must be in [0, 1]")
        self.capacity_per_class = capacity_per_class
        self.minority_share = minority_share
        self.tail_capacity = tail_capacity
        self.seed = seed
        self._rng = random.Random(seed)
        self._minority: dict[str, deque[Sample]] = {}
        self._tail: deque[Sample] = deque(maxlen=tail_capacity)
        self._reservoir: dict[str, list[Sample]] = {}
        self._seen: dict[str, int] = {}  # samples offered to each reservoir so far (Alg. R's n)
        self.new_since_last_take = 0
        # Where the last offered sample went: ("minority" | "tail" | "reservoir", slot).
        # Lets a store mirror each change (append, or overwrite of a reservoir slot).
        self.last_route: tuple[str, int | None] | None = None

    # -- updates ---------------------------------------------------------------
    def is_minority(self, label: str, class_shares: Mapping[str, float]) -> bool:
        return class_shares.get(label, 0.0) < self.minority_share

    def offer(self, sample: Sample, class_shares: Mapping[str, float]) -> bool:
        """Route one sample (see the module docstring); True if it is now held."""
        route = self.route(sample.label, sample.tier, class_shares)
        if route is None:
            return False
        self.place(route, sample)
        return True

    def route(self, label: str, tier: str, class_shares: Mapping[str, float]
              ) -> tuple[str, int | None] | None:
        """Where a sample of ``label`` and ``tier`` would go, or None if the reservoir
        drops it: the decision of :meth:`offer` (counters and random draw included)
        without the sample, so a caller builds only the samples that are kept. Follow
        each route with :meth:`place`.

        >>> buf = MinorityBuffer(capacity_per_class=1, minority_share=0.1, tail_capacity=0)
        >>> shares = {"click": 0.9}
        >>> buf.route("purchase", "head", shares), buf.route("click", "head", shares)
        (('minority', None), ('reservoir', 0))
        """
        if self.is_minority(label, class_shares):
            self.last_route = ("minority", None)
        elif tier == TAIL and self.tail_capacity > 0:
            self.last_route = ("tail", None)
        else:
            self.last_route = self._reservoir_slot(label)
        return self.last_route

    def place(self, route: tuple[str, int | None], sample: Sample) -> None:
        """Put ``sample`` where :meth:`route` said."""
        kind, slot = route
        if kind == "minority":
            q = self._minority.get(sample.label)
            if q is None:
                q = self._minority[sample.label] = deque(maxlen=self.capacity_per_class)
            q.append(sample)
            self.new_since_last_take += 1
        elif kind == "tail":
            self._tail.append(sample)
            # A tail item's interaction is as rare for retrieval as a purchase is for the
            # outcome head: it counts towards the next fine-tune too, so a stream whose
            # news is in the tail (click-only ones included) is not left waiting for the
            # interval.
            self.new_since_last_take += 1
        else:
            assert slot is not None
            res = self._reservoir.setdefault(sample.label, [])
            if slot == len(res):
                res.append(sample)
            else:
                res[slot] = sample

    def _reservoir_slot(self, label: str) -> tuple[str, int | None] | None:
        res = self._reservoir.setdefault(label, [])
        n = self._seen.get(label, 0) + 1
        self._seen[label] = n
        if len(res) < self.capacity_per_class:
            return ("reservoir", len(res))
        j = self._rng.randrange(n)  # Algorithm R: keep with probability capacity / n
        if j < self.capacity_per_class:
            return ("reservoir", j)
        return None

    def mark_consumed(self) -> None:
        """The trainer took a batch: restart the count of new rare samples."""
        self.new_since_last_take = 0

    # -- reads -----------------------------------------------------------------
    def sizes(self) -> dict[str, int]:
        """Samples held per class (minority FIFO + reservoir), plus ``"tail"`` if any."""
        out: dict[str, int] = {}
        for label, q in self._minority.items():
            out[label] = out.get(label, 0) + len(q)
        for label, res in self._reservoir.items():
            out[label] = out.get(label, 0) + len(res)
        if self._tail:
            out[TAIL] = len(self._tail)
        return {k: v for k, v in out.items() if v}

    def __len__(self) -> int:
        return (sum(len(q) for q in self._minority.values()) + len(self._tail)
                + sum(len(r) for r in self._reservoir.values()))

    def minority(self) -> list[Sample]:
        """Minority-class samples, oldest first within each class."""
        return [s for q in self._minority.values() for s in q]

    def tail(self) -> list[Sample]:
        """Tail-item interactions of majority classes, oldest first."""
        return list(self._tail)

    def majority(self) -> list[Sample]:
        """Reservoir contents (a uniform sample of each majority class, in slot order)."""
        return [s for r in self._reservoir.values() for s in r]

    def all(self) -> list[Sample]:
        return self.minority() + self.tail() + self.majority()

    def seen(self, label: str) -> int:
        """How many samples of ``label`` were offered to its reservoir."""
        return self._seen.get(label, 0)

    # -- persistence -----------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """JSON-able snapshot; ``from_state(to_state())`` continues identically."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": STATE_VERSION,
            "params": {"capacity_per_class": self.capacity_per_class,
                       "minority_share": self.minority_share,
                       "tail_capacity": self.tail_capacity, "seed": self.seed},
            "rng": [version, list(internal), gauss],
            "minority": {c: _dump(q) for c, q in self._minority.items()},
            "tail": _dump(self._tail),
            "reservoir": {c: _dump(r) for c, r in self._reservoir.items()},
            "seen": dict(self._seen),
            "new_since_last_take": self.new_since_last_take,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MinorityBuffer:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported buffer state version {state.get('version')!r}")
        buf = cls(**state["params"])
        version, internal, gauss = state["rng"]
        buf._rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        buf._minority = {c: deque(_load(q), maxlen=buf.capacity_per_class)
                         for c, q in state["minority"].items()}
        buf._tail = deque(_load(state["tail"]), maxlen=buf.tail_capacity)
        buf._reservoir = {c: list(_load(r)) for c, r in state["reservoir"].items()}
        buf._seen = {c: int(n) for c, n in state["seen"].items()}
        buf.new_since_last_take = int(state["new_since_last_take"])
        return buf


def _dump(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in samples]


def _load(rows: Iterable[Mapping[str, Any]]) -> list[Sample]:
    return [Sample.from_dict(r) for r in rows]
