"""Query → item retrieval from behaviour: what users interacted with after the same or a
similar query.

After a search for ``q`` by user ``u``, the next ``follow`` interactions of ``u`` (until
``u`` searches again) are attributed to ``q``; a search's own ``clicked_item_id`` counts
too, but only once the user's next interaction (or next search) has been observed: it is
the answer to whatever is recommended right after the search, so it must not be known
before. Each distinct item counts once per search, so ``n(q, i)`` is the number of
searches for ``q`` after which ``i`` was interacted with.

Queries are compared by TF-IDF over character n-grams (``n = 3`` by default, padded with
a space at each end like scikit-learn's ``char_wb`` analyzer, so typos and word order
cost a few n-grams only): ``w_q(g) = tf_q(g) · idf(g)``, ``idf(g) = ln((1 + N) / (1 +
df(g))) + 1`` (scikit-learn's smoothed idf, Salton & Buckley 1988) over the ``N``
distinct queries seen so far, and ``sim(q, q') = w_q · w_q' / (‖w_q‖ ‖w_q'‖)``. The idf
follows the stream, so similarities are always those of the queries seen so far.

For a query ``q`` the items are ranked by

    score(i) = Σ_{q' ∈ N(q)} sim(q, q') · n(q', i)

over the ``neighbours`` queries most similar to ``q`` (``q`` itself included, with
similarity 1) that reach ``min_similarity``. Candidates are the queries sharing one of
``q``'s ``probe`` rarest n-grams (the ones that decide the cosine), so a look-up never
scans every query. Torch-free, pure Python.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field


def normalise(query: str) -> str:
    """Lower case, runs of white space as one space.

    >>> normalise("  Red   MUG ")
    'red mug'
    """
    return " ".join(query.lower().split())


def char_ngrams(text: str, n: int = 3) -> Counter[str]:
    """Character n-gram counts of ``text`` padded with one space at each end.

    >>> sorted(char_ngrams("mug").items())
    [(' mu', 1), ('mug', 1), ('ug ', 1)]
    """
    padded = f" {text} "
    return Counter(padded[i:i + n] for i in range(max(1, len(padded) - n + 1)))


def tfidf(counts: Mapping[str, int], df: Mapping[str, int], n_docs: int) -> dict[str, float]:
    """L2-normalised TF-IDF weights, ``tf · (ln((1 + N) / (1 + df)) + 1)``.

    >>> w = tfidf({"ab": 1, "cd": 1}, {"ab": 3, "cd": 0}, n_docs=3)   # idf 1 and 1 + ln 4
    >>> round(w["ab"], 3), round(w["cd"], 3)
    (0.386, 0.922)
    """
    raw = {g: tf * (math.log((1 + n_docs) / (1 + df.get(g, 0))) + 1.0)
           for g, tf in counts.items()}
    norm = math.sqrt(sum(v * v for v in raw.values())) or 1.0
    return {g: v / norm for g, v in raw.items()}


def cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Dot product of two L2-normalised sparse vectors.

    >>> cosine({"x": 0.6, "y": 0.8}, {"y": 1.0})
    0.8
    """
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(g, 0.0) for g, v in a.items())


@dataclass
class _Session:
    query: str
    remaining: int
    clicked: str | None = None  # the search's clicked item, counted after the next event
    seen: set[str] = field(default_factory=set)


class QueryLookup:
    """Searches and the interactions that followed them; similar queries by TF-IDF.

    >>> ql = QueryLookup(follow=3)
    >>> ql.observe_search("u1", "red mug")
    >>> ql.observe("u1", "mug-7"); ql.observe("u1", "mug-7"); ql.observe("u1", "tea")
    >>> ql.observe_search("u2", "red mugs", clicked_item_id="mug-9")
    >>> [i for i, _ in ql.recommend("red mugs", 5)]     # mug-9 is the answer: not counted yet
    ['mug-7', 'tea']
    >>> ql.observe("u2", "mug-9")
    >>> [q for q, _ in ql.similar("red  mug", 5)]
    ['red mug', 'red mugs']
    >>> [i for i, _ in ql.recommend("Red mug", 5)]
    ['mug-7', 'tea', 'mug-9']
    """

    def __init__(self, n: int = 3, follow: int = 5, neighbours: int = 10,
                 min_similarity: float = 0.3, probe: int = 8) -> None:
        self.n = n
        self.follow = follow
        self.neighbours = neighbours
        self.min_similarity = min_similarity
        self.probe = probe
        self._grams: dict[str, Counter[str]] = {}  # distinct query → its n-gram counts
        self._df: Counter[str] = Counter()
        self._postings: dict[str, set[str]] = {}  # n-gram → queries with items
        self._items: dict[str, Counter[str]] = {}  # query → item → searches followed by it
        self._active: dict[str, _Session] = {}

    @property
    def queries(self) -> int:
        """Distinct queries seen."""
        return len(self._grams)

    def observe_search(self, user_id: str, query: str,
                       clicked_item_id: str | None = None) -> None:
        """A search: the user's next interactions count for ``query``."""
        q = normalise(query)
        if q not in self._grams:
            grams = char_ngrams(q, self.n)
            self._grams[q] = grams
            self._df.update(grams.keys())
        last = self._active.get(user_id)
        if last is not None and last.clicked is not None:
            self._count(last, last.clicked)
        self._active[user_id] = _Session(q, self.follow, clicked_item_id)

    def observe(self, user_id: str, item_id: str) -> None:
        """An interaction; counted for the user's last query while it is followed."""
        session = self._active.get(user_id)
        if session is None:
            return
        self._count(session, item_id)
        if session.clicked is not None:
            self._count(session, session.clicked)
            session.clicked = None
        session.remaining -= 1
        if session.remaining <= 0:
            del self._active[user_id]

    def _count(self, session: _Session, item_id: str) -> None:
        if item_id in session.seen:
            return
        session.seen.add(item_id)
        q = session.query
        items = self._items.get(q)
        if items is None:
            items = self._items[q] = Counter()
            for g in self._grams[q]:
                self._postings.setdefault(g, set()).add(q)
        items[item_id] += 1

    def similar(self, query: str, k: int) -> list[tuple[str, float]]:
        """Up to ``k`` queries with items, most similar first, with ``sim ≥
        min_similarity`` (the query itself first when it has items)."""
        q = normalise(query)
        grams = self._grams.get(q) or char_ngrams(q, self.n)
        n_docs = len(self._grams)
        vec = tfidf(grams, self._df, n_docs)
        probes = sorted((g for g in grams if g in self._postings),
                        key=lambda g: (self._df[g], g))[: self.probe]
        candidates = set().union(*(self._postings[g] for g in probes)) if probes else set()
        scored = []
        for other in candidates:
            sim = 1.0 if other == q else cosine(vec, tfidf(self._grams[other], self._df,
                                                             n_docs))
            if sim >= self.min_similarity:
                scored.append((other, sim))
        scored.sort(key=lambda kv: (-kv[1], kv[0]))
        return scored[:k]

    def recommend(self, query: str, k: int,
                  exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` items most interacted with after ``query`` and similar queries, best
        first (ties by id), without ``exclude``; fewer when nothing similar is known."""
        scores: dict[str, float] = {}
        for other, sim in self.similar(query, self.neighbours):
            for item, n in self._items[other].items():
                if item not in exclude:
                    scores[item] = scores.get(item, 0.0) + sim * n
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
