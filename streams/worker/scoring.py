"""The worker's transformer scoring: long torch work off the event loop, short turns on it.

Loading a version, embedding catalogue items and re-projecting the catalogue after a
promotion run on one dedicated torch thread, so Faust's event loop keeps fetching,
heartbeating and committing while the CPU encodes. A scoring turn runs on that thread
too when it is larger than the latency budget fits (the queue behind, catching up:
ingest reads on beside it); a turn the budget fits runs on the event loop itself
(``inline``, :meth:`ScoringService._turn`), where it never waits for the interpreter
between its array calls. The pipeline awaits each scoring call, so the popularity state
it reads is not being mutated at the same time.

Until the first version is loaded (a few seconds at start) and while the item index is
empty, :meth:`ScoringService.ready` is false and the pipeline publishes baseline lists.

**A canary** (:meth:`ScoringService.start_canary`): the candidate the trainer is trying
is a second :class:`~tailstream.models.serving.scorer.Scorer` beside the serving one,
made with :meth:`~tailstream.models.serving.scorer.Scorer.sibling` (with the same encoder
it shares the encoder's weights, the text-vector cache and the items' text vectors: it
costs its towers, head and an item index). Users in the canary's share (hashed ids,
:func:`~tailstream.models.serving.canary.in_canary`) are scored with it, on the same
scoring thread, in a call of their own; everyone else with the serving version. When the
candidate is promoted it takes the serving scorer's place in one assignment (nothing is
reloaded); when it is rolled back it is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import redis
import torch

from tailstream.configs import ranking_config, tower_config, version_number
from tailstream.metrics import Metrics
from tailstream.models.imbalance.online import OnlineOutcomeModel
from tailstream.models.serving.blend import HybridRequest, OnlineBlender
from tailstream.models.serving.canary import in_canary
from tailstream.models.serving.hybrid import QUERY_PREFIX, HybridList, hybrid_recommend
from tailstream.models.serving.scorer import ListFeatures, Ranked, Scorer
from tailstream.models.towers.context import UserRequest
from tailstream.models.towers.encoder_process import EncoderProcess
from tailstream.models.towers.loading import ServedModel, load_served, pick_device
from tailstream.models.towers.store import ModelStore
from tailstream.settings import Settings
from tailstream.streams.stores.vector_cache import RedisVectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVING, CANARY = "serving", "canary"
"""The arms a list is made by: the serving version, or the canary's candidate."""
ItemInfo = Callable[[Sequence[str]], tuple[list[str], list[str | None], list[float]]]
INLINE_NEW_TEXTS = 8
"""The most texts a turn on the event loop may have to encode (context entries and
queries its scorer has no vector for): all-MiniLM-L6-v2 encodes ~100 short texts/s on a
CPU core, so 8 is ~80 ms. A turn that must encode more — items the catalogue has not
embedded yet, a burst of new queries — runs on the torch thread: on the loop it could
hold it for seconds (a fresh-clone test run without this bound timed out a 2 s /metrics
scrape in the kill -9 test, which passed alone with and without it)."""


def new_texts(scorer: Scorer, requests: Sequence[UserRequest],
              queries: Sequence[str | None] = ()) -> int:
    """How many distinct texts scoring ``requests`` (and matching ``queries``) would
    encode: the context entries the user tower reads and the queries, not in the
    scorer's text-vector cache."""
    c = scorer.served.model.config.max_context
    texts = {e.text for r in requests for e in r.context[:c]}
    texts.update(QUERY_PREFIX + q for q in queries if q)
    return sum(not scorer.texts.cached(t) for t in texts)


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread ``increment`` nicer than the process (Linux schedules
    threads one by one; elsewhere nothing happens). The torch thread's: when the worker's
    two threads want more CPU than there is, the event loop — fetching, committing,
    ingest, publishing — goes first, and scoring takes what is left."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as exc:
        log.debug("could not lower the scoring thread's priority: %r", exc)


def shared_vectors(settings: Settings) -> RedisVectorStore | None:
    """The Redis text-vector cache shared with the trainer (if enabled)."""
    if not settings.text_vectors_shared or not settings.redis_url:
        return None
    client = redis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=5,
                                  socket_connect_timeout=2)
    return RedisVectorStore(client, settings.redis_prefix, settings.text_vectors_ttl_s)


class ScoringService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = ModelStore(settings.model_store_dir)
        self.device = pick_device(settings.device)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch",
                                           initializer=lower_thread_priority,
                                           initargs=(settings.scoring_nice,))
        self.scorer: Scorer | None = None
        self.canary: Scorer | None = None
        """The candidate being tried on ``canary_share`` of the users (None: no canary)."""
        self.canary_share = 0.0
        self.failed: str | None = None
        self._pending: dict[str, str] = {}  # item_id → text, waiting to be embedded
        self._removed: set[str] = set()  # deleted items still to take out of the index
        self.shared = shared_vectors(settings)
        self.encoder_process: EncoderProcess | None = None
        self._child_start: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self.loaded = asyncio.Event()
        """Set once :meth:`start` is done (a version loaded, or none could be)."""

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _turn(self, inline: bool, fn: Callable[..., T], *args: Any) -> T:
        """A scoring turn: on the calling thread (the event loop) when ``inline``, else on
        the torch thread. Inline, a turn holds the loop for as long as it takes (the
        caller keeps it within the latency budget) but never waits for the interpreter;
        on the thread, ingest goes on beside it and every one of its array calls, which
        give the interpreter up, waits up to a switch interval to take it back."""
        self.metrics.scoring_turns.labels("loop" if inline else "thread").inc()
        if inline:
            return fn(*args)
        return await self._run(fn, *args)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the store's current version (the base model before any promotion); one that
        cannot be loaded (a corrupt checkpoint) gives way to the last good promotion before
        it, then to the base model — never straight to the baseline lists."""
        threads = self.settings.torch_threads

        def load(version: str) -> Scorer:
            if threads > 0:
                torch.set_num_threads(threads)
            served = self._load(version)
            return Scorer(served, device=self.device, max_len=self.settings.text_max_len,
                          cache_size=self.settings.text_cache_size,
                          ranking=ranking_config(self.settings), shared=self.shared)

        try:
            for version in self.store.fallbacks():
                try:
                    self.scorer = await self._run(load, version)
                    break
                except Exception as exc:
                    self.failed = repr(exc)
                    self.metrics.model_loads.labels("failed").inc()
                    log.error("could not load model %s (%s); trying the version before it",
                              version, exc)
        finally:
            self.loaded.set()
        if self.scorer is None:  # not even the base: the worker keeps serving baseline lists
            log.error("no model could be loaded; serving baseline lists")
            return
        self.metrics.model_loads.labels("loaded").inc()
        self.metrics.serving_version.set(version_number(self.scorer.version))
        log.info("scoring with %s on %s", self.scorer.version, self.device)
        if self.settings.encoder_process and self.device.type == "cpu":
            # Not awaited: the catalogue's embedding starts while the child loads.
            self._child_start = asyncio.ensure_future(self._start_encoder_process())

    async def _start_encoder_process(self) -> None:
        """The child that encodes turn-time texts (``TAILSTREAM_ENCODER_PROCESS``); until it
        is ready, or if it cannot start, the worker encodes them itself."""
        remote = EncoderProcess(self.settings.encoder_path or None, self.settings.text_max_len)
        self.encoder_process = remote  # closed with the service, ready or not
        if await asyncio.to_thread(remote.wait_ready) and self.scorer is not None:
            self.scorer.texts.remote = remote  # a version swapped in later inherits it
            self.metrics.encoder_process.set(1)
            log.info("turn-time encodes in the encoder process (encoder %s)", remote.fingerprint)
        else:
            remote.close()
            log.warning("no encoder process (%s): the worker encodes its texts", remote.failed)

    def _count_encodes(self, scorer: Scorer, before: int, child_before: int,
                       purpose: str = "query") -> None:
        """Texts encoded for a turn (or a chunk of the catalogue), and those the encoder
        process did."""
        self.metrics.texts_encoded.labels(purpose).inc(scorer.texts.encoded - before)
        child = self.encoder_process
        if child is not None:
            self.metrics.encoder_process_texts.inc(child.texts - child_before)
            self.metrics.encoder_process.set(1 if child.alive else 0)

    @property
    def _child_texts(self) -> int:
        return self.encoder_process.texts if self.encoder_process is not None else 0

    async def wait_loaded(self, timeout_s: float) -> None:
        """Until :meth:`start` is done, at most ``timeout_s`` (then the baseline serves
        until the model is there, as before)."""
        if self.loaded.is_set() or timeout_s <= 0:
            return
        try:
            await asyncio.wait_for(self.loaded.wait(), timeout_s)
        except TimeoutError:
            log.warning("the model is not loaded after %.0fs: processing events with "
                        "baseline lists until it is", timeout_s)
            self.loaded.set()  # say it once; from now on the agent does not wait

    def _load(self, version: str) -> ServedModel:
        return load_served(self.store, version, self.settings.encoder_path or None,
                           tower_config(self.settings), self.device)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.encoder_process is not None:
            self.encoder_process.close()

    @property
    def ready(self) -> bool:
        return self.scorer is not None and len(self.scorer.index) > 0

    @property
    def version(self) -> str:
        return self.scorer.version if self.scorer is not None else ""

    def set_live_prior(self, prior: np.ndarray | None,
                       online: OnlineOutcomeModel | None = None) -> None:
        """The stream's running class shares, which the served decisions are corrected to,
        and — for a decision layer that stacks it beside the head — the river fast path
        as of the last batch (:meth:`OnlineOutcomeModel.snapshot`, taken here on the event
        loop that trains it; one assignment each per scorer: the scoring thread reads
        whichever it finds)."""
        for scorer in (self.scorer, self.canary):
            if scorer is not None:
                scorer.live_prior = prior
                layer = scorer.decisions
                scorer.fast_path = (online.snapshot().proba if online is not None
                                    and layer is not None and layer.reads(1) else None)

    # ------------------------------------------------------------------ arms
    def arm(self, user_id: str) -> str:
        """Which model makes ``user_id``'s lists: the canary's candidate for its share of
        users (sticky: hashed with the candidate's version), else the serving version."""
        canary = self.canary
        if canary is not None and in_canary(user_id, self.canary_share, canary.version):
            return CANARY
        return SERVING

    def scorer_for(self, arm: str) -> Scorer | None:
        """The scorer of an arm (the serving one when the canary has just ended)."""
        canary = self.canary
        return canary if arm == CANARY and canary is not None else self.scorer

    # ------------------------------------------------------------------ catalogue
    def queue_item(self, item_id: str, text: str) -> None:
        """Remember an item to embed (a newer text for the same item replaces the older)."""
        self._removed.discard(item_id)  # announced again after a deletion: it is back
        self._pending[item_id] = text
        self.metrics.index_pending.set(len(self._pending))

    def remove_item(self, item_id: str) -> None:
        """A catalogue tombstone: the item leaves the index before the next list is made."""
        self._pending.pop(item_id, None)
        self._removed.add(item_id)
        self.metrics.index_pending.set(len(self._pending))

    async def _sync_removals(self, scorer: Scorer) -> None:
        """Under the lock: apply the deletions seen so far (taken on the event loop, where
        :meth:`remove_item` adds them; removed on the torch thread)."""
        if self._removed:
            removed, self._removed = sorted(self._removed), set()
            await self._run(scorer.remove_items, removed)
            canary = self.canary
            if canary is not None and canary is not scorer:
                await self._run(canary.remove_items, removed)
            elif self.scorer is not None and self.scorer is not scorer:
                await self._run(self.scorer.remove_items, removed)

    @property
    def pending_items(self) -> int:
        return len(self._pending)

    async def embed_pending(self, max_items: int) -> int:
        """Embed up to ``max_items`` queued items (oldest first); returns how many."""
        scorer = self.scorer
        if scorer is None or not self._pending:
            return 0
        ids = list(self._pending)[:max_items]
        texts = [self._pending.pop(i) for i in ids]
        async with self._lock:
            before, child_before = scorer.texts.encoded, self._child_texts
            await self._run(scorer.add_items, ids, texts)
            canary = self.canary
            if canary is not None:  # the shared text vectors are cached: a projection
                await self._run(canary.add_items, ids, texts)
            # A tombstone that came while these waited wins over their embedding.
            await self._sync_removals(scorer)
        self._count_encodes(scorer, before, child_before, "item")
        self.metrics.index_pending.set(len(self._pending))
        self._index_metrics(scorer)
        return len(ids)

    def _index_metrics(self, scorer: Scorer) -> None:
        self.metrics.index_items.set(len(scorer.index))
        canary = self.canary
        extra = 0
        if canary is not None:
            extra = canary.index.memory_bytes + (
                canary.item_texts.memory_bytes if canary.item_texts is not scorer.item_texts
                else 0)
        self.metrics.index_bytes.set(scorer.index.memory_bytes + scorer.item_texts.memory_bytes
                                     + extra)

    # ------------------------------------------------------------------ users
    async def recommend(self, requests: list[UserRequest], item_info: ItemInfo, *,
                        scorer: Scorer | None = None, features: ListFeatures | None = None,
                        inline: bool = False) -> list[list[Ranked]]:
        """Lists from ``scorer`` (default: the serving version's); ``features``: the count
        features of the items shown, for the outcomes a list carries; ``inline``: on the
        event loop (:meth:`_turn`) unless the turn must encode more than
        :data:`INLINE_NEW_TEXTS` texts."""
        scorer = scorer or self.scorer
        assert scorer is not None
        started = time.perf_counter()
        async with self._lock:
            await self._sync_removals(scorer)
            before, child_before = scorer.texts.encoded, self._child_texts
            inline = inline and new_texts(scorer, requests) <= INLINE_NEW_TEXTS
            lists = await self._turn(inline, functools.partial(scorer.recommend,
                                                               features=features),
                                     requests, item_info)
        self._count_encodes(scorer, before, child_before)
        self.metrics.scoring_seconds.observe(time.perf_counter() - started)
        return lists

    async def recommend_hybrid(self, requests: list[HybridRequest], item_info: ItemInfo,
                               blender: OnlineBlender, *, scorer: Scorer | None = None,
                               features: ListFeatures | None = None,
                               inline: bool = False) -> list[HybridList]:
        """Hybrid lists (the towers' candidates with the stateful sources, scored by the
        online blender) from ``scorer`` (default: serving), on the scoring thread or,
        ``inline``, on the event loop (:meth:`_turn`) unless the turn must encode more
        than :data:`INLINE_NEW_TEXTS` texts."""
        scorer = scorer or self.scorer
        assert scorer is not None
        started = time.perf_counter()
        async with self._lock:
            await self._sync_removals(scorer)
            before, child_before = scorer.texts.encoded, self._child_texts
            inline = inline and new_texts(scorer, [h.request for h in requests],
                                          [h.query for h in requests]) <= INLINE_NEW_TEXTS
            lists = await self._turn(inline, hybrid_recommend, scorer, requests, item_info,
                                     blender, features)
        self._count_encodes(scorer, before, child_before)
        self.metrics.scoring_seconds.observe(time.perf_counter() - started)
        return lists

    # ------------------------------------------------------------------ model updates
    async def swap_to(self, version: str, item_texts: Callable[[Sequence[str]], list[str]]
                      ) -> bool:
        """Load ``version`` and serve it: the catalogue is re-projected (or re-encoded if
        the encoder changed) before the swap, so no list mixes two versions. A version
        that fails its integrity check is refused and the current one keeps serving."""
        scorer = self.scorer
        if scorer is None or version == scorer.version:
            return False
        canary = self.canary
        if canary is not None and canary.version == version:
            return await self._promote_canary(canary)
        try:
            # Read from disk on another thread: the scoring thread keeps making lists
            # meanwhile, and stops only for the swap (re-projecting the catalogue).
            served = await asyncio.to_thread(self._load, version)
            async with self._lock:
                await self._run(scorer.swap_model, served, item_texts)
        except Exception:
            self.metrics.model_loads.labels("failed").inc()
            log.exception("could not load model %s; %s keeps serving", version, scorer.version)
            return False
        self.metrics.model_loads.labels("loaded").inc()
        self.metrics.serving_version.set(version_number(version))
        log.info("now scoring with %s (%d items re-indexed)", version, len(scorer.index))
        return True

    def refresh_decisions(self, version: str, raw: Mapping[str, Any] | None) -> bool:
        """Serve the decision layer the trainer refitted for ``version`` (a store version
        name, ``base`` included) if that is the serving version; its weights and lists
        stay. False when another version serves (the refresh is stale)."""
        scorer = self.scorer
        if scorer is None or not raw or \
                scorer.served.manifest.get("version", scorer.version) != version:
            return False
        scorer.set_decisions(raw)
        self.metrics.decision_refreshes.inc()
        log.info("serving %s with decisions refitted on the trainer's latest window", version)
        return True

    # ------------------------------------------------------------------ the canary
    async def start_canary(self, version: str, share: float,
                           item_texts: Callable[[Sequence[str]], list[str]]) -> bool:
        """Serve ``version`` to ``share`` of the users beside the serving version (loaded
        off the scoring thread; the catalogue projected for it under the lock, so no list
        mixes versions). False when it cannot be loaded (the serving version serves
        everyone) or is already the serving version."""
        scorer = self.scorer
        if scorer is None or version == scorer.version or share <= 0.0:
            return False
        current = self.canary
        if current is not None and current.version == version:
            self.canary_share = share
            return True
        try:
            served = await asyncio.to_thread(self._load, version)
            async with self._lock:
                canary = await self._run(scorer.sibling, served, item_texts)
                self.canary, self.canary_share = canary, share
        except Exception:
            self.metrics.model_loads.labels("failed").inc()
            log.exception("could not load the canary %s; %s serves everyone", version,
                          scorer.version)
            return False
        self.metrics.model_loads.labels("loaded").inc()
        self.metrics.canary_share.set(share)
        self.metrics.canary_version.set(version_number(version))
        self._index_metrics(scorer)
        log.info("canary: %s serves %.0f%% of users beside %s", version, 100 * share,
                 scorer.version)
        return True

    def end_canary(self, version: str | None = None) -> bool:
        """Stop serving the canary's candidate (``version``: only if it is that one)."""
        canary = self.canary
        if canary is None or (version is not None and canary.version != version):
            return False
        self.canary, self.canary_share = None, 0.0
        self.metrics.canary_share.set(0)
        self.metrics.canary_version.set(0)
        if self.scorer is not None:
            self._index_metrics(self.scorer)
        log.info("canary %s ended; %s serves everyone", canary.version, self.version)
        return True

    async def _promote_canary(self, canary: Scorer) -> bool:
        """The canary's candidate was promoted: it takes the serving scorer's place in one
        assignment (its index is current; nothing is reloaded)."""
        async with self._lock:
            canary.adopt_texts()
            self.scorer, self.canary, self.canary_share = canary, None, 0.0
        self.metrics.canary_share.set(0)
        self.metrics.canary_version.set(0)
        self.metrics.model_loads.labels("loaded").inc()
        self.metrics.serving_version.set(version_number(canary.version))
        self._index_metrics(canary)
        log.info("now scoring with %s (the canary, promoted)", canary.version)
        return True
