"""The per-event state of a worker, without any I/O: what one valid event changes.

Catalogue records update item texts, categories and the query index; interactions and
searches update the user's profile (a changelog-backed table in the worker, a dict
offline), item popularity and the imbalance loop, which turns each interaction into a
training sample. The pipeline wraps this with decoding, de-duplication and publishing;
the offline evaluation (``tailstream eval``) drives it directly, so both see the same
contexts, tiers and samples.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

from tailstream.contract import INTERACTION_KINDS, SEARCH, Event, Item
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.features import item_columns, joined_vector, user_columns
from tailstream.models.serving.baseline import QueryIndex, new_profile, update_profile
from tailstream.models.serving.popularity import PopularityTracker
from tailstream.models.serving.signals import Signals
from tailstream.models.towers.context import ContextEntry, context_entries, sample_context
from tailstream.settings import Settings
from tailstream.streams.worker.imbalance import ImbalanceLoop, Observation

NewItem = Callable[[str, str], None]
RemovedItem = Callable[[str], None]


class StreamState:
    def __init__(self, settings: Settings, profiles: MutableMapping[str, Any], *,
                 popularity: PopularityTracker | None = None,
                 imbalance: ImbalanceLoop | None = None,
                 on_new_item: NewItem | None = None,
                 on_removed_item: RemovedItem | None = None,
                 signals: Signals | None = None) -> None:
        self.settings = settings
        self.signals = signals
        """The hybrid lists' stateful sources (trending, co-visitation, query lookup),
        fed every applied event here; None where nothing makes hybrid lists."""
        self.profiles = profiles
        self.popularity = popularity or PopularityTracker()
        self.imbalance = imbalance or ImbalanceLoop(settings)
        self.query_index = QueryIndex()
        self.item_text: dict[str, str] = {}
        self.on_new_item = on_new_item
        self.on_removed_item = on_removed_item
        # Deleted items (catalogue tombstones) stay out of lists even if stale clients still
        # send events for them; a new catalogue record brings one back.
        self.deleted: set[str] = set()

    def apply_item(self, item: Item) -> str:
        """A catalogue record; returns the item's text (what the item tower reads)."""
        self.deleted.discard(item.item_id)
        self.popularity.set_category(item.item_id, item.category)
        self.query_index.add(item.title, item.category)
        self.imbalance.know_price(item.item_id, item.price)
        text = item_text(item)
        self.item_text[item.item_id] = text
        if self.on_new_item is not None:
            self.on_new_item(item.item_id, text)
        return text

    def remove_item(self, item_id: str) -> bool:
        """A catalogue tombstone: the item leaves the catalogue, the popularity rankings
        and (through ``on_removed_item``) the index; True if it was known."""
        known = self.item_text.pop(item_id, None) is not None
        self.popularity.forget(item_id)
        self.imbalance.forget_price(item_id)
        self.deleted.add(item_id)
        if self.on_removed_item is not None:
            self.on_removed_item(item_id)
        return known

    def apply_event(self, event: Event, partition: int = 0) -> Sample | None:
        """A valid, de-duplicated event; returns its training sample (None for searches)."""
        category = event.category
        deleted = event.item_id in self.deleted
        if event.item_id is not None:
            category = category or self.popularity.category(event.item_id)
            if not deleted:  # a deleted item's events count, but never make it popular
                self.popularity.observe(event.item_id, category, 1.0, event.ts)
        query_cats: list[str] = []
        if event.kind == "search" and event.query:
            query_cats = self.query_index.categories(event.query)
            if event.clicked_item_id is not None:
                clicked = self.popularity.category(event.clicked_item_id)
                if clicked is not None:
                    query_cats = [clicked, *[c for c in query_cats if c != clicked]]
        profile = self.profiles.get(event.user_id) or new_profile()
        sample: Sample | None = None
        if event.item_id is not None:
            text = self.item_text.get(event.item_id)
            if text is None:
                text = fallback_text(event, category)
                # An item seen in events before (or without) a catalogue record: index it
                # under a stable textual form so it can be recommended too (unless deleted).
                if not deleted:
                    self.item_text[event.item_id] = text
                    if self.on_new_item is not None:
                        self.on_new_item(event.item_id, text)
            user_text, user_kinds = self._user_context(profile)
            affinity, repeat = user_item_context(profile, category, event.item_id)
            sample = self.imbalance.observe(
                event, partition, user_class_counts=profile.get("n", {}),
                category_affinity=affinity, repeat=repeat,
                item_text=text, user_text=user_text, user_kinds=user_kinds)
        else:
            self.imbalance.observe(event, partition, user_class_counts={},
                                   category_affinity=0.0, repeat=False)
        self.profiles[event.user_id] = update_profile(
            profile, event, category, query_cats, keep=self.settings.recent_items)
        if self.signals is not None and not deleted:
            self.signals.observe(event)
        return sample

    def apply_batch(self, events: Sequence[tuple[Event, int]]) -> list[tuple[int, Exception]]:
        """Valid, de-duplicated events (with their source partitions), in order: what
        :meth:`apply_event` does for each, with the imbalance loop's share done once for
        the batch (:meth:`ImbalanceLoop.observe_batch`: counts and sketches aggregated, the
        fast path subsampled, samples built only for the events the buffer keeps).

        Profiles, popularity and the catalogue change event by event, as in
        :meth:`apply_event`. Returns the events that failed (index, exception): their
        effects are left out and the rest of the batch is applied."""
        failures: list[tuple[int, Exception]] = []
        observed: list[Observation] = []
        for n, (event, partition) in enumerate(events):
            try:
                ob = self._apply_one(event, partition)
            except Exception as exc:  # the caller dead-letters it; its neighbours go on
                failures.append((n, exc))
                continue
            if ob is not None:
                observed.append(ob)
            elif event.kind == SEARCH:
                self.imbalance.searches += 1
        self.imbalance.observe_batch(observed)
        return failures

    def _apply_one(self, event: Event, partition: int) -> Observation | None:
        """One event's profile and popularity; its interaction for the loop (if any)."""
        category = event.category
        item = event.item_id
        deleted = item is not None and item in self.deleted
        if item is not None:
            category = category or self.popularity.category(item)
            if not deleted:
                self.popularity.observe(item, category, 1.0, event.ts)
        query_cats: list[str] = []
        if event.kind == SEARCH and event.query:
            query_cats = self._query_categories(event)
        before = self.profiles.get(event.user_id) or new_profile()
        ob: Observation | None = None
        if item is not None and event.kind in INTERACTION_KINDS:
            text = self._item_text(event, category, deleted)
            affinity, repeat = user_item_context(before, category, item)
            ob = Observation(event, partition, before.get("n", {}), affinity, repeat, text,
                             functools.partial(self._user_context, before))
        self.profiles[event.user_id] = update_profile(
            before, event, category, query_cats, keep=self.settings.recent_items)
        if self.signals is not None and not deleted:
            self.signals.observe(event)
        return ob

    def _query_categories(self, event: Event) -> list[str]:
        assert event.query is not None
        query_cats = self.query_index.categories(event.query)
        if event.clicked_item_id is not None:
            clicked = self.popularity.category(event.clicked_item_id)
            if clicked is not None:
                query_cats = [clicked, *[c for c in query_cats if c != clicked]]
        return query_cats

    def _item_text(self, event: Event, category: str | None, deleted: bool) -> str:
        assert event.item_id is not None
        text = self.item_text.get(event.item_id)
        if text is None:
            text = fallback_text(event, category)
            if not deleted:
                self.item_text[event.item_id] = text
                if self.on_new_item is not None:
                    self.on_new_item(event.item_id, text)
        return text

    def _user_context(self, profile: dict[str, Any]) -> tuple[str, str]:
        """The user's context as a training sample stores it: texts and their kinds."""
        return sample_context(profile, self.item_text, self.settings.max_context)

    def context(self, profile: dict[str, Any]) -> list[ContextEntry]:
        return context_entries(profile, self.item_text, self.settings.max_context)

    def list_features(self, lists: Sequence[tuple[str, Sequence[str]]]
                      ) -> list[tuple[float, ...]]:
        """The count features of each user with each of the items their list shows
        (``lists``: (user, items shown)), one row per pair, the lists one after the
        other, as they stand: what an interaction with the item would be scored with
        (:meth:`ImbalanceLoop.features`, the same floats). The sketches are read once for
        a whole turn's lists (three reads per user had been half of it), each item's
        columns made once and each user's once (a dict per pair had been most of the
        rest). Called on the scoring thread: it only reads the profiles and the loop's
        counts."""
        loop = self.imbalance
        counts = loop.item_counts([i for _, ids in lists for i in ids])
        tiers, prices, category = loop.tiers, loop.prices, self.popularity.category
        items = {i: item_columns(n, rates, tiers.get(i, "tail"), prices.get(i))
                 for i, (n, rates) in counts.items()}
        rows: list[tuple[float, ...]] = []
        for user_id, item_ids in lists:
            if not item_ids:
                continue
            profile = self.profiles.get(user_id) or new_profile()
            user = user_columns(profile.get("n", {}))
            for i in item_ids:
                affinity, repeat = user_item_context(profile, category(i), i)
                rows.append(joined_vector(items[i], user, affinity, repeat))
        return rows


def user_item_context(profile: dict[str, Any], category: str | None, item: str | None
                      ) -> tuple[float, bool]:
    """The user's affinity to the item's category (its share over the user's top
    category's) and whether the user acted on the item before, from their profile.

    >>> user_item_context({"cats": {"shoes": 4.0, "hats": 1.0}, "items": ["i1"]},
    ...                   "hats", "i1")
    (0.25, True)
    """
    cats = profile.get("cats", {})
    top = max(cats.values(), default=0.0)
    return (cats.get(category, 0.0) / top if top else 0.0,
            item is not None and item in profile.get("items", ()))


def item_text(item: Item) -> str:
    """The item as text for the item tower: title, category, brand, price bucket.

    >>> item_text(Item("i1", "Red tee", "fashion/t-shirt", "acme", 18.0))
    'Red tee | fashion/t-shirt | acme | price 10-25'
    """
    parts = [item.title, item.category]
    if item.brand:
        parts.append(item.brand)
    if item.price is not None:
        parts.append(f"price {price_bucket(item.price)}")
    return " | ".join(parts)


def price_bucket(price: float) -> str:
    """Coarse, stable price band (text models read bands better than raw numbers)."""
    for lo, hi in ((0, 10), (10, 25), (25, 50), (50, 100), (100, 250), (250, 500)):
        if price < hi:
            return f"{lo}-{hi}"
    return "500+"


def fallback_text(event: Event, category: str | None) -> str:
    """Logs without a catalogue (Taobao): a stable textual form of the ids."""
    return f"item {event.item_id} | category {category or 'unknown'}"
