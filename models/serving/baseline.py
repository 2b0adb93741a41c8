"""Baseline recommender: decayed category affinity × popularity, with a guaranteed tail share.

Stands in until the transformer scorer lands; it goes through the same publish path.

User profile (a plain dict, so it serialises into a Faust table):
``{"cats": {category: weight}, "why": {category: reason}, "items": [recent item ids],
"queries": [recent queries], "ts": last event time or None, "n": {class: events}}``.

Score of item *i* in category *c* for user *u*:
``s(u, i) = a_u(c) / max_c a_u(c) · (0.5 + 0.5 · pop(i))`` with ``pop`` the decayed
count relative to the most popular item. Affinity ``a_u`` decays with a half-life, so
interests follow the session. Event classes weigh more the deeper in the funnel they are.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import islice
from typing import Any

from tailstream.contract import Event, display_text
from tailstream.models.serving.popularity import PopularityTracker

EVENT_WEIGHT: dict[str, float] = {"click": 1.0, "search": 1.0, "fav": 2.0, "cart": 3.0,
                                  "purchase": 4.0}
"""How much one event of each class moves the user's category affinity."""

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    """Lower-case alphanumeric tokens of at least 3 characters.

    >>> tokens("Aurora Wireless ear-buds X2")
    ['aurora', 'wireless', 'ear', 'buds']
    """
    return [t for t in _TOKEN.findall(text.lower()) if len(t) >= 3]


class QueryIndex:
    """Token → category counts from catalogue titles, to read intent from search queries."""

    def __init__(self) -> None:
        self._cats: dict[str, Counter[str]] = defaultdict(Counter)
        self._by_prefix: dict[str, str] = {}
        """The first token seen with each 4-character prefix: an unknown query token's
        stand-in, found in one look-up (a scan of every known token, as before, cost a
        search event ~1 µs per token of the catalogue's vocabulary)."""

    def add(self, title: str, category: str) -> None:
        for tok in set(tokens(title)) | set(tokens(category)):
            self._cats[tok][category] += 1
            if len(tok) >= 4:
                self._by_prefix.setdefault(tok[:4], tok)

    def categories(self, query: str, n: int = 3) -> list[str]:
        """Most likely categories for a query (prefix match tolerates short typos: an
        unknown token of 4+ characters reads the first known token with its first 4).

        >>> index = QueryIndex()
        >>> index.add("Wireless earbuds", "audio"); index.add("Wired mouse", "computers")
        >>> index.categories("wirelss earbds"), index.categories("wirexx")
        (['audio'], ['audio'])
        """
        scores: Counter[str] = Counter()
        for tok in tokens(query):
            hits = self._cats.get(tok)
            if hits is None and len(tok) >= 4:
                first = self._by_prefix.get(tok[:4])
                if first is not None:
                    hits = self._cats[first]
            if hits:
                total = sum(hits.values())
                for cat, c in hits.items():
                    scores[cat] += round(1000 * c / total)
        return [c for c, _ in scores.most_common(n)]


def new_profile() -> dict[str, Any]:
    return {"cats": {}, "why": {}, "items": [], "queries": [], "ctx": [], "ts": None, "n": {}}


@functools.lru_cache(maxsize=16_384)
def _viewed(item_id: str) -> str:
    """The reason a viewed item gives its category (cached: the same items recur, and
    making a display text walks every character)."""
    return f"similar to item {display_text(item_id, 40)} you viewed"


def update_profile(profile: dict[str, Any], event: Event, category: str | None,
                   query_categories: list[str], *, keep: int = 20,
                   half_life_s: float = 1800.0) -> dict[str, Any]:
    """Fold one event into a profile (returns a new dict; the input is not modified).

    >>> p = update_profile(new_profile(), Event("click", "e1", "u1", 100.0, item_id="i1"),
    ...                    "shoes", [])
    >>> p["cats"], p["items"], p["ctx"]
    ({'shoes': 1.0}, ['i1'], [['i', 'i1', 'click']])
    >>> update_profile(p, Event("cart", "e2", "u1", 101.0, item_id="i1"), "shoes", [])["ctx"]
    [['i', 'i1', 'cart']]
    """
    last = event.ts if profile.get("ts") is None else float(profile["ts"])
    gap = event.ts - last
    decay = math.pow(2.0, -gap / half_life_s) if gap > 0 else 1.0
    cats = {c: v for c, w in profile.get("cats", {}).items() if (v := w * decay) > 0.01}
    items = list(profile.get("items", []))
    queries = list(profile.get("queries", []))
    weight = EVENT_WEIGHT.get(event.kind, 1.0)
    ctx = _context(profile.get("ctx", []), event, weight, keep)
    reasons: dict[str, str] = {}
    if event.kind == "search" and event.query is not None:
        queries = ([event.query] + [q for q in queries if q != event.query])[:keep]
        if query_categories:  # one display text for all of them (it walks every character)
            reason = f"matches your search '{display_text(event.query, 40)}'"
            for rank, cat in enumerate(query_categories):
                cats[cat] = cats.get(cat, 0.0) + weight / (rank + 1)
                reasons[cat] = reason
    elif event.item_id is not None:
        items = ([event.item_id] + [i for i in items if i != event.item_id])[:keep]
        if category is not None:
            cats[category] = cats.get(category, 0.0) + weight
            reasons[category] = _viewed(event.item_id)
    # Bound the profile: keep the strongest categories only.
    if len(cats) > keep:
        cats = dict(sorted(cats.items(), key=lambda kv: kv[1], reverse=True)[:keep])
    # The kept categories' reasons, the old ones in their places and new ones after.
    why = {c: r for c, r in profile.get("why", {}).items() if c in cats}
    for c, r in reasons.items():
        if c in cats:
            why[c] = r
    n = dict(profile.get("n", {}))
    n[event.kind] = n.get(event.kind, 0) + 1
    return {"cats": cats, "why": why, "items": items, "queries": queries, "ctx": ctx,
            "ts": max(event.ts, last), "n": n}


def _context(ctx: list[list[str]], event: Event, weight: float, keep: int
             ) -> list[list[str]]:
    """Queries and items in one recency order, what the user tower reads: ``["q", query]``
    or ``["i", item, kind]``, the event's entry first. An item the user acted on before
    moves to the front with the stronger of its two kinds (a click after a cart stays a
    cart: the head's typed target attention reads "in the cart", which a later look at
    the item does not undo). Entries of two elements (profiles from before kinds) are
    clicks."""
    if event.kind == "search":
        if event.query is None:
            return ctx[:keep]
        entry = ["q", event.query]
        return [entry] + [e for e in ctx if e[1] != event.query or e[0] != "q"][:keep - 1]
    item = event.item_id
    if item is None:
        return ctx[:keep]
    kind = event.kind
    rest = []
    for e in ctx:
        if e[1] == item and e[0] == "i":
            if len(e) > 2 and EVENT_WEIGHT.get(e[2], 1.0) > weight:
                kind = e[2]
        else:
            rest.append(e)
    return [["i", item, kind]] + rest[:keep - 1]


@dataclass(frozen=True, slots=True)
class Recommendation:
    item_id: str
    score: float
    tier: str
    reason: str
    category: str | None

    def to_dict(self, rank: int) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": round(self.score, 6), "rank": rank,
                "tier": self.tier, "reason": self.reason, "category": self.category}


Scored = dict[str, tuple[float, str | None, bool]]
"""item → (score, its category, whether it came from the overall fill)."""


def _scored(profile: dict[str, Any], pop: PopularityTracker, k: int,
            best_only: bool = False) -> Scored:
    """The candidates of a profile and their scores (the module docstring's formula):
    the best ``2k`` head-or-torso and ``2k`` tail items of each of the user's five
    strongest categories, and, for a cold or narrow user with fewer than ``k``, what is
    trending overall at a tenth of the weight. The user's last five items are left out.

    ``best_only``: only candidates that can be among the best ``k`` by (−score, id).
    A category's items are read by descending count (:meth:`~PopularityTracker.
    ranked_in_by_count`), along which the score never rises (``rel ≥ 0`` times a
    non-decreasing function of the count, rounding included), so once ``k`` of its
    items are in, a later one with a lower score has ``k`` better ones and is skipped;
    equal scores are kept for the id order. Categories share no item (each item is
    ranked in its one category at a refresh), and the fill is needed exactly when no
    category reached ``k``, so the best ``k`` and the fill are what the whole set gives."""
    cats: dict[str, float] = profile.get("cats", {})
    seen = set(profile.get("items", [])[:5])  # do not echo what the user just looked at
    # Plain tuples while ranking (hundreds of candidates per user, on the ingest path);
    # reasons and Recommendation objects only for the k chosen.
    candidates: Scored = {}
    top_aff = max(cats.values(), default=0.0)
    for cat, aff in sorted(cats.items(), key=lambda kv: kv[1], reverse=True)[:5]:
        rel = aff / top_aff if top_aff else 0.0
        if best_only and rel >= 0:
            _best_of(candidates, seen, cat, rel, *pop.ranked_in_by_count(cat, 2 * k), k)
            continue
        items, rels = pop.ranked_in(cat, 2 * k)
        for item, r in zip(items, rels, strict=True):
            if item not in seen and item not in candidates:  # each item once in `items`
                candidates[item] = (rel * (0.5 + 0.5 * r), cat, False)
    if len(candidates) < k:  # cold or narrow user: fill from what is trending overall
        for item, r, category in zip(*pop.overall_fill(k), strict=True):
            if item not in seen and item not in candidates:
                candidates[item] = (0.1 * (0.5 + 0.5 * r), category, True)
    return candidates


def _best_of(candidates: Scored, seen: set[str], cat: str, rel: float, items: list[str],
             rels: list[float], k: int) -> None:
    """Add the category's candidates that can be among the best ``k`` (see
    :func:`_scored`): its first ``k`` unseen items by count, and those after them that
    tie the ``k``-th's score."""
    taken, last = 0, 0.0
    for item, r in zip(items, rels, strict=True):
        if item in seen or item in candidates:
            continue
        score = rel * (0.5 + 0.5 * r)
        if taken >= k and score < last:
            return
        candidates[item] = (score, cat, False)
        taken, last = taken + 1, score


def _order(candidates: Scored) -> list[str]:
    """Candidates by descending score, ties by id — the same keys as
    ``key=lambda i: (-score, i)``, sorted as plain tuples: no Python call per candidate."""
    return [i for _, i in sorted([(-v[0], i) for i, v in candidates.items()])]


def ranked_by_affinity(profile: dict[str, Any], pop: PopularityTracker, k: int
                       ) -> list[str]:
    """The ids of :func:`recommend`'s list without a tail quota (``tail_share=0``): the
    first ``k`` candidates by score. What the hybrid lists' ``category`` source reads for
    every user of a turn — without a reason, a tier or an object per item.

    >>> p = PopularityTracker()
    >>> for item, w in [("a", 3.0), ("b", 1.0), ("c", 2.0)]:
    ...     p.observe(item, "shoes", w, ts=0.0)
    >>> p.refresh(now=0.0)
    >>> ranked_by_affinity({"cats": {"shoes": 1.0}, "items": ["c"]}, p, k=2)
    ['a', 'b']
    """
    return _order(_scored(profile, pop, k, best_only=True))[:k]


def recommend(profile: dict[str, Any], pop: PopularityTracker, k: int = 20,
              tail_share: float = 0.3) -> list[Recommendation]:
    """Top-``k`` list for a profile, at least ``ceil(tail_share·k)`` tail items when
    the user's categories have any.

    Tail slots are filled with the best-scoring tail items; the remaining slots take
    the best items overall, so a clearly better head item is never displaced by
    more than the tail quota.
    """
    candidates = _scored(profile, pop, k)
    order = _order(candidates)
    quota = math.ceil(tail_share * k)
    tier = pop.tier
    # Walk only as far as needed: the tier of every candidate had been looked up to take
    # a few of them.
    tail = list(islice((i for i in order if tier(i) == "tail"), quota)) if quota > 0 else []
    chosen = set(tail)
    rest = (i for i in order if i not in chosen)
    room = k - len(tail)
    picked = set(tail + (list(islice(rest, room)) if room >= 0 else list(rest)[:room]))
    why: dict[str, str] = profile.get("why", {})
    reasons: dict[tuple[str | None, bool], str] = {}  # display_text walks the text
    out: list[Recommendation] = []
    for i in order:
        if len(out) == len(picked):
            break
        if i in picked:
            score, category, filled = candidates[i]
            reason = reasons.get((category, filled))
            if reason is None:
                reason = reasons[(category, filled)] = _reason(category, filled, why)
            out.append(Recommendation(i, score, tier(i), reason, category))
    return out


def _reason(category: str | None, filled: bool, why: dict[str, str]) -> str:
    """Why an item of ``category`` is in a baseline list: the profile's own reason for a
    category of the user's, else what is trending (``filled``: the overall fill)."""
    if not filled:  # a category of the user's, never None
        return why[category] if category in why else \
            f"trending in {display_text(category or '', 40)}"
    return f"trending in {display_text(category, 40)}" if category else "trending"


def with_tail_share(ranked: list[Recommendation], k: int,
                    tail_share: float) -> list[Recommendation]:
    """Take the top ``k`` of ``ranked`` but reserve ``ceil(tail_share·k)`` slots for tail items.

    >>> r = [Recommendation(str(i), 1 - i / 10, "head" if i < 8 else "tail", "", None)
    ...      for i in range(10)]
    >>> [x.item_id for x in with_tail_share(r, 4, 0.5)]
    ['0', '1', '8', '9']
    """
    quota = math.ceil(tail_share * k)
    tail = [r for r in ranked if r.tier == "tail"][:quota]
    chosen = {r.item_id for r in tail}
    rest = [r for r in ranked if r.item_id not in chosen][: k - len(tail)]
    return sorted(tail + rest, key=lambda r: (-r.score, r.item_id))
