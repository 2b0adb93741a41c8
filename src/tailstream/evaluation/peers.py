"""The well-known peers of ``tailstream eval``: lists from recommenders a user would
compare tailstream with, on the same scored interactions and metrics as the strategies.

Each peer walks the replayed stream in order (:func:`run_peer`): for every ranked
interaction it makes a 20-item list *before* it learns from that interaction
(test-then-train, as every strategy), from the items known at that moment only, without
the user's 5 most recent items (as every strategy). Searches reach the peers at their
place in the stream. The reusable parts live in ``models/serving``; here is the glue.

* ``trending``: :class:`~tailstream.models.serving.trending.Trending`, decayed counts
  with a half-life of ``PeerConfig.trending_half_life`` interactions (10,000 by default:
  the last 10,000 interactions carry half the weight), updated per interaction.
* ``covisitation``: :class:`~tailstream.models.serving.covisitation.Covisitation` over
  the user's recent items, updated per interaction, filled with ``trending``.
* ``als``, ``bpr`` (:mod:`~tailstream.evaluation.factors`): the ``implicit`` library,
  refit after every block on everything so far; users folded in at scoring time.
* ``query_lookup``: :class:`~tailstream.models.serving.query_lookup.QueryLookup` for
  lists that directly follow the user's search, filled with ``trending``; ``trending``
  for every other list.

Every peer fills with ``trending`` (its own copy, updated by the same events), so a peer
never shows fewer items than ``trending`` would. Peers predict no outcome class: their
classification metrics are absent ("—" in the report).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from tailstream.evaluation.results import StrategyResult
from tailstream.evaluation.specs import PeerConfig, StrategySpec
from tailstream.evaluation.stream import Interaction, SearchRecord
from tailstream.models.serving.covisitation import Covisitation
from tailstream.models.serving.query_lookup import QueryLookup
from tailstream.models.serving.trending import Trending

if TYPE_CHECKING:
    from tailstream.evaluation.strategies import Harness


class PeerBase:
    """``trending`` itself, and the base of every peer (which all fill with it).

    The walk calls, in stream order: :meth:`observe_search` for each search,
    :meth:`recommend` for each ranked interaction then :meth:`observe` for every
    interaction, and at each block's end :meth:`flush` then :meth:`end_block`.
    ``t`` is the interaction's number in the stream (the peers' clock).
    """

    def __init__(self, cfg: PeerConfig) -> None:
        self.cfg = cfg
        self.trending = Trending(cfg.trending_half_life, keep=100)

    def observe(self, it: Interaction, t: float) -> None:
        self.trending.observe(it.sample.item_id, t)

    def observe_search(self, search: SearchRecord) -> None:
        """A search (only ``query_lookup`` uses them)."""

    def recommend(self, it: Interaction, exclude: set[str], k: int) -> list[str] | None:
        """The list for ranked interaction ``it``, or None when it is made later, at
        :meth:`flush` (peers that score a whole block at once)."""
        return self.trending.top(k, exclude)

    def flush(self) -> list[list[str]]:
        """The deferred lists, in the order :meth:`recommend` deferred them."""
        return []

    def end_block(self, block: int) -> None:
        """Block ``block`` has been predicted and observed: learn from it."""


class CovisitationPeer(PeerBase):
    def __init__(self, cfg: PeerConfig) -> None:
        super().__init__(cfg)
        self.covis = Covisitation(cfg.covis_half_life, window=cfg.covis_window,
                                  backward=cfg.covis_backward,
                                  neighbours=cfg.covis_neighbours)

    def observe(self, it: Interaction, t: float) -> None:
        super().observe(it, t)
        self.covis.observe(it.sample.user_id, it.sample.item_id, t)

    def recommend(self, it: Interaction, exclude: set[str], k: int) -> list[str] | None:
        recent = (it.profile or {}).get("items", [])[: self.cfg.covis_window]
        ranked = [i for i, _ in self.covis.recommend(recent, k, exclude)]
        return self.trending.fill(ranked, k, exclude)


class QueryLookupPeer(PeerBase):
    def __init__(self, cfg: PeerConfig) -> None:
        super().__init__(cfg)
        self.lookup = QueryLookup(n=cfg.query_ngram, follow=cfg.query_follow,
                                  neighbours=cfg.query_neighbours,
                                  min_similarity=cfg.query_min_similarity)

    def observe(self, it: Interaction, t: float) -> None:
        super().observe(it, t)
        self.lookup.observe(it.sample.user_id, it.sample.item_id)

    def observe_search(self, search: SearchRecord) -> None:
        if search.query:
            self.lookup.observe_search(search.user_id, search.query, search.clicked_item_id)

    def recommend(self, it: Interaction, exclude: set[str], k: int) -> list[str] | None:
        if it.query is None:
            return self.trending.top(k, exclude)
        ranked = [i for i, _ in self.lookup.recommend(it.query, k, exclude)]
        return self.trending.fill(ranked, k, exclude)


def make_peer(name: str, cfg: PeerConfig, seed: int) -> PeerBase:
    """The peer called ``name``."""
    if name in ("als", "bpr"):
        from tailstream.evaluation.factors import FactorPeer

        return FactorPeer(name, cfg, seed)
    peers: dict[str, type[PeerBase]] = {"trending": PeerBase,
                                        "covisitation": CovisitationPeer,
                                        "query_lookup": QueryLookupPeer}
    if name not in peers:
        raise ValueError(f"unknown peer {name!r}")
    return peers[name](cfg)


def run_peer(h: Harness, name: str, spec: StrategySpec) -> StrategyResult:
    """Walk the stream with peer ``name``; its lists for every counted ranked interaction."""
    del spec  # every peer is configured by the run's PeerConfig
    peer = make_peer(name, h.cfg.peers, h.cfg.seed)
    stream, k = h.stream, h.settings.recs_k
    res = StrategyResult(name)
    searches: Iterator[SearchRecord] = iter(stream.searches)
    search = next(searches, None)
    block = 0
    slots: list[tuple[Interaction, list[str] | None]] = []
    for n, it in enumerate(stream.interactions):
        while it.block > block:
            _flush(h, res, peer, slots)
            slots = []
            peer.end_block(block)
            block += 1
        while search is not None and search.position <= n:
            peer.observe_search(search)
            search = next(searches, None)
        if it.ranked and h.counted(it):
            exclude = set((it.profile or {}).get("items", [])[:5])
            slots.append((it, peer.recommend(it, exclude, k)))
        peer.observe(it, float(n))
    _flush(h, res, peer, slots)
    return res


def _flush(h: Harness, res: StrategyResult, peer: PeerBase,
           slots: list[tuple[Interaction, list[str] | None]]) -> None:
    deferred = iter(peer.flush())
    for it, items in slots:
        h.add_list(res, it, items if items is not None else next(deferred))
