"""Item popularity with exponential time decay, popularity tiers, and per-category rankings.

Decay uses the forward-decay trick (Cormode et al., "Forward Decay: A Practical Time
Decay Model for Streaming Systems", ICDE 2009): an event at time t adds
``w · 2^((t − t0)/h)`` to its item; comparing these boosted sums ranks items exactly as
the decayed counts ``Σ w · 2^(−(now − t)/h)`` would, without touching every item on
every tick. The decayed count is recovered by multiplying with ``2^(−(now − t0)/h)``.

Tiers follow the cumulative share of interactions: items sorted by decayed count,
the smallest set holding ``head_share`` of all interactions is *head*, the next
``torso_share`` is *torso*, the rest (and every item never interacted with) is *tail*.
"""

from __future__ import annotations

import math
from collections import defaultdict
from operator import itemgetter

from tailstream.contract import TIERS


class PopularityTracker:
    """Decayed item counts → tiers and per-category top lists.

    >>> p = PopularityTracker(half_life_s=3600, head_share=0.5, torso_share=0.3)
    >>> for item, n in [("a", 6), ("b", 2), ("c", 1), ("d", 1)]:
    ...     for _ in range(n):
    ...         p.observe(item, "shoes", 1.0, ts=0.0)
    >>> p.refresh(now=0.0)
    >>> [p.tier(i) for i in "abcde"]
    ['head', 'torso', 'tail', 'tail', 'tail']
    """

    def __init__(self, half_life_s: float = 3600.0, head_share: float = 0.5,
                 torso_share: float = 0.3, per_category: int = 100) -> None:
        if not 0 < head_share < 1 or not 0 <= torso_share < 1 - head_share + 1e-12:
            raise ValueError("need 0 < head_share < 1 and head_share + torso_share <= 1")
        self.half_life_s = half_life_s
        self.head_share = head_share
        self.torso_share = torso_share
        self.per_category = per_category
        self._t0: float | None = None
        self._boosted: dict[str, float] = {}
        self._category: dict[str, str] = {}
        self._tier: dict[str, str] = {}
        self._top: dict[str, list[str]] = {}
        self._tail: dict[str, list[str]] = {}
        self._global_top: list[str] = []
        self._global_tail: list[str] = []
        self._total_boosted = 0.0
        self._version = 0
        """Counts every change, so :meth:`ranked_in` knows when its memo is stale."""
        self._memo: dict[tuple[str, int], tuple[list[str], list[float]]] = {}
        self._by_count_memo: dict[tuple[str, int], tuple[list[str], list[float]]] = {}
        self._fill_memo: dict[int, tuple[list[str], list[float], list[str | None]]] = {}
        self._memo_version = 0

    # -- updates ---------------------------------------------------------------
    def set_category(self, item_id: str, category: str) -> None:
        self._version += 1
        self._category[item_id] = category

    def observe(self, item_id: str, category: str | None, weight: float, ts: float) -> None:
        self._version += 1
        if self._t0 is None:
            self._t0 = ts
        exponent = (ts - self._t0) / self.half_life_s
        if exponent > 500:  # keep boosted values finite: rebase everything
            self._rebase(ts)
            exponent = 0.0
        boost = weight * math.pow(2.0, exponent)
        self._boosted[item_id] = self._boosted.get(item_id, 0.0) + boost
        self._total_boosted += boost
        if category is not None:
            self._category[item_id] = category

    def forget(self, item_id: str) -> None:
        """A deleted item: out of the counts, the tiers and every ranking at once.

        >>> p = PopularityTracker()
        >>> p.observe("a", "shoes", 1.0, ts=0.0); p.observe("b", "shoes", 1.0, ts=0.0)
        >>> p.refresh(now=0.0); p.forget("a")
        >>> p.global_top, p.top_in("shoes") + p.tail_in("shoes"), p.known_items
        (['b'], ['b'], 1)
        """
        self._version += 1
        self._total_boosted -= self._boosted.pop(item_id, 0.0)
        self._category.pop(item_id, None)
        self._tier.pop(item_id, None)
        for lists in (self._top, self._tail):
            for cat, items in lists.items():
                if item_id in items:
                    lists[cat] = [i for i in items if i != item_id]
        self._global_top = [i for i in self._global_top if i != item_id]
        self._global_tail = [i for i in self._global_tail if i != item_id]

    def _rebase(self, ts: float) -> None:
        assert self._t0 is not None
        factor = math.pow(2.0, -(ts - self._t0) / self.half_life_s)
        self._boosted = {k: v * factor for k, v in self._boosted.items()}
        self._total_boosted *= factor
        self._t0 = ts

    def refresh(self, now: float) -> None:
        """Recompute tiers and rankings (O(n log n); call at most every second or so)."""
        self._version += 1
        ranked = sorted(self._boosted.items(), key=itemgetter(1), reverse=True)
        total = sum(v for _, v in ranked) or 1.0
        tier: dict[str, str] = {}
        cum = 0.0
        head_cut, torso_cut = self.head_share, self.head_share + self.torso_share
        for item, value in ranked:
            # An item is head while the share *before* it is under the cut, so the
            # single most popular item is head even if it alone exceeds the cut.
            share_before = cum / total
            tier[item] = ("head" if share_before < head_cut
                          else "torso" if share_before < torso_cut else "tail")
            cum += value
        top: dict[str, list[str]] = defaultdict(list)
        tail: dict[str, list[str]] = defaultdict(list)
        for item, _ in ranked:
            cat = self._category.get(item)
            if cat is None:
                continue
            if tier[item] == "tail":
                if len(tail[cat]) < self.per_category:
                    tail[cat].append(item)
            elif len(top[cat]) < self.per_category:
                top[cat].append(item)
        # Catalogue items never interacted with are the deepest tail: still recommendable.
        # (A walk over the whole catalogue every second on the worker's event loop: a
        # category whose tail is full is skipped with one set lookup.)
        boosted, per = self._boosted, self.per_category
        full = {cat for cat, items in tail.items() if len(items) >= per}
        for item, cat in self._category.items():
            if cat in full or item in boosted:
                continue
            items = tail[cat]
            if len(items) < per:
                items.append(item)
                if len(items) >= per:
                    full.add(cat)
        self._tier = tier
        self._top = dict(top)
        self._tail = dict(tail)
        self._global_top = [i for i, _ in ranked[: self.per_category]]
        self._global_tail = [i for i, _ in ranked if tier[i] == "tail"][: self.per_category]

    # -- reads -------------------------------------------------------------------
    def tier(self, item_id: str) -> str:
        return self._tier.get(item_id, "tail")

    def category(self, item_id: str) -> str | None:
        return self._category.get(item_id)

    def decayed_count(self, item_id: str, now: float) -> float:
        if self._t0 is None:
            return 0.0
        return self._boosted.get(item_id, 0.0) * math.pow(2.0, -(now - self._t0) / self.half_life_s)

    def relative(self, item_id: str) -> float:
        """Count relative to the most popular item, in [0, 1]."""
        if not self._global_top:
            return 0.0
        top = self._boosted.get(self._global_top[0], 0.0) or 1.0
        return min(1.0, self._boosted.get(item_id, 0.0) / top)

    def relative_many(self, item_ids: list[str]) -> list[float]:
        """:meth:`relative` of several items (one lookup of the top count).

        >>> p = PopularityTracker(); p.relative_many(["x"])
        [0.0]
        """
        if not self._global_top:
            return [0.0] * len(item_ids)
        boosted = self._boosted
        top = boosted.get(self._global_top[0], 0.0) or 1.0
        return [min(1.0, boosted.get(i, 0.0) / top) for i in item_ids]

    def ranked_in(self, category: str, n: int) -> tuple[list[str], list[float]]:
        """The category's first ``n`` head-or-torso items then its first ``n`` tail
        items (each once), and their :meth:`relative` counts — the same for every user
        until the counts next change, so a turn's users with a category in common
        (and their turn is prepared between two batches) share one computation.

        >>> p = PopularityTracker()
        >>> p.observe("a", "shoes", 2.0, ts=0.0); p.observe("b", "shoes", 1.0, ts=0.0)
        >>> p.refresh(now=0.0); p.ranked_in("shoes", 5)
        (['a', 'b'], [1.0, 0.5])
        >>> p.observe("b", "shoes", 0.5, ts=0.0); p.ranked_in("shoes", 5)  # fresh again
        (['a', 'b'], [1.0, 0.75])
        """
        self._check_memo()
        got = self._memo.get((category, n))
        if got is None:
            items = list(dict.fromkeys(self.top_in(category)[:n] + self.tail_in(category)[:n]))
            got = self._memo[(category, n)] = (items, self.relative_many(items))
        return got

    def ranked_in_by_count(self, category: str, n: int) -> tuple[list[str], list[float]]:
        """:meth:`ranked_in`'s items and relative counts ordered by (−relative count,
        id) — the refresh's order is not the live counts' — so that a score which grows
        with the count never rises along it and a reader that needs only the best few can
        stop early. Shared by a turn's users as :meth:`ranked_in` is.

        >>> p = PopularityTracker()
        >>> for item, w in [("a", 1.0), ("b", 3.0), ("c", 1.0)]:
        ...     p.observe(item, "shoes", w, ts=0.0)
        >>> p.refresh(now=0.0); p.observe("c", "shoes", 3.0, ts=0.0)
        >>> p.ranked_in("shoes", 5)[0], p.ranked_in_by_count("shoes", 5)[0]
        (['b', 'a', 'c'], ['b', 'c', 'a'])
        """
        self._check_memo()
        got = self._by_count_memo.get((category, n))
        if got is None:
            items, rels = self.ranked_in(category, n)
            pairs = sorted([(-r, i) for i, r in zip(items, rels, strict=True)])
            got = self._by_count_memo[(category, n)] = ([i for _, i in pairs],
                                                         [-r for r, _ in pairs])
        return got

    def overall_fill(self, n: int) -> tuple[list[str], list[float], list[str | None]]:
        """The first ``2n`` overall items then the first ``n`` overall tail items (each
        once), their relative counts and categories: what a cold user's list is filled
        from, the same for every user until the counts next change."""
        self._check_memo()
        got = self._fill_memo.get(n)
        if got is None:
            items = list(dict.fromkeys(self._global_top[:2 * n] + self._global_tail[:n]))
            category = self._category.get
            got = self._fill_memo[n] = (items, self.relative_many(items),
                                        [category(i) for i in items])
        return got

    def _check_memo(self) -> None:
        if self._memo_version != self._version:
            self._memo, self._by_count_memo, self._fill_memo = {}, {}, {}
            self._memo_version = self._version

    def top_in(self, category: str) -> list[str]:
        return self._top.get(category, [])

    def tail_in(self, category: str) -> list[str]:
        return self._tail.get(category, [])

    @property
    def global_top(self) -> list[str]:
        return self._global_top

    @property
    def global_tail(self) -> list[str]:
        return self._global_tail

    @property
    def known_items(self) -> int:
        category = self._category  # no union set of the whole catalogue (once a second)
        return len(category) + sum(1 for item in self._boosted if item not in category)

    def tier_sizes(self) -> dict[str, int]:
        sizes = dict.fromkeys(TIERS, 0)
        for t in self._tier.values():
            sizes[t] += 1
        sizes["tail"] += len(self._category.keys() - self._boosted.keys())
        return sizes
