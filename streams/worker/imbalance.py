"""The imbalance control loop: counts → weights → minority buffer → fine-tune triggers.

One :class:`ImbalanceLoop` per worker, fed every valid interaction by the pipeline:

* **Class counts** per source partition (hopping window, decayed, whole-run totals), so
  each partition's counts travel with it through the changelog when partitions move
  between workers. Shares and weights use the sum over this worker's partitions.
* **Item frequency**: a count-min sketch with heavy hitters (bounded memory) gives the
  item tier (head / torso / tail) and ``q(item)`` for logQ correction; a second sketch
  over ``class:item`` keys gives each item's past cart / fav / purchase rates.
* **Weights**: the configured policy (:mod:`tailstream.models.imbalance.policies`) over the
  *decayed* class counts, which change smoothly, so the weights never jump when a window
  rolls. The hopping-window counts are reported beside them.
* **Online model**: river, prequential, weighted by the live class weights.
* **Buffer**: minority classes and tail items kept, majority by reservoir.
* **Triggers**: buffer growth, ADWIN drift on class mix or error, max interval; cooldown.

Event time (``event.ts``) drives windows and decay, so a replay at any speed counts the
same; wall time drives trigger cooldowns, because fine-tuning costs wall time.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tailstream import configs
from tailstream.contract import CLASSES, INTERACTION_KINDS, RARE_CLASSES, Event
from tailstream.models.imbalance.buffer import MinorityBuffer, Sample
from tailstream.models.imbalance.decisions import RunningPrior
from tailstream.models.imbalance.features import Features, feature_vector, interaction_features
from tailstream.models.imbalance.online import OnlineOutcomeModel
from tailstream.models.imbalance.policies import class_weights
from tailstream.models.imbalance.rolling import DecayedCounts, HoppingWindowCounts, class_shares
from tailstream.models.imbalance.sketch import CountMinSketch, ItemFrequency
from tailstream.models.imbalance.triggers import DriftMonitor, TriggerPolicy
from tailstream.settings import Settings

CLASS_INDEX = {c: k for k, c in enumerate(CLASSES)}

ItemCounts = tuple[float, dict[str, float]]
"""An item's decayed count and its count per rare class (:meth:`ImbalanceLoop.item_counts`)."""


@dataclass(slots=True)
class Observation:
    """One valid, de-duplicated interaction as :meth:`ImbalanceLoop.observe_batch` needs it:
    what the user's profile said *before* the event, and how to make the user's context
    text and its kinds (only called for the events the buffer keeps)."""

    event: Event
    partition: int
    user_class_counts: dict[str, float]
    category_affinity: float
    repeat: bool
    item_text: str
    user_context: Callable[[], tuple[str, str]]


@dataclass
class PartitionCounts:
    """Counts of one source partition (persisted in the ``imbalance-counts`` table)."""

    window: HoppingWindowCounts
    decayed: DecayedCounts
    totals: Counter[str] = field(default_factory=Counter)
    last_ts: float = 0.0
    offsets: dict[str, int] = field(default_factory=dict)
    """Per input topic, the last offset of this partition whose events are in the counts.
    Stored in the same changelog record as the counts, so a replay after a crash knows
    exactly which messages the recovered counts already hold (effectively-once counts)."""

    def to_state(self) -> dict[str, Any]:
        return {"window": self.window.to_state(), "decayed": self.decayed.to_state(),
                "totals": dict(self.totals), "last_ts": self.last_ts,
                "offsets": dict(self.offsets)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PartitionCounts:
        return cls(HoppingWindowCounts.from_state(state["window"]),
                   DecayedCounts.from_state(state["decayed"]),
                   Counter({k: float(v) for k, v in state["totals"].items()}),
                   float(state.get("last_ts", 0.0)),
                   {str(t): int(o) for t, o in state.get("offsets", {}).items()})


def watermarks_ahead(held: Mapping[str, int], stored: Mapping[str, Any]) -> bool:
    """Whether the ``held`` offset watermarks (topic → last offset counted) are strictly
    newer than the ``stored`` ones: at or above them on every topic, and above on one.

    Every copy of a partition's counts applies the same messages in offset order, so the
    copy with the higher watermarks holds everything the other does. Watermarks that are
    ahead on one topic and behind on another come from two lineages that neither holds
    (false: the stored copy stands, as before).

    >>> watermarks_ahead({"click": 9, "cart": 3}, {"click": 7, "cart": 3})
    True
    >>> watermarks_ahead({"click": 9}, {"click": 9})
    False
    >>> watermarks_ahead({"click": 9, "cart": 1}, {"click": 7, "cart": 2})
    False
    """
    if any(held.get(t, -1) < int(o) for t, o in stored.items()):
        return False
    return any(o > int(stored.get(t, -1)) for t, o in held.items())


def resume_offset(watermarks: Mapping[str, int] | None, topic: str) -> int:
    """The first offset of ``topic`` that a partition's counts do not hold: its watermark
    (the last offset counted) + 1, or 0 when none of the topic's messages is counted (or
    the partition has no counts: ``watermarks`` None).

    Reading must resume there for the counts to miss nothing, whatever offset the group
    committed: a commit is only as good as the changelog record it waited for, and a
    worker killed after a commit that went ahead of its counts (their record not confirmed
    in time) leaves its successor a committed offset past messages its counts never held.
    The watermark travels in the same record as the counts, so it is never ahead of them.

    >>> resume_offset({"clicks": 41}, "clicks"), resume_offset({"clicks": 41}, "carts")
    (42, 0)
    >>> resume_offset(None, "clicks")
    0
    """
    return (watermarks or {}).get(topic, -1) + 1


class ImbalanceLoop:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.policy = configs.policy(settings)
        self.partitions: dict[int, PartitionCounts] = {}
        self.items = ItemFrequency(capacity=settings.heavy_hitters,
                                   width=settings.sketch_width, depth=settings.sketch_depth,
                                   half_life_s=settings.counts_half_life_s)
        self.item_classes = CountMinSketch(settings.sketch_width, settings.sketch_depth, seed=7)
        self.online = OnlineOutcomeModel(imbalance=settings.online_imbalance)
        self.drift = DriftMonitor(RARE_CLASSES,
                                  delta=settings.drift_delta)
        self.triggers = TriggerPolicy(settings.trigger_min_samples,
                                      settings.trigger_max_interval_s,
                                      settings.trigger_cooldown_s)
        self.buffer = MinorityBuffer(settings.buffer_capacity, settings.minority_share,
                                     settings.tail_capacity)
        self.buffer_changes: list[tuple[str, int | None, Sample]] = []
        self.touched: set[int] = set()
        self.weights: dict[str, float] = dict.fromkeys(CLASSES, 1.0)
        # The class shares the served decisions are corrected to (Saerens et al. 2002),
        # decayed per interaction as the evaluation's adaptive strategy decays them.
        self.prior = RunningPrior(len(CLASSES), settings.decision_prior_half_life)
        self._prior_events = 0
        self.searches = 0
        self._tiers: dict[str, str] = {}  # snapshot, refreshed per batch (a sort of the HH)
        self.prices: dict[str, float] = {}
        """Each item's price as known so far (:meth:`know_price`): the features' price."""
        self._online_rng = random.Random(0)
        self._shares: dict[str, float] = {}
        self._last_ts = 0.0
        self._events = 0
        self.requests_made = 0
        self.last_proba: dict[str, float] | None = None
        """The fast path's prediction for the last event, made before learning from it."""

    # ------------------------------------------------------------------ per event
    def partition(self, p: int) -> PartitionCounts:
        pc = self.partitions.get(p)
        if pc is None:
            s = self.settings
            pc = self.partitions[p] = PartitionCounts(
                HoppingWindowCounts(s.window_size_s, s.window_step_s),
                DecayedCounts(s.counts_half_life_s))
        return pc

    def observe(self, event: Event, partition: int, *, user_class_counts: dict[str, float],
                category_affinity: float, repeat: bool, item_text: str = "",
                user_text: str = "", user_kinds: str = "") -> Sample | None:
        """Count one event, learn from it, and offer it to the buffer; returns the training
        sample it made (None for a search)."""
        if event.kind not in INTERACTION_KINDS or event.item_id is None:
            self.searches += event.kind == "search"
            return None
        self._observe_prior([event.kind])
        pc = self.partition(partition)
        pc.window.add(event.kind, event.ts)
        pc.decayed.add(event.kind, event.ts)
        pc.totals[event.kind] += 1
        pc.last_ts = max(pc.last_ts, event.ts)
        self._events += 1
        self._last_ts = max(self._last_ts, event.ts)
        self.touched.add(partition)

        item = event.item_id
        tier = self._tiers.get(item, "tail")
        weight = self.weights.get(event.kind, 1.0)
        error: bool | None = None
        self.last_proba = None
        # The river fast path learns from every minority event and from a random share of
        # majority ones (reweighted by 1/rate, so estimates stay unbiased): most of its
        # cost is saved where data is plentiful.
        rate = 1.0 if self._shares.get(event.kind, 0.0) < self.settings.minority_share \
            else self.settings.online_majority_rate
        x = self.features(item, user_class_counts, tier, category_affinity, repeat)
        if rate >= 1.0 or self._online_rng.random() < rate:
            seen_before = self.online.n > 0
            proba = self.online.predict_then_learn(x, event.kind, weight / rate,
                                                   metric_weight=1.0 / rate)
            self.last_proba = proba
            if seen_before:
                error = max(proba, key=lambda c: proba[c]) != event.kind
        self.drift.update(event.kind, error)
        self.items.observe(item, 1.0, ts=event.ts)
        if event.kind != "click":
            self.item_classes.add(f"{event.kind}:{item}")
        self.know_price(item, event.price)

        # River's prediction before learning from the event: free when it was just made,
        # a prediction of its own only for the decision layer that may stack it.
        fast = self.last_proba or (self.online.predict_proba(x)
                                   if self.settings.decision_stack_fast else None)
        sample = Sample(event.event_id, event.user_id, item, event.kind, event.ts, tier=tier,
                        weight=weight, user_text=user_text, item_text=item_text,
                        user_kinds=user_kinds, features=feature_vector(x),
                        fast=tuple(fast[c] for c in self.online.classes) if fast else ())
        # Until the mix is known from enough events, keep everything as if it were rare:
        # topics are consumed in parallel, so an early batch can hold mostly carts and
        # make them look like a majority class.
        shares = self._shares if self._events > self.settings.mix_warmup_events else {}
        if self.buffer.offer(sample, shares) and self.buffer.last_route is not None:
            route, slot = self.buffer.last_route
            self.buffer_changes.append((route, slot, sample))
        return sample

    def _observe_prior(self, kinds: Sequence[str]) -> None:
        self.prior.observe_many([CLASS_INDEX[k] for k in kinds if k in CLASS_INDEX])
        self._prior_events += len(kinds)

    def live_prior(self) -> np.ndarray | None:
        """The running class shares of the interactions, once ``mix_warmup_events`` of
        them were seen (before that — after a start or a restart — None: the served
        decision layer keeps the mix it was fitted for)."""
        if self._prior_events < self.settings.mix_warmup_events:
            return None
        return self.prior.prior()

    # ------------------------------------------------------------------ a batch at once
    def observe_batch(self, batch: Sequence[Observation]) -> int:
        """What :meth:`observe` does for each interaction, a batch at a time (the worker's
        path; returns how many samples the buffer kept):

        * class counts per event (cheap), item counts with one
          :meth:`ItemFrequency.observe_batch` and one :meth:`CountMinSketch.add_batch`
          per batch (aggregated per item);
        * the river fast path on a subsample: the rates of :meth:`observe` scaled down so
          that a batch makes at most ``online_batch_budget`` updates on average (weights
          and metrics reweighted by 1/rate, so estimates stay unbiased); its features read
          the item counts as of the batch's start;
        * the buffer routes each event first and builds a sample (and its user text) only
          for the events it keeps.
        """
        self._observe_prior([ob.event.kind for ob in batch])
        times: dict[tuple[int, str], list[float]] = {}
        for ob in batch:
            event = ob.event
            times.setdefault((ob.partition, event.kind), []).append(event.ts)
            self.partition(ob.partition).window.add(event.kind, event.ts)
        for (p, kind), ts in times.items():  # one sum per partition and class
            pc = self.partition(p)
            pc.decayed.add_many(kind, ts)
            pc.totals[kind] += len(ts)
            pc.last_ts = max(pc.last_ts, max(ts))
            self.touched.add(p)
        self._events += len(batch)
        if batch:
            self._last_ts = max(self._last_ts, max(ob.event.ts for ob in batch))
        # Samples are made before the batch is counted: their features, like the river
        # path's, must not include the event itself (its own class would leak into the
        # item's purchase rate); and before the river path learns from it: their fast-path
        # probabilities are its prediction, not its fit.
        items = [ob.event.item_id or "" for ob in batch]
        counts = self.item_counts(items)
        kept = self._buffer_batch(batch, counts)
        self._learn_batch(batch, counts)
        self.items.observe_batch(items, [ob.event.ts for ob in batch])
        rare: dict[str, float] = {}
        for ob in batch:  # after the batch's features: class counts and known prices
            if ob.event.kind != "click":
                key = f"{ob.event.kind}:{ob.event.item_id}"
                rare[key] = rare.get(key, 0.0) + 1.0
            if ob.event.price is not None:
                self.know_price(ob.event.item_id or "", ob.event.price)
        self.item_classes.add_batch(rare)
        return kept

    def know_price(self, item: str, price: float | None) -> None:
        """Remember ``item``'s price (a catalogue record's, or the price paid on a past
        cart or purchase) for the features of its later events."""
        if price is not None and item:
            self.prices[item] = price

    def forget_price(self, item: str) -> None:
        self.prices.pop(item, None)

    def features(self, item: str, user_class_counts: Mapping[str, float], tier: str,
                 affinity: float, repeat: bool, counts: ItemCounts | None = None
                 ) -> Features:
        """The streaming count features of an interaction with ``item``, from the counts
        as they stand (read them before counting the event; ``counts``: the item's, read
        already by :meth:`item_counts`). The price is the item's price as known before
        the event (:meth:`know_price`), never the event's own: only carts and purchases
        carry a price paid, so the event's price would tell the model the class it is
        asked to predict."""
        if counts is None:
            counts = (self.items.estimate(item),
                      {c: self.item_classes.estimate(f"{c}:{item}") for c in RARE_CLASSES})
        return interaction_features(
            item_count=counts[0], item_class_counts=counts[1],
            user_class_counts=user_class_counts, tier=tier, category_affinity=affinity,
            repeat=repeat, price=self.prices.get(item))

    def item_counts(self, items: Sequence[str]) -> dict[str, ItemCounts]:
        """Each distinct item's count and rare-class counts as they stand, every sketch
        read once for all of them (:meth:`CountMinSketch.estimate_many`: the same floats
        as :meth:`features` reads one item at a time). A batch's features are all read
        before the batch is counted, so one read serves the whole batch."""
        uniq = list(dict.fromkeys(items))
        totals = self.items.estimate_many(uniq)
        rates = {c: self.item_classes.estimate_many([f"{c}:{i}" for i in uniq]).tolist()
                 for c in RARE_CLASSES}
        return {item: (totals[n], {c: rates[c][n] for c in RARE_CLASSES})
                for n, item in enumerate(uniq)}

    def _learn_batch(self, batch: Sequence[Observation],
                     counts: Mapping[str, ItemCounts]) -> None:
        """The river fast path and the drift detectors over a batch (see observe_batch)."""
        minority = self.settings.minority_share
        base = {c: 1.0 if self._shares.get(c, 0.0) < minority
                else self.settings.online_majority_rate for c in CLASSES}
        expected = sum(base.get(ob.event.kind, 1.0) for ob in batch)
        budget = self.settings.online_batch_budget
        scale = min(1.0, budget / expected) if budget > 0 and expected > 0 else 1.0
        rng = self._online_rng
        for ob in batch:
            event = ob.event
            rate = base.get(event.kind, 1.0) * scale
            error: bool | None = None
            if rate >= 1.0 or rng.random() < rate:
                item = event.item_id or ""
                x = self.features(item, ob.user_class_counts, self._tiers.get(item, "tail"),
                                   ob.category_affinity, ob.repeat, counts[item])
                seen_before = self.online.n > 0
                weight = self.weights.get(event.kind, 1.0)
                proba = self.online.predict_then_learn(x, event.kind, weight / rate,
                                                       metric_weight=1.0 / rate)
                if seen_before:
                    error = max(proba, key=lambda c: proba[c]) != event.kind
            self.drift.update(event.kind, error)

    def _buffer_batch(self, batch: Sequence[Observation],
                      counts: Mapping[str, ItemCounts]) -> int:
        shares = self._shares if self._events > self.settings.mix_warmup_events else {}
        buffer, tiers, kept = self.buffer, self._tiers, 0
        online, classes = self.online, self.online.classes
        stack = self.settings.decision_stack_fast  # else its 11 µs a kept sample go unused
        for ob in batch:
            event = ob.event
            item = event.item_id or ""
            tier = tiers.get(item, "tail")
            route = buffer.route(event.kind, tier, shares)
            if route is None:
                continue
            x = self.features(item, ob.user_class_counts, tier, ob.category_affinity,
                              ob.repeat, counts[item])
            # River as of the batch's start: it learns from the batch after.
            fast = online.predict_proba(x) if stack else None
            user_text, user_kinds = ob.user_context()
            sample = Sample(event.event_id, event.user_id, item, event.kind, event.ts,
                            tier=tier, weight=self.weights.get(event.kind, 1.0),
                            user_text=user_text, item_text=ob.item_text, user_kinds=user_kinds,
                            features=feature_vector(x),
                            fast=tuple(fast[c] for c in classes) if fast else ())
            buffer.place(route, sample)  # before the next route: a reservoir fills in order
            self.buffer_changes.append((route[0], route[1], sample))
            kept += 1
        return kept

    # ------------------------------------------------------------------ per batch
    def end_batch(self, refresh_tiers: bool = True) -> dict[str, Any] | None:
        """Refresh shares and weights (and the tier snapshot, unless ``refresh_tiers`` is
        false: sorting the heavy hitters is the costly part, and the worker does it at most
        a few times a second); return a training request if a trigger fires."""
        decayed = self.decayed_counts()
        self._shares = class_shares(decayed)
        if refresh_tiers or not self._tiers:
            self._tiers = self.items.tiers(self.settings.head_share, self.settings.torso_share)
        if any(decayed.values()):
            self.weights = class_weights(self.policy, {c: decayed.get(c, 0.0) for c in CLASSES})
        signals = self.drift.take()
        reason = self.triggers.check(self.clock(), self.buffer.new_since_last_take, signals)
        if reason is None:
            return None
        self.requests_made += 1
        request = {"reason": reason, "signals": signals, "requested_at": self.clock(),
                   "event_time": self._last_ts, **self.snapshot()}
        self.buffer.mark_consumed()
        return request

    # ------------------------------------------------------------------ reads
    @property
    def shares(self) -> dict[str, float]:
        """Class shares of the decayed counts as of the last batch."""
        return dict(self._shares)

    @property
    def tiers(self) -> dict[str, str]:
        """Tier of each tracked item as of the last batch (absent: tail)."""
        return self._tiers

    def decayed_counts(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for pc in self.partitions.values():
            out.update(pc.decayed.counts(self._last_ts))
        return {c: out.get(c, 0.0) for c in CLASSES}

    def window_counts(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for pc in self.partitions.values():
            out.update(pc.window.counts(self._last_ts))
        return {c: out.get(c, 0.0) for c in CLASSES}

    def totals(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for pc in self.partitions.values():
            out.update(pc.totals)
        return {c: int(out.get(c, 0)) for c in CLASSES}

    def snapshot(self) -> dict[str, Any]:
        """What the summary, the metrics and a training request report."""
        totals = self.totals()
        decayed = self.decayed_counts()
        return {
            "class_counts": totals,
            "class_shares": {c: round(v, 6) for c, v in class_shares(totals).items()},
            "window_counts": self.window_counts(),
            "loss_weights": {**self.policy.describe(), "counts_used": "decayed",
                             "counts": decayed, "weights": dict(self.weights)},
            "buffer_sizes": self.buffer.sizes(),
            "triggers_fired": {r: self.triggers.fired.get(r, 0)
                               for r in ("buffer", "drift", "interval")},
            "drift_detections": dict(self.drift.detections),
            "item_tiers": self.items.tier_sizes(),
            "online": self.online.report(),
        }

    # ------------------------------------------------------------------ state
    def counted(self, partition: int, topic: str, offset: int) -> bool:
        """Whether the counts of ``partition`` already hold the message at ``offset`` of
        ``topic`` (a replay after a crash: its effects were recovered from the changelog)."""
        pc = self.partitions.get(partition)
        return pc is not None and offset <= pc.offsets.get(topic, -1)

    def mark_counted(self, partition: int, topic: str, offset: int) -> None:
        """Advance the watermark: the message at ``offset`` has been applied."""
        pc = self.partition(partition)
        if offset > pc.offsets.get(topic, -1):
            pc.offsets[topic] = offset
            self.touched.add(partition)

    def resume_at(self, topics: list[str]) -> dict[tuple[str, int], int]:
        """(topic, partition) → where reading must resume (:func:`resume_offset`), for
        every partition whose counts this worker holds."""
        return {(t, p): resume_offset(pc.offsets, t)
                for p, pc in self.partitions.items() for t in topics}

    def forget_offsets(self) -> None:
        """The broker lost its log (offsets restart at 0): no message is a replay now."""
        for p, pc in self.partitions.items():
            if pc.offsets:
                pc.offsets.clear()
                self.touched.add(p)

    def load_partition(self, p: int, state: dict[str, Any]) -> None:
        pc = PartitionCounts.from_state(state)
        self.partitions[p] = pc
        self._last_ts = max(self._last_ts, pc.last_ts)

    def restore_partition(self, p: int, state: dict[str, Any]) -> bool:
        """Load a partition's stored state, unless the counts this process holds for it are
        newer (:func:`watermarks_ahead`); returns whether they were kept.

        At a rebalance Faust re-reads the changelog of a partition that stays assigned and
        writes the records into the table: a record of ours not delivered yet when it read
        the log's end leaves the table one batch or more behind the loop. Loading that
        would take the batch's events out of the counts while the consumer reads on past
        them (found by ``kill -9`` under load: 872 events lost). Kept counts are marked
        touched, so the next save writes them to the changelog again."""
        held = self.partitions.get(p)
        stored = state.get("offsets", {})
        if held is not None and watermarks_ahead(held.offsets, stored):
            self.touched.add(p)
            return True
        self.load_partition(p, state)
        return False

    def take_touched(self) -> dict[int, dict[str, Any]]:
        """States of partitions changed since the last call (to write to the changelog)."""
        out = {p: self.partitions[p].to_state() for p in self.touched}
        self.touched.clear()
        return out

    def take_buffer_changes(self) -> list[tuple[str, int | None, Sample]]:
        out, self.buffer_changes = self.buffer_changes, []
        return out
