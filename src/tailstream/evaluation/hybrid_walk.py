"""The transformer strategies' lists as production makes them (``rank_mode = hybrid``):
the stateful sources walked in stream order, lists from
:func:`~tailstream.models.serving.hybrid.hybrid_recommend`, the online blender taught by
each interaction after its list was made.

Test-then-train throughout: a ranked interaction's sources are read from the
:class:`~tailstream.models.serving.signals.Signals` as they were just before it (the walk
observes every interaction and search in stream order, after reading), its candidates
come only from items known at that moment (the index rows below
:attr:`~tailstream.evaluation.stream.Interaction.known`), and the blender learns from it
only after its list was recorded. The ``category`` source is the replay's own
category × popularity list for that moment (``Interaction.baseline_list``), so no
popularity state needs replaying here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from tailstream import configs
from tailstream.evaluation.stream import Interaction, SearchRecord
from tailstream.models.serving.blend import OnlineBlender
from tailstream.models.serving.hybrid import HybridRequest, hybrid_recommend
from tailstream.models.serving.scorer import ItemInfo, Ranked, Scorer
from tailstream.models.serving.signals import Signals
from tailstream.models.towers.context import UserRequest, context_entries

if TYPE_CHECKING:
    from tailstream.evaluation.strategies import Harness

CHUNK = 256
"""Lists made per batch (the blender learns between batches)."""


class HybridWalk:
    """One strategy's sources and blender, walked block by block."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        settings = harness.settings
        self.recent = 5
        self.signals = Signals(configs.signals_config(settings))
        self.blender = OnlineBlender(lr=settings.rank_blend_lr)
        self.order = harness.stream.known_order()
        self._searches: Iterator[SearchRecord] = iter(harness.stream.searches)
        self._search = next(self._searches, None)
        self.walked = 0

    def block(self, scorer: Scorer, interactions: Sequence[Interaction], item_info: ItemInfo,
              predict: bool) -> list[tuple[Interaction, list[Ranked]]]:
        """Walk one block's interactions; the lists of its ranked ones when ``predict``."""
        pending: list[tuple[Interaction, HybridRequest]] = []
        for it in interactions:
            self._searches_until(self.walked)
            if predict and it.ranked and it.profile is not None:
                pending.append((it, self._request(it)))
            s = it.sample
            self.signals.observe_interaction(s.user_id, s.item_id, s.label)
            self.walked += 1
        out: list[tuple[Interaction, list[Ranked]]] = []
        for start in range(0, len(pending), CHUNK):
            chunk = pending[start:start + CHUNK]
            lists = hybrid_recommend(scorer, [r for _, r in chunk], item_info, self.blender)
            for (it, _), made in zip(chunk, lists, strict=True):
                out.append((it, made.ranked))
                self.blender.learn(made.candidates.x,
                                   made.candidates.row(it.sample.item_id))
        return out

    def _searches_until(self, position: int) -> None:
        while self._search is not None and self._search.position <= position:
            s = self._search
            self.signals.observe_search(s.user_id, s.query, s.clicked_item_id)
            self._search = next(self._searches, None)

    def _request(self, it: Interaction) -> HybridRequest:
        profile = it.profile or {}
        order, limit = self.order, it.known

        def known(item: str) -> bool:
            return order.get(item, limit) < limit

        sources = self.signals.sources(profile, now=it.sample.ts, known=known)
        if it.baseline_list:
            sources["category"] = [i for i in it.baseline_list if known(i)]
        request = UserRequest(it.sample.user_id,
                              context_entries(profile, self.h.stream.item_text,
                                              self.h.settings.max_context),
                              set(profile.get("items", [])[:self.recent]))
        return HybridRequest(request, sources, dict(profile.get("cats", {})),
                             query=self.signals.last_query(profile, it.sample.ts),
                             known=limit)
