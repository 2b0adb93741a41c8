"""Item-to-item co-visitation over users' recent sequences, updated per event.

When user ``u`` interacts with item ``j`` at time ``t``, every item ``i`` among the user's
``window`` most recent distinct items (``i`` at distance ``d = 1, 2, …``) gains

    w(i → j) += c · b(t) / d          (what followed i)
    w(j → i) += β · c · b(t) / d      (what preceded j, weaker: ``backward`` = β)

with ``c`` the event's weight (its class) and ``b(t) = 2^(t/h)`` the forward-decay boost
(:class:`~tailstream.models.serving.trending.ForwardDecay`), so pairs fade with half-life
``h``: recency-weighted twice, by position in the sequence and by time. This is the
co-visitation matrix of session-based retrieval (Ludewig & Jannach, "Evaluation of
Session-based Recommendation Algorithms", UMUAI 2018: "simple association rules"; the
Kaggle OTTO 2023 winners' candidate generators), kept online.

A user with recent items ``r_1, r_2, …`` (most recent first) gets

    score(j) = Σ_l  w(r_l → j) / W(r_l) / l ,   W(i) = Σ_j w(i → j)

(each recent item's neighbours as a distribution, nearer items first). Only the best
``neighbours`` of each item are read when scoring (kept exactly by a
:class:`~tailstream.models.serving.trending.TopSet`, as weights only grow; ties to the
smaller id), so a list costs
``window × neighbours`` look-ups whatever the catalogue size. Torch-free.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence

from tailstream.models.serving.trending import ForwardDecay, TopSet


class Covisitation:
    """Co-visitation weights, the users' recent sequences, and per-item top neighbours.

    >>> cv = Covisitation(half_life=100.0, window=3)
    >>> for t, (user, item) in enumerate([("u1", "a"), ("u1", "b"), ("u2", "a"),
    ...                                   ("u2", "b"), ("u3", "a"), ("u3", "c")]):
    ...     cv.observe(user, item, float(t))
    >>> [i for i, _ in cv.recommend(["a"], k=2)]      # b followed a twice, c once
    ['b', 'c']
    >>> [i for i, _ in cv.recommend(["b"], k=2)]      # only what preceded b
    ['a']
    """

    def __init__(self, half_life: float, window: int = 5, backward: float = 0.5,
                 neighbours: int = 50) -> None:
        self.decay = ForwardDecay(half_life)
        self.window = window
        self.backward = backward
        self.neighbours = neighbours
        self._rows: dict[str, _Row] = {}
        self._recent: dict[str, deque[str]] = {}

    def observe(self, user_id: str, item_id: str, t: float, weight: float = 1.0) -> None:
        """One interaction (times non-decreasing across calls)."""
        if self.decay.needs_rebase(t):
            self._rebase(t)
        boost = weight * self.decay.boost(t)  # every event: the first sets the origin
        recent = self._recent.get(user_id)
        if recent is None:
            recent = self._recent[user_id] = deque(maxlen=self.window)
        elif recent:
            rows, row_of, backward = self._rows, self._row, self.backward
            mine: _Row | None = None  # the item's own row, looked up once for its pairs
            for d, prev in enumerate(recent, 1):
                if prev != item_id:
                    (rows.get(prev) or row_of(prev)).add(item_id, boost / d)
                    if backward > 0:
                        if mine is None:
                            mine = row_of(item_id)
                        mine.add(prev, backward * boost / d)
            if item_id in recent:
                recent.remove(item_id)
        recent.appendleft(item_id)

    def _row(self, src: str) -> _Row:
        row = self._rows.get(src)
        if row is None:
            row = self._rows[src] = _Row(TopSet(self.neighbours))
        return row

    def _rebase(self, t: float) -> None:
        factor = self.decay.rebase(t)
        for row in self._rows.values():
            weights = row.weights
            for key in weights:
                weights[key] *= factor
            row.total *= factor
            row.top.rescale(factor)

    def recent(self, user_id: str) -> list[str]:
        """The user's recent distinct items as this model saw them, most recent first."""
        return list(self._recent.get(user_id, ()))

    def neighbours_of(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` items most co-visited with ``item_id``, with their share of its weight.

        >>> cv = Covisitation(half_life=10.0, backward=0.0)
        >>> cv.observe("u", "a", 0.0); cv.observe("u", "b", 0.0)
        >>> cv.neighbours_of("a", 3), cv.neighbours_of("b", 3)
        ([('b', 1.0)], [])
        """
        best, values, total = self._top(item_id, k)
        return [(j, values[j] / total) for j in best]

    def _top(self, item_id: str, k: int) -> tuple[list[str], dict[str, float], float]:
        """The item's best ``k`` neighbours, their weights and the row's total ``W(i)``
        (1 for an empty row): a neighbour's share is its weight over the total."""
        row = self._rows.get(item_id)
        if row is None:
            return [], {}, 1.0
        return row.top.best(k=k), row.top.values, row.total or 1.0

    def recommend(self, recent: Sequence[str], k: int,
                  exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` best items after ``recent`` (most recent first), without ``recent``
        and ``exclude``, best first (ties by id); fewer when the neighbours run out."""
        scores: dict[str, float] = {}
        skip = set(exclude) | set(recent)
        for pos, src in enumerate(recent[: self.window], 1):
            # neighbours_of's shares, without a (neighbour, share) tuple each: the same floats
            best, values, total = self._top(src, self.neighbours)
            for j in best:
                if j not in skip:
                    scores[j] = scores.get(j, 0.0) + values[j] / total / pos
        # (−score, id) tuples sort as ``key=lambda kv: (-kv[1], kv[0])`` without a Python
        # call per neighbour; negating a float twice gives it back exactly.
        ranked = sorted([(-v, j) for j, v in scores.items()])[:k]
        return [(j, -v) for v, j in ranked]


class _Row:
    """What followed (and preceded) one item: ``w(i → j)`` for every ``j`` seen, their sum
    ``W(i)`` and the best ``neighbours`` of them."""

    __slots__ = ("weights", "total", "top")

    def __init__(self, top: TopSet) -> None:
        self.weights: dict[str, float] = {}
        self.total = 0.0
        self.top = top

    def add(self, dst: str, value: float) -> None:
        weights = self.weights
        weight = weights[dst] = weights.get(dst, 0.0) + value
        self.total += value
        self.top.offer(dst, weight)
