"""What is trending: the most interacted items in a recent window, updated per event.

The window is an exponential decay with half-life ``h`` in whatever clock the caller
passes (seconds in a worker, the interaction count in ``tailstream eval``): an event at
time ``t`` counts ``w · 2^(−(now − t)/h)`` at time ``now``, so the items of the last ``h``
carry half of the weight. Forward decay (Cormode, Shkapenyuk, Srivastava & Xu, "Forward
Decay: A Practical Time Decay Model for Streaming Systems", ICDE 2009) stores the boosted
sums ``Σ w · 2^((t − t0)/h)``, which rank items exactly as the decayed counts do at every
moment, so an event touches one item only and never rescales the others.

Boosted sums only grow, so the best ``keep`` items are maintained exactly by a
:class:`TopSet` (an item can enter it only at one of its own events). Torch-free: the
product reuses :class:`Trending` as the fallback list and the evaluation as a peer.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from itertools import islice


class TopSet:
    """The ``size`` keys with the largest values, ties to the smaller key, for values that
    only ever grow.

    An offer is written down, not sorted in: the set is brought up to date when it is read
    (:meth:`best`, :attr:`values`) or when more than ``size`` keys wait (members too).
    That is exact: ranked by (−value, key), a key not offered since the last update can
    only have lost rank to the members (theirs only grew), so the new top is among the
    members and the keys offered since. A worker offers several times per event (each
    co-visitation pair) and reads a row only when a list is made from it; an eager set
    scanned its members for the new floor at nearly every offer, since forward-decayed
    values make each new key the largest.

    >>> t = TopSet(2)
    >>> for key, value in [("a", 1.0), ("b", 3.0), ("c", 2.0), ("a", 5.0)]:
    ...     t.offer(key, value)
    >>> t.best(), t.values
    (['a', 'b'], {'a': 5.0, 'b': 3.0})
    >>> t.offer("c", 3.0); t.best()      # ties go to the smaller key
    ['a', 'b']
    """

    __slots__ = ("size", "_members", "_pending", "_floor", "_ranked")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._members: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self._floor = -math.inf
        """The smallest member's value while the set is full: an offer below it can never
        enter (members only grow), so it is not written down."""
        self._ranked: list[str] = []  # the members best first, as of the last update

    def offer(self, key: str, value: float) -> None:
        """``key`` now has ``value`` (never less than before)."""
        if value < self._floor:
            return
        pending = self._pending
        pending[key] = value
        if len(pending) > self.size:
            self._settle()

    @property
    def values(self) -> dict[str, float]:
        """The members and their values (do not change it)."""
        self._settle()
        return self._members

    def best(self, exclude: Collection[str] = (), k: int | None = None) -> list[str]:
        """Members, largest value first (ties by key), without ``exclude``, at most ``k``.

        The ranking is sorted once per change, not per call: a worker asks every user's
        list for the same trending set (and popular items' neighbours) many times between
        two events that change it."""
        self._settle()
        ranked = self._ranked
        if not exclude:  # a row's neighbours: no generator step per key
            return ranked[:k] if k is not None else list(ranked)
        if k is None:
            return [key for key in ranked if key not in exclude]
        return list(islice((key for key in ranked if key not in exclude), k))

    def rescale(self, factor: float) -> None:
        """Multiply every value by ``factor > 0`` (the order kept: two values that the
        rounding makes equal keep the order they had)."""
        for values in (self._members, self._pending):
            for key in values:
                values[key] *= factor
        self._floor *= factor

    def _settle(self) -> None:
        pending = self._pending
        if not pending:
            return
        members = self._members
        members.update(pending)
        pending.clear()
        ranked = sorted(members, key=lambda key: (-members[key], key))
        if len(ranked) >= self.size:
            ranked = ranked[:self.size]
            if len(members) > self.size:
                self._members = {key: members[key] for key in ranked}
            self._floor = members[ranked[-1]]
        self._ranked = ranked


class ForwardDecay:
    """The boost ``2^((t − t0)/h)`` of forward decay, rebased before it overflows.

    >>> d = ForwardDecay(half_life=10.0)
    >>> d.boost(0.0), d.boost(10.0), d.decayed(4.0, now=20.0)
    (1.0, 2.0, 1.0)
    """

    REBASE_AT = 500.0  # exponent beyond which boosted values are rebased (2^500 is finite)

    def __init__(self, half_life: float) -> None:
        if not half_life > 0:
            raise ValueError("half_life must be positive")
        self.half_life = half_life
        self.t0: float | None = None

    def boost(self, t: float) -> float:
        """The weight of one unit at time ``t``, relative to ``t0`` (set by the first call)."""
        if self.t0 is None:
            self.t0 = t
        return math.pow(2.0, (t - self.t0) / self.half_life)

    def needs_rebase(self, t: float) -> bool:
        return self.t0 is not None and (t - self.t0) / self.half_life > self.REBASE_AT

    def rebase(self, t: float) -> float:
        """Move ``t0`` to ``t``; returns the factor every stored boosted value must take."""
        assert self.t0 is not None
        factor = math.pow(2.0, -(t - self.t0) / self.half_life)
        self.t0 = t
        return factor

    def decayed(self, boosted: float, now: float) -> float:
        """A boosted sum as the decayed count at ``now``."""
        if self.t0 is None:
            return 0.0
        return boosted * math.pow(2.0, -(now - self.t0) / self.half_life)


class Trending:
    """Decayed interaction counts per item; the top ``keep`` maintained per event.

    >>> t = Trending(half_life=2.0, keep=3)
    >>> for ts, item in enumerate(["a", "a", "a", "b", "c", "c"]):
    ...     t.observe(item, float(ts))
    >>> t.top(2), t.top(2, exclude={"c"})
    (['c', 'a'], ['a', 'b'])
    >>> round(t.count("a", now=5.0), 3)   # 2^-2.5 + 2^-2 + 2^-1.5
    0.78
    """

    def __init__(self, half_life: float, keep: int = 100) -> None:
        self.decay = ForwardDecay(half_life)
        self.keep = keep
        self._boosted: dict[str, float] = {}
        self._top = TopSet(keep)

    def observe(self, item_id: str, t: float, weight: float = 1.0) -> None:
        """One interaction with ``item_id`` at time ``t`` (non-decreasing across calls)."""
        if self.decay.needs_rebase(t):
            factor = self.decay.rebase(t)
            self._boosted = {k: v * factor for k, v in self._boosted.items()}
            self._top.rescale(factor)
        value = self._boosted.get(item_id, 0.0) + weight * self.decay.boost(t)
        self._boosted[item_id] = value
        self._top.offer(item_id, value)

    def top(self, k: int, exclude: Collection[str] = ()) -> list[str]:
        """The ``k`` most interacted items of the window (at most ``keep``), without
        ``exclude``, most first."""
        return self._top.best(exclude, k)

    def count(self, item_id: str, now: float) -> float:
        """The item's decayed count at ``now``."""
        return self.decay.decayed(self._boosted.get(item_id, 0.0), now)

    def fill(self, ranked: Iterable[str], k: int, exclude: Collection[str] = ()) -> list[str]:
        """``ranked`` (without ``exclude``), then trending items, up to ``k`` distinct ids.

        >>> t = Trending(half_life=1.0)
        >>> t.observe("x", 0.0); t.observe("y", 0.0); t.observe("y", 0.0)
        >>> t.fill(["b", "x"], 3, exclude={"b"})
        ['x', 'y']
        """
        out: list[str] = []
        seen = set(exclude)
        for item in ranked:
            if item not in seen:
                seen.add(item)
                out.append(item)
                if len(out) == k:
                    return out
        return out + self.top(k - len(out), seen)
