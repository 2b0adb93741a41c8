"""Bounded-memory item frequencies: a Count-Min sketch and heavy hitters on top of it.

Count-Min sketch (Cormode & Muthukrishnan, "An Improved Data Stream Summary: The
Count-Min Sketch and its Applications", J. Algorithms 2005): ``d`` rows of ``w`` counters;
key ``x`` adds its count to one counter per row, ``C[i, h_i(x)]``, and is estimated by
``â(x) = min_i C[i, h_i(x)]``. With ``w = ⌈e/ε⌉`` and ``d = ⌈ln(1/δ)⌉``, for non-negative
counts and ``N = Σ counts``::

    a(x) ≤ â(x)                 always
    â(x) ≤ a(x) + ε·N           with probability ≥ 1 − δ (per key)

*Conservative update* (Estan & Varghese, "New Directions in Traffic Measurement and
Accounting", SIGCOMM 2002) raises only the counters that are below ``â(x) + c``, to that
value, instead of adding ``c`` to all ``d``: every counter still bounds the true count of
each key hashed to it, so the estimate never underestimates, and it is never larger than
the plain update's (usually much smaller for tail keys, which share cells with head keys).

Hashing: ``h_i(x)`` are 64-bit words of one keyed BLAKE2b digest of the UTF-8 key (key =
the seed), reduced modulo ``w``. BLAKE2b is stable across processes and machines, unlike
Python's salted ``hash``, so sketches written by one worker can be merged by another; as a
keyed PRF its words are (computationally) independent, stronger than the pairwise
independence the bound needs.

:class:`ItemFrequency` adds exponential time decay (forward decay, as in
:mod:`tailstream.models.serving.popularity`) and a bounded set of heavy hitters, and exposes the
sampling probability ``q(item)`` for the logQ correction of sampled softmax (Yi et al.,
"Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations",
RecSys 2019, who estimate ``q`` from streaming frequencies as well).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter

import numpy as np
import numpy.typing as npt

from tailstream.contract import TIERS

_MAGIC = b"TCMS"
_VERSION = 1
# magic, version, flags, width, depth, seed, total
_HEADER = struct.Struct("<4sBBIIQd")
_FLAG_CONSERVATIVE = 1
_FLAG_ZLIB = 2
_WORDS_PER_DIGEST = 8  # BLAKE2b digests are at most 64 bytes = 8 uint64 words
CELL_CACHE_SIZE = 65_536
"""Keys whose counter positions are remembered (≈ 200 bytes each)."""


class CountMinSketch:
    """Count-Min sketch over string keys with non-negative float counts.

    ``estimate ≥ true`` always, and ``estimate ≤ true + ε·N`` with probability ``≥ 1 − δ``
    where ``ε = e / width``, ``δ = e^(−depth)`` and ``N = total`` (see the module docstring).
    Memory is ``width · depth · 8`` bytes whatever the number of distinct keys.

    >>> s = CountMinSketch.from_error(epsilon=0.01, delta=0.01)
    >>> (s.width, s.depth)
    (272, 5)
    >>> for k, n in [("a", 5), ("b", 2), ("c", 1)]:
    ...     _ = s.add(k, n)
    >>> s.estimate("a"), s.total
    (5.0, 8.0)
    >>> s.estimate("never") >= 0.0
    True
    >>> CountMinSketch.from_bytes(s.to_bytes()).estimate("b")
    2.0
    """

    def __init__(self, width: int, depth: int, seed: int = 0, conservative: bool = True) -> None:
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be >= 1")
        if not 0 <= seed < 2**64:
            raise ValueError("seed must fit in 64 unsigned bits")
        self.width = int(width)
        self.depth = int(depth)
        self.seed = int(seed)
        self.conservative = conservative
        self.total = 0.0
        self._table: npt.NDArray[np.float64] = np.zeros(self.depth * self.width, np.float64)
        # Scalar reads/writes through a memoryview cost ~50 ns; numpy fancy indexing of a
        # handful of cells costs microseconds per call. The table is only ever changed in
        # place, so the view stays valid.
        self._cells = self._table.data.cast("B").cast("d")
        self._offsets = [r * self.width for r in range(self.depth)]
        self._hash_key = self.seed.to_bytes(8, "little")
        n_digests = -(-self.depth // _WORDS_PER_DIGEST)
        self._digests = [
            (min(self.depth - j * _WORDS_PER_DIGEST, _WORDS_PER_DIGEST), j.to_bytes(8, "little"))
            for j in range(n_digests)
        ]
        self._unpack = {n: struct.Struct(f"<{n}Q").unpack for n, _ in self._digests}
        self._cell_cache: dict[str, list[int]] = {}

    @classmethod
    def from_error(cls, epsilon: float, delta: float, seed: int = 0,
                   conservative: bool = True) -> CountMinSketch:
        """Size for additive error ``ε·N`` with probability ``1 − δ``:
        ``width = ⌈e/ε⌉``, ``depth = ⌈ln(1/δ)⌉``.

        >>> s = CountMinSketch.from_error(0.001, 0.001)
        >>> (s.width, s.depth)
        (2719, 7)
        """
        if not 0 < epsilon < 1 or not 0 < delta < 1:
            raise ValueError("epsilon and delta must be in (0, 1)")
        return cls(math.ceil(math.e / epsilon), math.ceil(math.log(1.0 / delta)), seed,
                   conservative)

    # -- bounds ------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """Relative additive error ``e / width``."""
        return math.e / self.width

    @property
    def delta(self) -> float:
        """Failure probability ``e^(−depth)``."""
        return math.exp(-self.depth)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the counters (fixed at construction)."""
        return int(self._table.nbytes)

    @property
    def table(self) -> npt.NDArray[np.float64]:
        """The counters as a read-only ``(depth, width)`` view."""
        view = self._table.reshape(self.depth, self.width)
        view.flags.writeable = False
        return view

    # -- hashing -----------------------------------------------------------------
    def _cells_of(self, key: str) -> list[int]:
        """Flat counter index of ``key`` in each row (memoised: item ids repeat endlessly
        and a BLAKE2b digest costs more than the counter update)."""
        cached = self._cell_cache.get(key)
        if cached is not None:
            return cached
        if len(self._cell_cache) >= CELL_CACHE_SIZE:
            self._cell_cache.clear()  # cheaper than LRU bookkeeping; refills in a moment
        cells = self._hash_cells(key)
        self._cell_cache[key] = cells
        return cells

    def _hash_cells(self, key: str) -> list[int]:
        data = key.encode("utf-8")
        words: list[int] = []
        for n, salt in self._digests:
            digest = hashlib.blake2b(data, digest_size=8 * n, key=self._hash_key,
                                     salt=salt).digest()
            words.extend(self._unpack[n](digest))
        w = self.width
        return [x % w + off for x, off in zip(words, self._offsets, strict=True)]

    # -- updates -----------------------------------------------------------------
    def add(self, key: str, count: float = 1.0) -> float:
        """Add ``count ≥ 0`` to ``key``; returns the key's new estimate.

        Negative counts are refused: the never-underestimate guarantee and conservative
        update both need a cash-register stream (deletions belong in a Count-Median sketch).
        """
        if count < 0 or math.isnan(count):
            raise ValueError("counts must be non-negative")
        cells = self._cells
        idx = self._cells_of(key)
        self.total += count
        if self.conservative:
            current = [cells[i] for i in idx]
            new = min(current) + count
            for i, value in zip(idx, current, strict=True):
                if value < new:
                    cells[i] = new
            return new
        estimate = math.inf
        for i in idx:
            value = cells[i] + count
            cells[i] = value
            estimate = min(estimate, value)
        return estimate

    def add_many(self, keys: Iterable[str], counts: Iterable[float] | None = None) -> None:
        """``add`` each key (with count 1, or the matching count), in order."""
        if counts is None:
            for key in keys:
                self.add(key)
        else:
            for key, count in zip(keys, counts, strict=True):
                self.add(key, count)

    def add_batch(self, counts: Mapping[str, float]) -> npt.NDArray[np.float64]:
        """Add each key's count at once (one gather and one scatter over the table);
        returns the keys' estimates afterwards, in the mapping's order.

        Conservative update of a batch raises every counter of a key to at least the key's
        estimate *before the batch* plus its count (``np.maximum.at``, so keys sharing a
        counter both count): each counter still bounds the true count of every key hashed
        to it, so estimates never fall below the truth. The result can differ slightly from
        adding the keys one by one, since conservative update depends on order.

        >>> s = CountMinSketch(64, 3)
        >>> s.add_batch({"a": 2.0, "b": 1.0}).tolist(), s.total
        ([2.0, 1.0], 3.0)
        >>> s.add_batch({"a": 1.0}).tolist(), s.estimate("a")
        ([3.0], 3.0)
        """
        keys = list(counts)
        if not keys:
            return np.zeros(0, np.float64)
        values = np.fromiter(counts.values(), np.float64, len(keys))
        if not bool(np.all(values >= 0)):  # also refuses NaN
            raise ValueError("counts must be non-negative")
        flat = np.fromiter(itertools.chain.from_iterable(map(self._cells_of, keys)), np.intp,
                           self.depth * len(keys))
        idx = flat.reshape(len(keys), self.depth)
        self.total += float(values.sum())
        if self.conservative:
            raised = self._table[idx].min(axis=1) + values
            np.maximum.at(self._table, flat, np.repeat(raised, self.depth))
        else:
            np.add.at(self._table, flat, np.repeat(values, self.depth))
        result: npt.NDArray[np.float64] = self._table[idx].min(axis=1)
        return result

    def decay(self, factor: float) -> None:
        """Multiply every counter and the total by ``factor`` in ``[0, 1]`` (time decay).

        Scaling is linear, so the sketch stays a valid sketch of the decayed counts (still
        never below them, and ``N`` decays with them).

        >>> s = CountMinSketch(64, 3)
        >>> _ = s.add("a", 8.0)
        >>> s.decay(0.5)
        >>> s.estimate("a"), s.total
        (4.0, 4.0)
        """
        if not 0.0 <= factor <= 1.0:
            raise ValueError("decay factor must be in [0, 1]")
        self._table *= factor  # in place: keeps the memoryview valid
        self.total *= factor

    def scale(self, factor: float) -> None:
        """Multiply every counter and the total by any ``factor > 0`` (rebasing forward decay)."""
        if not factor > 0 or math.isinf(factor):
            raise ValueError("scale factor must be positive and finite")
        self._table *= factor
        self.total *= factor

    def clear(self) -> None:
        self._table[:] = 0.0
        self.total = 0.0

    # -- reads -------------------------------------------------------------------
    def estimate(self, key: str) -> float:
        """``min_i C[i, h_i(key)]``: never below the true count."""
        return min(map(self._cells.__getitem__, self._cells_of(key)))

    def estimate_many(self, keys: Iterable[str]) -> npt.NDArray[np.float64]:
        """Estimates of many keys at once (one gather and one ``min`` over rows)."""
        # A hit without the method call (most reads are hits; a cached list is never empty).
        cached, cells_of = self._cell_cache.get, self._cells_of
        cells = [cached(k) or cells_of(k) for k in keys]
        if not cells:
            return np.zeros(0, np.float64)
        # One flat pass (a 2-D array from a list of lists costs a microsecond a key).
        idx = np.fromiter(itertools.chain.from_iterable(cells), dtype=np.int64,
                          count=len(cells) * self.depth).reshape(len(cells), self.depth)
        result: npt.NDArray[np.float64] = self._table[idx].min(axis=1)
        return result

    def __contains__(self, key: object) -> bool:
        """Possibly seen (no false negatives; false positives as a Bloom filter)."""
        return isinstance(key, str) and self.estimate(key) > 0.0

    # -- combine -----------------------------------------------------------------
    def compatible(self, other: CountMinSketch) -> bool:
        return (self.width, self.depth, self.seed) == (other.width, other.depth, other.seed)

    def merge(self, other: CountMinSketch) -> CountMinSketch:
        """A new sketch of the union of both streams: counters and totals add.

        For plain sketches the result equals the sketch of the concatenated stream exactly.
        For conservative ones it is still a valid upper bound (each counter bounds the sum of
        its keys' counts in both streams), but may be larger than sketching the union
        directly, since conservative update depends on arrival order.
        """
        if not self.compatible(other):
            raise ValueError("can only merge sketches with the same width, depth and seed")
        out = CountMinSketch(self.width, self.depth, self.seed,
                             self.conservative and other.conservative)
        np.add(self._table, other._table, out=out._table)
        out.total = self.total + other.total
        return out

    def copy(self) -> CountMinSketch:
        out = CountMinSketch(self.width, self.depth, self.seed, self.conservative)
        out._table[:] = self._table
        out.total = self.total
        return out

    # -- serialisation -------------------------------------------------------------
    def to_bytes(self, compress: bool = True) -> bytes:
        """Header + little-endian float64 counters, zlib-compressed by default (a sparse or
        young sketch shrinks a lot; level 1 keeps it cheap enough for a changelog)."""
        payload = self._table.astype("<f8", copy=False).tobytes()
        flags = _FLAG_CONSERVATIVE if self.conservative else 0
        if compress:
            payload = zlib.compress(payload, 1)
            flags |= _FLAG_ZLIB
        header = _HEADER.pack(_MAGIC, _VERSION, flags, self.width, self.depth, self.seed,
                              self.total)
        return header + payload

    @classmethod
    def from_bytes(cls, data: bytes) -> CountMinSketch:
        magic, version, flags, width, depth, seed, total = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError("not a tailstream Count-Min sketch (or an unknown version)")
        payload = data[_HEADER.size:]
        if flags & _FLAG_ZLIB:
            payload = zlib.decompress(payload)
        if len(payload) != 8 * width * depth:
            raise ValueError("truncated sketch payload")
        out = cls(width, depth, seed, bool(flags & _FLAG_CONSERVATIVE))
        out._table[:] = np.frombuffer(payload, dtype="<f8")
        out.total = total
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CountMinSketch):
            return NotImplemented
        return (self.compatible(other) and self.conservative == other.conservative
                and self.total == other.total and bool(np.array_equal(self._table, other._table)))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"CountMinSketch(width={self.width}, depth={self.depth}, seed={self.seed}, "
                f"conservative={self.conservative}, total={self.total:g})")


class ItemFrequency:
    """Decayed item frequencies in bounded memory: a Count-Min sketch for every item plus
    the ``capacity`` items with the largest estimates (heavy hitters).

    * ``estimate(i)`` — decayed count, never below the true decayed count, at most
      ``ε·N`` above it with probability ``1 − δ``.
    * ``share(i) = estimate(i) / N`` — the streaming estimate of the sampling probability
      ``q(i)`` of item ``i`` in in-batch negatives (Yi et al., RecSys 2019), used as
      ``s(x, i) − log q(i)``; ``log_q`` floors it at ``q_floor`` so it is never ``−inf``.
    * ``tier(i)`` — items sorted by estimate, the smallest prefix holding ``head_share``
      of all interactions is *head*, the next ``torso_share`` *torso*, the rest *tail*
      (same rule as :class:`~tailstream.models.serving.popularity.PopularityTracker`), computed
      over the heavy hitters only: an item not among them is tail.

    Decay is forward decay (Cormode et al., ICDE 2009): an event at ``t`` adds
    ``w · 2^((t − t0)/h)``; all stored values share the factor ``2^(−(now − t0)/h)``, so
    shares, ranks and tiers need no decay at all, and counts are scaled only when read.

    Heavy hitters keep the top ``capacity`` items by sketch estimate: on each observation
    the item's new estimate is compared with the smallest kept one (a min-heap with lazy
    deletion). Under forward decay estimates only grow, so a true heavy item, whose
    estimate is at least its true count, cannot stay out once it is above the kept minimum.

    >>> f = ItemFrequency(capacity=10, width=512, depth=4, half_life_s=None)
    >>> for item, n in [("a", 6), ("b", 2), ("c", 1), ("d", 1)]:
    ...     f.observe(item, float(n))
    >>> f.share("a")
    0.6
    >>> [f.tier(i) for i in "abcde"]
    ['head', 'torso', 'tail', 'tail', 'tail']
    >>> f.heavy_hitters(2)
    [('a', 6.0), ('b', 2.0)]
    """

    # Rebase (multiply everything by 2^-exponent) once boosts pass 2^64: values stay far
    # from float overflow and old items keep their relative precision.
    _REBASE_EXPONENT = 64.0

    def __init__(self, capacity: int = 1000, width: int = 2**14, depth: int = 5,
                 half_life_s: float | None = 3600.0, q_floor: float = 1e-9, seed: int = 0,
                 conservative: bool = True) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if half_life_s is not None and not half_life_s > 0:
            raise ValueError("half_life_s must be positive (or None for no decay)")
        if not 0 < q_floor < 1:
            raise ValueError("q_floor must be in (0, 1)")
        self.capacity = capacity
        self.half_life_s = half_life_s
        self.q_floor = q_floor
        self.sketch = CountMinSketch(width, depth, seed, conservative)
        self._t0: float | None = None
        self._last_ts: float | None = None
        self._hh: dict[str, float] = {}  # item -> boosted estimate
        self._heap: list[tuple[float, str]] = []  # (boosted estimate, item), lazily stale
        self._version = 0
        self._tier_cache: tuple[int, float, float, dict[str, str]] | None = None

    # -- updates ---------------------------------------------------------------------
    def observe(self, item_id: str, weight: float = 1.0, ts: float | None = None) -> None:
        """Count one interaction of ``weight ≥ 0`` at ``ts`` (seconds; default: the latest
        time seen). Out-of-order events are fine: an older one simply counts less."""
        if weight < 0:
            raise ValueError("weight must be non-negative")
        boost = weight
        if self.half_life_s is not None:
            if ts is None:
                ts = self._last_ts if self._last_ts is not None else 0.0
            if self._t0 is None:
                self._t0 = ts
            exponent = (ts - self._t0) / self.half_life_s
            if exponent > self._REBASE_EXPONENT:
                self._rebase(ts)
                exponent = 0.0
            boost = weight * math.pow(2.0, exponent)
        if ts is not None and (self._last_ts is None or ts > self._last_ts):
            self._last_ts = ts
        value = self.sketch.add(item_id, boost)
        self._offer(item_id, value)
        self._version += 1

    def observe_batch(self, item_ids: Sequence[str], ts: Sequence[float]) -> None:
        """Count one interaction per entry, at its time: the boosts are summed per item
        (forward decay makes that exact) and added with one :meth:`CountMinSketch.add_batch`;
        each item is offered to the heavy hitters once.

        >>> f = ItemFrequency(capacity=10, width=512, depth=4, half_life_s=60.0)
        >>> f.observe_batch(["a", "b", "a"], [0.0, 0.0, 60.0])
        >>> round(f.estimate("a"), 6), round(f.estimate("b"), 6)
        (1.5, 0.5)
        """
        if not item_ids:
            return
        times = np.asarray(ts, dtype=np.float64)
        newest = float(times.max())
        if self.half_life_s is None:
            boosts = [1.0] * len(item_ids)
        else:
            if self._t0 is None:
                self._t0 = float(times[0])
            if (newest - self._t0) / self.half_life_s > self._REBASE_EXPONENT:
                self._rebase(newest)
            boosts = np.exp2((times - self._t0) / self.half_life_s).tolist()
        if self._last_ts is None or newest > self._last_ts:
            self._last_ts = newest
        summed: dict[str, float] = {}
        for item, boost in zip(item_ids, boosts, strict=True):
            summed[item] = summed.get(item, 0.0) + boost
        estimates = self.sketch.add_batch(summed)
        for item, value in zip(summed, estimates.tolist(), strict=True):
            self._offer(item, value)
        self._version += 1

    def _offer(self, item_id: str, value: float) -> None:
        hh, heap = self._hh, self._heap
        if item_id in hh:
            hh[item_id] = value
            heapq.heappush(heap, (value, item_id))
        elif len(hh) < self.capacity:
            hh[item_id] = value
            heapq.heappush(heap, (value, item_id))
        else:
            self._drop_stale()
            if value > heap[0][0]:
                _, evicted = heapq.heappop(heap)
                del hh[evicted]
                hh[item_id] = value
                heapq.heappush(heap, (value, item_id))
        if len(heap) > 4 * self.capacity + 16:  # stale entries pile up for hot items
            self._heap = [(v, k) for k, v in hh.items()]
            heapq.heapify(self._heap)

    def _drop_stale(self) -> None:
        """Pop heap entries that no longer hold their item's current value."""
        heap, hh = self._heap, self._hh
        while heap and hh.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def _rebase(self, ts: float) -> None:
        assert self._t0 is not None and self.half_life_s is not None
        factor = math.pow(2.0, -(ts - self._t0) / self.half_life_s)
        if factor > 0.0:
            self.sketch.scale(factor)
        else:  # everything is older than ~1000 half-lives: it has decayed to nothing
            self.sketch.clear()
        self._hh = {k: v * factor for k, v in self._hh.items()}
        self._heap = [(v, k) for k, v in self._hh.items()]
        heapq.heapify(self._heap)
        self._t0 = ts

    def _now_factor(self, now: float | None) -> float:
        """``2^(−(now − t0)/h)``: boosted values → decayed counts at ``now``."""
        if self.half_life_s is None or self._t0 is None:
            return 1.0
        if now is None:
            now = self._last_ts if self._last_ts is not None else self._t0
        return math.pow(2.0, -(now - self._t0) / self.half_life_s)

    # -- reads -------------------------------------------------------------------------
    def estimate(self, item_id: str, now: float | None = None) -> float:
        """Decayed count of ``item_id`` at ``now`` (default: the latest event time)."""
        return self.sketch.estimate(item_id) * self._now_factor(now)

    def estimate_many(self, item_ids: Sequence[str]) -> list[float]:
        """:meth:`estimate` of many items at the latest event time (one gather), the same
        floats."""
        return (self.sketch.estimate_many(item_ids) * self._now_factor(None)).tolist()

    def total(self, now: float | None = None) -> float:
        """Decayed number of interactions ``N`` at ``now``."""
        return self.sketch.total * self._now_factor(now)

    def share(self, item_id: str) -> float:
        """``q(i) = count(i) / N`` (time-free: both decay by the same factor); 0 before any
        event. Slightly high for tail items, as the sketch never underestimates."""
        if self.sketch.total <= 0:
            return 0.0
        return min(1.0, self.sketch.estimate(item_id) / self.sketch.total)

    def log_q(self, item_ids: Iterable[str]) -> list[float]:
        """``log max(q(i), q_floor)`` for each item: finite for unseen items too.

        >>> f = ItemFrequency(width=64, depth=3, half_life_s=None, q_floor=1e-6)
        >>> f.observe("a", 3.0); f.observe("b", 1.0)
        >>> [round(x, 4) for x in f.log_q(["a", "b"])]
        [-0.2877, -1.3863]
        >>> [math.isfinite(x) for x in f.log_q(["never", "again"])]
        [True, True]
        """
        ids = list(item_ids)
        total = self.sketch.total
        if total <= 0 or not ids:
            return [math.log(self.q_floor)] * len(ids)
        est = self.sketch.estimate_many(ids) / total
        return [math.log(min(1.0, max(float(q), self.q_floor))) for q in est]

    def log_q_smoothed(self, item_ids: Iterable[str], n_items: int,
                       pseudo: float = 1.0) -> list[float]:
        """``log((c_i + a) / (N + a·n))``: additive smoothing over ``n_items`` items, so an
        item never seen has the prior of ``a`` interactions (cold start), not ``−inf``.

        >>> f = ItemFrequency(width=64, depth=3, half_life_s=None)
        >>> f.observe("a", 3.0)
        >>> [round(x, 4) for x in f.log_q_smoothed(["a", "new"], n_items=2)]
        [-0.2231, -1.6094]
        """
        ids = list(item_ids)
        if not ids:
            return []
        total = self.sketch.total + pseudo * max(n_items, 1)
        est = self.sketch.estimate_many(ids) if self.sketch.total > 0 else np.zeros(len(ids))
        log = math.log
        return [log((c + pseudo) / total) for c in est.tolist()]

    def heavy_hitters(self, k: int | None = None, now: float | None = None
                      ) -> list[tuple[str, float]]:
        """The kept items with their decayed estimates, largest first."""
        factor = self._now_factor(now)
        ranked = _ranked(self._hh)
        return [(item, value * factor) for item, value in ranked[:k]]

    def tiers(self, head_share: float = 0.5, torso_share: float = 0.3) -> dict[str, str]:
        """Tier of every heavy hitter (cached until the next observation)."""
        if not 0 < head_share < 1 or not 0 <= torso_share <= 1 - head_share + 1e-12:
            raise ValueError("need 0 < head_share < 1 and head_share + torso_share <= 1")
        cache = self._tier_cache
        if cache is not None and cache[:3] == (self._version, head_share, torso_share):
            return cache[3]
        ranked = _ranked(self._hh)
        # Shares are of *all* interactions (the sketch total), not just the kept ones.
        total = max(self.sketch.total, sum(v for _, v in ranked)) or 1.0
        head_cut, torso_cut = head_share, head_share + torso_share
        out: dict[str, str] = {}
        cum = 0.0
        for item, value in ranked:
            # As in PopularityTracker: judged on the share *before* the item, so the most
            # popular item is head even if it alone exceeds the cut.
            before = cum / total
            out[item] = "head" if before < head_cut else "torso" if before < torso_cut else "tail"
            cum += value
        self._tier_cache = (self._version, head_share, torso_share, out)
        return out

    def tier(self, item_id: str, head_share: float = 0.5, torso_share: float = 0.3) -> str:
        return self.tiers(head_share, torso_share).get(item_id, "tail")

    def tier_sizes(self, head_share: float = 0.5, torso_share: float = 0.3) -> dict[str, int]:
        """Number of heavy hitters per tier (items outside them are tail but uncounted)."""
        sizes = dict.fromkeys(TIERS, 0)
        for t in self.tiers(head_share, torso_share).values():
            sizes[t] += 1
        return sizes

    @property
    def memory_bytes(self) -> int:
        """Sketch counters plus a rough bound for the heavy-hitter dict and heap."""
        return self.sketch.memory_bytes + 200 * self.capacity


def _ranked(values: Mapping[str, float]) -> list[tuple[str, float]]:
    """Items by value, largest first, ties by name: two C-keyed sorts (stable, so the name
    order survives among equal values) instead of one with a tuple key per item.

    >>> _ranked({"b": 1.0, "a": 1.0, "c": 2.0})
    [('c', 2.0), ('a', 1.0), ('b', 1.0)]
    """
    return sorted(sorted(values.items()), key=itemgetter(1), reverse=True)
