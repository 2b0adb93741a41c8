"""The final ranking: candidates from every source, one learned linear score, fitted online.

A list is drawn from the union of several candidate sources — the two towers' retrieval,
item co-visitation, the user's category × popularity, trending, the user's own older
items, and, after a search, the items that followed similar queries and the items whose
vectors match the query. Each candidate gets a feature row: its **reciprocal rank** in
every source that proposed it (0 where none did), plus the outcome head's expected value,
the item's log popularity and a tail flag. The score is ``s = w · x``.

Reciprocal ranks are scale-free, so the same features mean the same thing on every log
(reciprocal-rank fusion, Cormack, Clarke & Büttcher, SIGIR 2009, is ``w = 1`` on them);
the weights are learned per stream, online, by a listwise softmax over the candidates
shown (ListNet-style, Cao et al., ICML 2007): when the user's next interaction hits a
candidate ``t`` of the list they were last given,

    ∇ = x_t − Σ_j p_j x_j ,   p = softmax(w · X)      (ascent on log p_t)

with AdaGrad step sizes (Duchi, Hazan & Singer, JMLR 2011) and a little L2 pull towards
the starting weights. Test-then-train: a list is always made with weights learned only
from events before it. So whichever source predicts a stream best earns its weight on
that stream — co-visitation on a browsing log, the query sources on a search log —
instead of a fixed blend tuned to one shop.

Torch-free (numpy): the worker, the trainer and ``tailstream eval`` share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tailstream.models.towers.context import UserRequest

SOURCES: tuple[str, ...] = ("retrieval", "covisitation", "category", "trending", "history",
                            "query_lookup", "query_match")
"""Candidate sources, in feature order (each contributes its reciprocal rank)."""
EXTRA: tuple[str, ...] = ("cosine", "category_affinity", "engagement", "log_popularity",
                          "tail")
"""Per-candidate facts: the towers' cosine, the user's affinity to the item's category
(0-1), the outcome head's expected value (0-1), log popularity, a tail flag."""
BUCKETS = 6
"""Rank buckets per source: ranks 1, 2-3, 4-7, 8-15, 16-31, 32+ (a one-hot each)."""
FEATURES: tuple[str, ...] = (*(f"rr_{s}" for s in SOURCES),
                             *(f"{s}@{b}" for s in SOURCES for b in range(BUCKETS)), *EXTRA)
START: dict[str, float] = {**{f"rr_{s}": 5.0 for s in SOURCES},
                           **{f"{s}@{b}": 0.0 for s in SOURCES for b in range(BUCKETS)},
                           "cosine": 2.0, "category_affinity": 1.0, "engagement": 0.5,
                           "log_popularity": 0.05, "tail": 0.0}
"""Starting weights: reciprocal-rank fusion (an item first in one source scores 5), small
nudges from the towers, the user's categories, engagement and popularity; the stream moves
them. The rank buckets start at 0 and learn each source's own rank → relevance curve
(a linear model over reciprocal ranks alone cannot: 1/rank falls too fast for one source
and too slowly for another)."""


def rank_bucket(rank: int) -> int:
    """``min(⌊log₂(rank + 1)⌋, BUCKETS − 1)`` for a 0-based rank.

    >>> [rank_bucket(r) for r in (0, 1, 2, 3, 7, 40, 99)]
    [0, 1, 1, 2, 3, 5, 5]
    """
    return min((rank + 1).bit_length() - 1, BUCKETS - 1)


_INDEX = {name: k for k, name in enumerate(FEATURES)}


def reciprocal_ranks(ranked: Sequence[str], depth: int) -> dict[str, float]:
    """``1 / (rank + 1)`` of the first ``depth`` items (rank from 0).

    >>> reciprocal_ranks(["a", "b", "c"], 2)
    {'a': 1.0, 'b': 0.5}
    """
    return {item: 1.0 / (r + 1) for r, item in enumerate(ranked[:depth])}


@dataclass
class HybridRequest:
    """One user's request for a hybrid list: what the towers read, plus what the stateful
    sources proposed (:mod:`~tailstream.models.serving.hybrid`)."""

    request: UserRequest
    sources: dict[str, list[str]]
    affinity: Mapping[str, float]
    """The user's category affinities (any scale; normalised to the strongest)."""
    query: str | None = None
    known: int | None = None
    """Offline evaluation: only index rows ``< known`` may be proposed."""


@dataclass
class Candidates:
    """One request's candidate union: ids and their feature rows ``[n, F]``."""

    ids: list[str]
    x: np.ndarray

    def row(self, item_id: str) -> int | None:
        try:
            return self.ids.index(item_id)
        except ValueError:
            return None


def union(sources: Mapping[str, Sequence[str]], *, depth: int,
          extra: Mapping[str, Mapping[str, float]] | None = None,
          exclude: frozenset[str] | set[str] = frozenset()) -> Candidates:
    """The union of each source's first ``depth`` items (minus ``exclude``), in first-seen
    order, with reciprocal-rank features and the per-item ``extra`` features (a missing
    value is 0).

    >>> c = union({"covisitation": ["a", "b"], "trending": ["b", "c"]}, depth=2,
    ...           extra={"tail": {"c": 1.0}})
    >>> c.ids, c.x[:, FEATURES.index("rr_trending")].tolist()
    (['a', 'b', 'c'], [0.0, 1.0, 0.5])
    >>> c.x[:, FEATURES.index("tail")].tolist()
    [0.0, 0.0, 1.0]
    """
    pool = union_many([sources], depth=depth, excludes=[exclude])
    x = pool.x
    pos = {item: row for row, item in enumerate(pool.ids[0])}
    for name, values in (extra or {}).items():
        f = _INDEX[name]
        for item, value in values.items():
            row = pos.get(item)
            if row is not None:
                x[row, f] = value
    return Candidates(pool.ids[0], x)


@dataclass
class CandidatePool:
    """The candidate unions of a micro-batch of users in one feature array: user ``b``'s
    rows are ``x[start[b]:start[b + 1]]``, in the order of ``ids[b]``. Every column is
    then one array operation for the whole batch: per-user numpy and torch calls each
    give up the interpreter, and on a worker whose event loop is busy each such call
    waited for it again (a 256-user turn took 5 × as long beside the loop)."""

    ids: list[list[str]]
    x: np.ndarray
    start: np.ndarray

    @property
    def owner(self) -> np.ndarray:
        """``[N]``: the user (position in the batch) of every row."""
        return np.repeat(np.arange(len(self.ids)), np.diff(self.start))

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the rows where ``rows`` (bool ``[N]``) is true."""
        kept = rows.tolist()
        at = 0
        for b, ids in enumerate(self.ids):
            self.ids[b] = [i for i, k in zip(ids, kept[at:at + len(ids)], strict=True) if k]
            at += len(ids)
        self.x = self.x[rows]
        self.start = _starts(self.ids)

    def candidates(self) -> list[Candidates]:
        """Each user's :class:`Candidates`, with a copy of their rows (a list keeps its
        candidates until the user acts again: a view would keep the whole batch's)."""
        out = []
        for b, ids in enumerate(self.ids):
            out.append(Candidates(ids, self.x[self.start[b]:self.start[b + 1]].copy()))
        return out


def union_many(sources: Sequence[Mapping[str, Sequence[str]]], *, depth: int,
               excludes: Sequence[frozenset[str] | set[str]]) -> CandidatePool:
    """:func:`union` for each user of a micro-batch, in one :class:`CandidatePool`.

    >>> p = union_many([{"trending": ["a", "b"]}, {"covisitation": ["b"]}], depth=2,
    ...                excludes=[{"a"}, set()])
    >>> p.ids, p.start.tolist(), p.x[:, FEATURES.index("rr_covisitation")].tolist()
    ([['b'], ['b']], [0, 1, 2], [0.0, 1.0])
    """
    all_ids: list[list[str]] = []
    # (row, reciprocal-rank feature, its value) and (row, rank-bucket feature) of every
    # proposal, written with two array assignments for the whole batch (one per element
    # had been most of the union's time: a list makes ~400 of them).
    rows: list[int] = []
    rr_cols: list[int] = []
    rr_vals: list[float] = []
    bucket_cols: list[int] = []
    base = 0
    for user_sources, exclude in zip(sources, excludes, strict=True):
        ids: list[str] = []
        pos: dict[str, int] = {}
        for s, ranked in user_sources.items():
            f = _INDEX[f"rr_{s}"]
            first = _INDEX[f"{s}@0"]
            kept = [i for i in ranked if i not in exclude][:depth]
            for item in kept:
                row = pos.get(item)
                if row is None:
                    row = pos[item] = len(ids)
                    ids.append(item)
                rows.append(base + row)
            n = len(kept)
            rr, buckets = _rank_features(n)
            rr_cols.extend([f] * n)
            rr_vals.extend(rr)
            bucket_cols.extend([first + b for b in buckets])
        all_ids.append(ids)
        base += len(ids)
    x = np.zeros((base, len(FEATURES)), dtype=np.float32)
    if rows:
        x[rows, rr_cols] = rr_vals
        x[rows, bucket_cols] = 1.0
    return CandidatePool(all_ids, x, _starts(all_ids))


def _starts(ids: Sequence[Sequence[str]]) -> np.ndarray:
    """``[B + 1]`` int64: where each user's rows begin in a pool, then its length.

    >>> _starts([["a", "b"], [], ["c"]]).tolist(), _starts([]).dtype.name
    ([0, 2, 2, 3], 'int64')
    """
    return np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)


_RANKS_KEPT = 1024
_RR = [1.0 / (r + 1) for r in range(_RANKS_KEPT)]
_BUCKETS = [rank_bucket(r) for r in range(_RANKS_KEPT)]


def _rank_features(n: int) -> tuple[list[float], list[int]]:
    """``1 / (r + 1)`` and :func:`rank_bucket` of ranks ``0 … n−1`` (the first
    :data:`_RANKS_KEPT` computed once, at import: nothing shared is written later).

    >>> _rank_features(3)
    ([1.0, 0.5, 0.3333333333333333], [0, 1, 1])
    """
    if n <= _RANKS_KEPT:
        return _RR[:n], _BUCKETS[:n]
    return [1.0 / (r + 1) for r in range(n)], [rank_bucket(r) for r in range(n)]


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax of a vector.

    >>> softmax(np.array([0.0, np.log(3.0)])).round(2).tolist()
    [0.25, 0.75]
    """
    e = np.exp(z - z.max())
    return e / e.sum()


@dataclass
class OnlineBlender:
    """``score = w · x`` over :data:`FEATURES`, learned online (see the module docstring).

    >>> b = OnlineBlender(lr=0.5)
    >>> x = np.zeros((2, len(FEATURES)), np.float32)
    >>> x[0, FEATURES.index("rr_trending")] = 1.0      # trending says a
    >>> x[1, FEATURES.index("rr_covisitation")] = 1.0  # co-visitation says b
    >>> for _ in range(20):
    ...     b.learn(x, 1)                              # the user keeps taking b
    >>> int(np.argmax(b.scores(x)))
    1
    >>> b.weight("rr_covisitation") > b.weight("rr_trending")
    True
    """

    lr: float = 0.1
    l2: float = 1e-4
    w: np.ndarray = field(default_factory=lambda: np.array(
        [START[f] for f in FEATURES], dtype=np.float64))
    g2: np.ndarray = field(default_factory=lambda: np.full(len(FEATURES), 1e-8))
    updates: int = 0
    hits: int = 0
    """Learning events whose target was among the candidates (``updates``) / all offered."""
    offered: int = 0

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.w

    def learn(self, x: np.ndarray, target: int | None) -> None:
        """One listwise step: ``target`` is the row the user took (None: not a candidate,
        counted only)."""
        self.offered += 1
        if target is None or len(x) < 2:
            return
        x = np.asarray(x, dtype=np.float64)
        p = softmax(x @ self.w)
        start = np.array([START[f] for f in FEATURES])
        grad = x[target] - p @ x - self.l2 * (self.w - start)
        self.g2 += grad * grad
        self.w += self.lr * grad / np.sqrt(self.g2)
        self.updates += 1
        self.hits += 1

    def weight(self, name: str) -> float:
        return float(self.w[FEATURES.index(name)])

    def weights(self) -> dict[str, float]:
        return {f: round(float(v), 4) for f, v in zip(FEATURES, self.w, strict=True)}

    def to_state(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "w": self.w.tolist(), "g2": self.g2.tolist(),
                "updates": self.updates, "offered": self.offered, "lr": self.lr,
                "l2": self.l2}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> OnlineBlender:
        """Restore; features added since the state was written start at :data:`START`.

        >>> b = OnlineBlender(); b.w[0] = 9.0
        >>> float(OnlineBlender.from_state(b.to_state()).w[0])
        9.0
        """
        out = cls(lr=float(state.get("lr", 0.1)), l2=float(state.get("l2", 1e-4)))
        old = dict(zip(state.get("features", []), state.get("w", []), strict=False))
        g2 = dict(zip(state.get("features", []), state.get("g2", []), strict=False))
        for k, f in enumerate(FEATURES):
            if f in old:
                out.w[k] = float(old[f])
                out.g2[k] = float(g2.get(f, 1e-8))
        out.updates = int(state.get("updates", 0))
        out.offered = int(state.get("offered", 0))
        out.hits = out.updates
        return out
