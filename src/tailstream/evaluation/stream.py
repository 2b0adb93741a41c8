"""The replay of an event log through the worker's own per-event state, once, for every
strategy of ``tailstream eval``.

:func:`collect` drives :class:`~tailstream.streams.worker.state.StreamState` (profiles,
contexts, popularity tiers, the imbalance loop and its minority buffer — the production
code) over the log in time order, and cuts the interactions into ``blocks`` of equal
size. For each interaction it keeps what a strategy may use when predicting it (the
profile *before* the event, the river fast path's prediction made before learning from
it, the baseline's list), and at the end of each block the loop's state
(:class:`BlockState`: what the strategies train on, and the policy and weights the loop
would have published).

**What is known, and when (the leak-free protocol).** An item becomes *known* when it is
interacted with (after that event) or when a catalogue record announces it (from that
record on). Known items get sequential numbers in the order they became known
(:attr:`Stream.known_ids`), and every interaction records how many items were known just
before it (:attr:`Interaction.known`): a strategy scoring that interaction may rank only
items numbered below it. A catalogue record that a reader emits right in front of the
first event of its item, with that event's time stamp (what ``LogReader`` does for logs
without a catalogue: Taobao, REES46), describes the item of that event rather than
announcing it: its text is applied, but the item becomes known only with the event.
Searches are kept (:attr:`Stream.searches`), and an interaction that directly follows the
same user's search records the query (:attr:`Interaction.query`). A search's
``clicked_item_id`` is the answer to the list that follows the search, so it makes its
item known only after the user's next event (the click itself, in a shop that logs it).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tailstream import configs
from tailstream.configs import Policy
from tailstream.contract import CATALOGUE, SEARCH, Event, Item, validate_event, validate_item
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.serving.baseline import new_profile, recommend
from tailstream.producers.records import ProducedRecord
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import LiveWeights
from tailstream.streams.worker.state import StreamState


@dataclass
class Interaction:
    sample: Sample
    block: int
    tier: str
    category: str | None
    online: dict[str, float] | None  # the river fast path's prediction before learning
    baseline_list: list[str] | None  # the baseline recommender's list (ranked events)
    profile: dict[str, Any] | None  # the profile before the event (ranked events)
    ranked: bool
    known: int = 0
    """Items known just before this interaction: strategies may rank known items numbered
    ``< known`` only (:attr:`Stream.known_ids`)."""
    target_known: bool = True
    """Whether the interacted item was known before (a cold target can never be hit)."""
    query: str | None = None
    """The query of the user's search when this interaction directly follows it."""


@dataclass(frozen=True)
class SearchRecord:
    """A search in the replay, after ``position`` interactions."""

    position: int
    user_id: str
    ts: float
    query: str
    clicked_item_id: str | None = None
    result_item_ids: tuple[str, ...] = ()


@dataclass
class BlockState:
    """The loop's state at the end of a block: what strategies train on."""

    buffer: list[Sample]
    decayed_counts: dict[str, float]
    weights: dict[str, float]
    shares: dict[str, float]
    tiers: dict[str, str]
    item_counts: dict[str, float]
    requests: list[dict[str, Any]]
    policy: Policy
    """The loop's policy (the settings' own: the worker decides it)."""

    @property
    def live(self) -> LiveWeights:
        """What the worker would have published for the trainer at this moment."""
        return LiveWeights(self.policy, dict(self.weights), dict(self.decayed_counts), 0.0)


@dataclass
class Stream:
    interactions: list[Interaction]
    blocks: list[BlockState]
    item_text: dict[str, str]
    categories: dict[str, str | None]
    items_by_block: list[list[str]]  # items first interacted with in each block
    catalogue: list[str]  # catalogue records known before the first event
    known_ids: list[str] = field(default_factory=list)
    """Every item that became known, in the order it did (its index is its number)."""
    searches: list[SearchRecord] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def known_order(self) -> dict[str, int]:
        """``item → its number in`` :attr:`known_ids`."""
        return {item: n for n, item in enumerate(self.known_ids)}


@dataclass(frozen=True)
class CatalogueRecord:
    """A catalogue record in the replay, before event number ``position``."""

    position: int
    item: Item
    describes: bool = False
    """True when it only describes the item of the event right after it (see the module
    docstring): the item is not known before that event."""


def read_records(records: Iterable[ProducedRecord], settings: Settings,
                 max_events: int | None = None) -> tuple[list[Event], list[CatalogueRecord]]:
    """Validated events in time order, and catalogue records with the number of events
    before each (see :func:`in_time_order`)."""
    limits = configs.limits(settings, future_skew=False)
    events: list[Event] = []
    items: list[CatalogueRecord] = []
    just_before: list[tuple[int, float | None]] = []  # records since the last event
    for rec in records:
        if rec.malformed:
            continue
        value = json.loads(rec.value)
        if rec.kind == CATALOGUE:
            just_before.append((len(items), rec.ts))
            items.append(CatalogueRecord(len(events), validate_item(value, limits)))
            continue
        event = validate_event(rec.kind, value, limits)
        for n, ts in just_before:
            if items[n].item.item_id == event.item_id and ts is not None and ts >= event.ts:
                items[n] = CatalogueRecord(items[n].position, items[n].item, describes=True)
        just_before = []
        events.append(event)
        if max_events is not None and len(events) >= max_events:
            break
    return in_time_order(events, items)


def in_time_order(events: list[Event], items: list[CatalogueRecord]
                  ) -> tuple[list[Event], list[CatalogueRecord]]:
    """The events sorted by time (stable: ties keep the file's order), each catalogue
    record moved with the event that followed it in the file.

    Real logs come in many orders — by user, by session, by shard, merged from partitions —
    and a test-then-train replay in file order would train on the future of the events it
    tests later. Sorting here (the evaluation holds the whole log anyway) makes the
    protocol leak-free whatever the order; a log already in time order is unchanged.

    >>> lim = configs.limits(Settings(), future_skew=False)
    >>> ev = [validate_event("click", {"event_id": name, "user_id": "u", "ts": 1.7e9 + t,
    ...                                "item_id": "i"}, lim) for name, t in [("b", 9), ("a", 3)]]
    >>> [e.event_id for e in in_time_order(ev, [])[0]]
    ['a', 'b']
    """
    order = sorted(range(len(events)), key=lambda i: events[i].ts)
    if all(i == n for n, i in enumerate(order)):
        return events, items
    new_index = {old: new for new, old in enumerate(order)}
    new_index[len(events)] = len(events)  # records after the last event stay last
    moved = sorted(enumerate(items), key=lambda pair: (new_index[pair[1].position], pair[0]))
    return ([events[i] for i in order],
            [CatalogueRecord(new_index[rec.position], rec.item, rec.describes)
             for _, rec in moved])


def collect(records: Iterable[ProducedRecord], settings: Settings, *, blocks: int,
            rank_every: int, max_events: int | None = None,
            progress: Callable[[int], None] | None = None) -> Stream:
    """Replay ``records`` through the worker's state once; cut into ``blocks``."""
    events, items = read_records(records, settings, max_events)
    # Every event gets a fast-path prediction (the worker subsamples clicks to save CPU).
    settings = settings.replace(online_majority_rate=1.0)
    n_inter = sum(e.kind != SEARCH for e in events)
    replay = _Replay(settings, blocks, max(1, math.ceil(n_inter / blocks)), rank_every,
                     items)
    for i, event in enumerate(events):
        if replay.step(i, event) and progress is not None:
            progress(1)
    return replay.finish()


class _Replay:
    """The state of one :func:`collect`: per event, then per block."""

    def __init__(self, settings: Settings, blocks: int, per_block: int, rank_every: int,
                 items: list[CatalogueRecord]) -> None:
        self.settings = settings
        self.blocks, self.per_block, self.rank_every = blocks, per_block, rank_every
        self.now = 0.0
        self.profiles: dict[str, Any] = {}
        self.state = StreamState(settings, self.profiles)
        self.state.imbalance.clock = lambda: self.now  # cooldowns in event time: replays agree
        self.items = iter(items)
        self.pending = next(self.items, None)
        self.catalogue: list[str] = []
        self.interactions: list[Interaction] = []
        self.out_blocks: list[BlockState] = []
        self.seen: set[str] = set()
        self.items_by_block: list[list[str]] = [[]]
        self.requests: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.k = 0  # interactions so far
        self.known: dict[str, int] = {}  # item → the order in which it became known
        self.searches: list[SearchRecord] = []
        self.after_search: dict[str, str] = {}  # user → query, while it is their last event
        self.clicked: dict[str, str] = {}  # user → their last search's clicked item

    def _know(self, item_id: str | None) -> None:
        if item_id is not None and item_id not in self.known:
            self.known[item_id] = len(self.known)

    def _catalogue_until(self, i: int) -> list[Item]:
        """Apply the catalogue records due before event ``i`` that announce items (they are
        known from now on); return the ones that only describe event ``i``'s item."""
        described: list[Item] = []
        while self.pending is not None and self.pending.position <= i:
            rec = self.pending
            if rec.describes:
                described.append(rec.item)
            else:
                self.state.apply_item(rec.item)
                self._know(rec.item.item_id)
                if not self.interactions:
                    self.catalogue.append(rec.item.item_id)
            self.pending = next(self.items, None)
        return described

    def step(self, i: int, event: Event) -> bool:
        """Apply the ``i``-th event (and the catalogue records before it); True when it
        was an interaction."""
        state, s = self.state, self.settings
        described = self._catalogue_until(i)
        self.now = event.ts
        block = min(self.k // self.per_block, self.blocks - 1)
        before = self.profiles.get(event.user_id) or new_profile()
        # Lists leave out what the user just interacted with, so repeat interactions are
        # not ranking targets (they are counted, not scored).
        repeat = event.item_id in before.get("items", [])[:5]
        ranked = event.kind != SEARCH and self.k % self.rank_every == 0 and not repeat
        base_list = ([r.item_id for r in recommend(before, state.popularity, k=s.recs_k,
                                                   tail_share=s.tail_share)]
                     if ranked else None)
        known = len(self.known)
        for item in described:  # the event's own item: its text, not yet its existence
            state.apply_item(item)
        tier = state.imbalance.tiers.get(event.item_id or "", "tail")
        sample = state.apply_event(event, partition=0)
        query = self._follow_search(event)
        if sample is not None:
            if sample.item_id not in self.seen:
                self.seen.add(sample.item_id)
                self.items_by_block[-1].append(sample.item_id)
            self.counts[sample.item_id] += 1
            self.interactions.append(Interaction(
                sample, block, tier, state.popularity.category(sample.item_id),
                state.imbalance.last_proba, base_list, before if ranked else None, ranked,
                known=known, target_known=sample.item_id in self.known, query=query))
            self.k += 1
        self._know(self.clicked.pop(event.user_id, None))  # clicked in their last search
        if event.kind == SEARCH:
            if event.clicked_item_id is not None:
                self.clicked[event.user_id] = event.clicked_item_id
        else:
            self._know(event.item_id)
        if i % s.batch_size == s.batch_size - 1:
            state.popularity.refresh(event.ts)
            self._end_batch()
        if sample is not None and self.k % self.per_block == 0 and \
                len(self.out_blocks) < self.blocks:
            self._close_block()
            self.items_by_block.append([])
        return sample is not None

    def _follow_search(self, event: Event) -> str | None:
        """Record a search; for an interaction, the query of the search it directly
        follows (the user's previous event), if any."""
        if event.kind != SEARCH:
            return self.after_search.pop(event.user_id, None)
        query = event.query or ""
        self.searches.append(SearchRecord(self.k, event.user_id, event.ts, query,
                                          event.clicked_item_id, event.result_item_ids))
        self.after_search[event.user_id] = query
        return None

    def _end_batch(self) -> None:
        request = self.state.imbalance.end_batch()
        if request is not None:
            self.requests.append(request)

    def _close_block(self) -> None:
        self._end_batch()
        loop = self.state.imbalance
        self.out_blocks.append(BlockState(
            buffer=loop.buffer.all(), decayed_counts=loop.decayed_counts(),
            weights=dict(loop.weights), shares=loop.shares, tiers=dict(loop.tiers),
            item_counts=dict(self.counts), requests=list(self.requests), policy=loop.policy))
        self.requests = []

    def finish(self) -> Stream:
        if self.k % self.per_block and len(self.out_blocks) < self.blocks:
            self._close_block()
        state = self.state
        return Stream(self.interactions, self.out_blocks, dict(state.item_text),
                      {i: state.popularity.category(i) for i in state.item_text},
                      self.items_by_block[:len(self.out_blocks)], self.catalogue,
                      list(self.known), self.searches)
