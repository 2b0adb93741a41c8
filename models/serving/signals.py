"""The stateful candidate sources beside the towers, updated per event: trending items,
item co-visitation, query → item lookups, and (from the user's profile and the popularity
state) the user's categories and own older items.

One :class:`Signals` per worker (and per strategy in ``tailstream eval``), fed every valid
event in order; :meth:`Signals.sources` gives, for one user at one moment, each source's
ranked candidates, which :mod:`~tailstream.models.serving.blend` unites and scores. Every
source reads only what happened before the call, so a list never holds an item from its
own future.

Windows are counted in interactions, not seconds (as the evaluation's peers count them):
a replayed log compresses hours into minutes, and a shop's rate varies by the hour, but
"the last 10,000 interactions" means the same on every stream. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tailstream.configs import SignalsConfig
from tailstream.contract import SEARCH, Event
from tailstream.models.serving.baseline import EVENT_WEIGHT, ranked_by_affinity
from tailstream.models.serving.covisitation import Covisitation
from tailstream.models.serving.popularity import PopularityTracker
from tailstream.models.serving.query_lookup import QueryLookup
from tailstream.models.serving.trending import Trending


class Signals:
    """Trending, co-visitation and query lookups over the stream, plus the user's
    categories and history from their profile.

    >>> s = Signals(SignalsConfig(depth=3))
    >>> from tailstream.contract import Event
    >>> for n, (u, i) in enumerate([("u1", "a"), ("u1", "b"), ("u2", "a")]):
    ...     s.observe(Event("click", f"e{n}", u, float(n), item_id=i))
    >>> s.sources({"items": ["a"], "ctx": [["i", "a"]]}, now=3.0)["covisitation"]
    ['b']
    """

    def __init__(self, cfg: SignalsConfig, popularity: PopularityTracker | None = None
                 ) -> None:
        self.cfg = cfg
        self.popularity = popularity
        self.trending = Trending(cfg.trending_half_life, keep=max(cfg.depth, 100))
        self.covisitation = Covisitation(cfg.covisitation_half_life,
                                         window=cfg.covisitation_window)
        self.queries = QueryLookup()
        self.interactions = 0
        """The clock of the windows."""

    def observe(self, event: Event) -> None:
        """One valid, de-duplicated event, in time order."""
        if event.kind == SEARCH:
            if event.query:
                self.observe_search(event.user_id, event.query, event.clicked_item_id)
        elif event.item_id is not None:
            self.observe_interaction(event.user_id, event.item_id, event.kind)

    def observe_search(self, user_id: str, query: str, clicked: str | None = None) -> None:
        self.queries.observe_search(user_id, query, clicked)

    def observe_interaction(self, user_id: str, item_id: str, kind: str) -> None:
        weight = EVENT_WEIGHT.get(kind, 1.0)
        self.interactions += 1
        t = float(self.interactions)
        self.trending.observe(item_id, t, weight)
        self.covisitation.observe(user_id, item_id, t, weight)
        self.queries.observe(user_id, item_id)

    def last_query(self, profile: Mapping[str, Any], now: float) -> str | None:
        """The user's query if their last action was a search, recent enough to steer."""
        ctx = profile.get("ctx") or []
        if not ctx or ctx[0][0] != "q":
            return None
        ts = profile.get("ts")
        if ts is not None and now - float(ts) > self.cfg.query_follow_s:
            return None
        return str(ctx[0][1])

    def sources(self, profile: Mapping[str, Any], *, now: float,
                known: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
        """Each source's ranked candidates for the user with ``profile`` at ``now`` (the
        user's recent items left out; ``known`` filters to items known at this moment)."""
        depth = self.cfg.depth
        items: list[str] = list(profile.get("items", []))
        recent, older = items[:self.cfg.recent], items[self.cfg.recent:]
        exclude = set(recent)
        out: dict[str, list[str]] = {
            "trending": self.trending.top(depth, exclude),
            "covisitation": [i for i, _ in self.covisitation.recommend(recent, depth,
                                                                      exclude)],
            "history": older[:depth],
        }
        if self.popularity is not None and profile.get("cats"):
            out["category"] = [i for i in ranked_by_affinity(dict(profile), self.popularity,
                                                             depth) if i not in exclude]
        query = self.last_query(profile, now)
        if query is not None:
            out["query_lookup"] = [i for i, _ in self.queries.recommend(query, depth,
                                                                        exclude)]
        if known is not None:
            out = {s: [i for i in ids if known(i)] for s, ids in out.items()}
        return out
