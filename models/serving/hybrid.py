"""Hybrid lists: the towers' candidates united with the stateful sources, scored by the
online blender, then the category cap and tail quota.

For a micro-batch of users (everything numeric batched, as in
:meth:`~tailstream.models.serving.scorer.Scorer.recommend`):

1. **Retrieval** from the item index by the user tower (the towers' own top
   ``candidates``), and, for a user whose last action was a search, **query match**: the
   query's vector projected into the item space (the same projection the outcome head's
   target attention uses for a context query) searched in the index.
2. **Union** with the stateful sources (:class:`~tailstream.models.serving.signals.Signals`:
   co-visitation, the user's categories, trending, the user's older items, query lookup),
   each contributing its reciprocal rank (:func:`~tailstream.models.serving.blend.union`).
3. **Facts** per candidate: the towers' cosine, the user's affinity to its category, log
   popularity and the tail flag; a first score ``w · x`` without engagement, then the
   outcome head's expected value for the best ``head_candidates`` only (the head is the
   expensive part), and the final score ``w · x``.
4. **Selection**: category cap and tail quota as in the transformer scorer
   (:func:`~tailstream.models.serving.scorer.select_positions`).

It returns the lists *and* each request's candidates, so the caller can teach the blender
with the user's next interaction (:meth:`~tailstream.models.serving.blend.OnlineBlender.learn`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tailstream.models.serving.blend import (
    FEATURES,
    CandidatePool,
    Candidates,
    HybridRequest,
    OnlineBlender,
    union_many,
)
from tailstream.models.serving.scorer import (
    ItemInfo,
    ListFeatures,
    Ranked,
    Scorer,
    Users,
    select_positions,
)
from tailstream.models.towers.two_tower import context_sims

QUERY_PREFIX = "search: "
"""How a query is written for the encoder (as in the user's context)."""
_F = {name: k for k, name in enumerate(FEATURES)}


@dataclass
class HybridList:
    ranked: list[Ranked]
    candidates: Candidates


@torch.inference_mode()
def hybrid_recommend(scorer: Scorer, batch: Sequence[HybridRequest], item_info: ItemInfo,
                     blender: OnlineBlender, features: ListFeatures | None = None
                     ) -> list[HybridList]:
    """Lists (and candidates) for ``batch`` (see the module docstring); ``features``:
    the count features of the items shown, for the outcomes a list carries.

    Every step after the union works on the whole micro-batch's candidates at once
    (:class:`~tailstream.models.serving.blend.CandidatePool`); per user, only plain
    Python walks the best few to apply the category cap and the tail quota."""
    if not batch:
        return []
    cfg = scorer.ranking
    requests = [h.request for h in batch]
    limit = ([h.known if h.known is not None else len(scorer.index) for h in batch]
             if any(h.known is not None for h in batch) else None)
    users = scorer.user_vectors(requests)
    neural = _search(scorer, users.vectors, cfg.candidates, [r.exclude for r in requests], limit)
    matched = _query_match(scorer, batch, limit)
    proposed: list[dict[str, list[str]]] = []
    for h, retrieved, by_query in zip(batch, neural, matched, strict=True):
        sources = {**h.sources, "retrieval": retrieved}
        if by_query:
            sources["query_match"] = by_query
        proposed.append(sources)
    pool = union_many(proposed, depth=cfg.candidates,
                      excludes=[h.request.exclude for h in batch])
    info = _batch_info(scorer, pool.ids, item_info)
    key = _facts(scorer, batch, users.vectors, pool, info)
    x = pool.x
    first = blender.scores(x) - blender.weight("engagement") * x[:, _F["engagement"]]
    tops = [None if len(o) == 0 else o[:cfg.head_candidates]
            for o in _orders(first, pool.start)]
    heads = _engagement(scorer, users, pool, key, tops, info)
    ranked = _select(scorer, batch, pool, key, blender.scores(x), tops, heads, info, features)
    return [HybridList(r, c) for r, c in zip(ranked, pool.candidates(), strict=True)]


def _orders(score: np.ndarray, start: np.ndarray) -> list[np.ndarray]:
    """Each user's rows (positions within the user's) by descending score, stable — one
    sort of a padded ``[B, max n]`` array for the whole batch.

    >>> [o.tolist() for o in _orders(np.array([1.0, 3.0, 3.0, 2.0]), np.array([0, 3, 3, 4]))]
    [[1, 2, 0], [], [0]]
    """
    counts = np.diff(start)
    b = len(counts)
    if b == 0 or len(score) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(b)]
    owner = np.repeat(np.arange(b), counts)
    padded = np.full((b, int(counts.max())), np.inf)
    padded[owner, np.arange(len(score)) - start[owner]] = -score
    order = np.argsort(padded, axis=1, kind="stable")
    return [order[u, :n] for u, n in enumerate(counts.tolist())]


@dataclass
class Facts:
    """Tier, category, log q and index row of every distinct candidate of one
    micro-batch, as arrays over them (``at``: item → position), so each user's feature
    columns are gathers instead of a Python loop over ~300 candidates."""

    at: dict[str, int]
    tiers: list[str]
    cats: list[str | None]
    log_q: np.ndarray
    rows: np.ndarray
    """Row in the item index, −1 for an item the index does not hold."""
    tail: np.ndarray
    cat_code: np.ndarray
    """Position of the item's category in ``cat_names``; ``len(cat_names)`` for none."""
    cat_names: dict[str, int]


def _batch_info(scorer: Scorer, ids_of: Sequence[Sequence[str]], item_info: ItemInfo
                ) -> Facts:
    """Tier, category, log q and index row of every candidate of the micro-batch, in one
    ``item_info`` call: users' candidates overlap (trending is one list for everyone,
    categories are shared), and the selection reads the same items again — two calls per
    user had been a quarter of a worker's scoring thread (sketch gathers and lookups)."""
    ids = list(dict.fromkeys(i for user_ids in ids_of for i in user_ids))
    tiers, cats, log_q = item_info(ids)
    rows = scorer.index.rows_of(ids)
    names: dict[str, int] = {}
    for c in cats:
        if c and c not in names:  # an empty category is no category (no affinity)
            names[c] = len(names)
    none = len(names)
    codes = np.fromiter((names.get(c, none) if c else none for c in cats), dtype=np.int64,
                        count=len(cats))
    tail = np.fromiter((t == "tail" for t in tiers), dtype=bool, count=len(ids))
    return Facts({i: k for k, i in enumerate(ids)}, list(tiers), list(cats),
                 np.asarray(log_q, dtype=np.float64), rows, tail, codes, names)


def _search(scorer: Scorer, vectors: torch.Tensor, k: int, exclude: Sequence[set[str]],
            limit: Sequence[int] | None, memory: bool = True) -> list[list[str]]:
    if len(scorer.index) == 0 or len(vectors) == 0:
        return [[] for _ in range(len(vectors))]
    sim, rows = scorer.index.search_rows(vectors, k, exclude=exclude, limit=limit,
                                         memory=memory)
    ok = torch.isfinite(sim).tolist()
    return [[scorer.index.id_of(r) for r, good in zip(row, valid, strict=True) if good]
            for row, valid in zip(rows.tolist(), ok, strict=True)]


def _query_match(scorer: Scorer, batch: Sequence[HybridRequest],
                 limit: Sequence[int] | None) -> list[list[str]]:
    """The index searched by each request's query (empty for requests without one)."""
    asked = [b for b, h in enumerate(batch) if h.query]
    out: list[list[str]] = [[] for _ in batch]
    if not asked:
        return out
    texts = [QUERY_PREFIX + str(batch[b].query) for b in asked]
    vecs = scorer.served.model.context_items(scorer.texts.vectors(texts)[:, None, :])[:, 0]
    found = _search(scorer, vecs, scorer.ranking.candidates // 2,
                    [batch[b].request.exclude for b in asked],
                    [limit[b] for b in asked] if limit is not None else None,
                    memory=False)  # a query matches texts; id memory is for users
    for b, ids in zip(asked, found, strict=True):
        out[b] = ids
    return out


def _facts(scorer: Scorer, batch: Sequence[HybridRequest], users: torch.Tensor,
           pool: CandidatePool, info: Facts) -> np.ndarray:
    """Fill cosine, category affinity, log popularity and tail for every candidate; drop
    candidates the index does not hold (they cannot be scored or explained). Returns each
    candidate row's position in ``info``."""
    at = info.at
    key = np.fromiter((at[i] for ids in pool.ids for i in ids), dtype=np.int64,
                      count=int(pool.start[-1]))
    rows = info.rows[key]
    held = rows >= 0
    if not held.all():
        pool.keep(held)
        key, rows = key[held], rows[held]
    if len(key) == 0:
        return key
    owner = pool.owner
    x = pool.x
    x[:, _F["cosine"]] = _cosines(scorer.index.search_matrix, users, rows, owner)
    affinity = np.zeros((len(batch), len(info.cat_names) + 1))
    for b, h in enumerate(batch):
        top = max(h.affinity.values(), default=0.0)
        if top > 0:
            for cat, weight in h.affinity.items():
                code = info.cat_names.get(cat)
                if code is not None:
                    affinity[b, code] = weight / top
    x[:, _F["category_affinity"]] = affinity[owner, info.cat_code[key]]
    x[:, _F["log_popularity"]] = info.log_q[key]
    x[:, _F["tail"]] = info.tail[key]
    return key


def _cosines(matrix: torch.Tensor, users: torch.Tensor, rows: np.ndarray,
             owner: np.ndarray, chunk: int = 16_384) -> np.ndarray:
    """``matrix[rows[n]] · users[owner[n]]`` for every candidate row (the retrieval
    score's item side, id memory included), in chunks of ``chunk`` rows: a few torch
    calls a turn, never a gather of every row at once."""
    r = torch.from_numpy(rows).to(matrix.device)
    o = torch.from_numpy(owner).to(matrix.device)
    u = users.float()
    out = torch.empty(len(rows), device=matrix.device)
    for s in range(0, len(rows), chunk):
        v = matrix[r[s:s + chunk]].float()
        out[s:s + chunk] = torch.einsum("nd,nd->n", v, u[o[s:s + chunk]])
    return out.cpu().numpy()


@dataclass
class Heads:
    """The outcome head's class probabilities of every user's head candidates, one row
    each: user ``b``'s ``n``-th is row ``first[b] + n`` (``first[b]`` −1: none)."""

    proba: np.ndarray
    first: list[int]


def _engagement(scorer: Scorer, users: Users, pool: CandidatePool, key: np.ndarray,
                tops: Sequence[np.ndarray | None], info: Facts) -> Heads:
    """The outcome head's class probabilities for each user's chosen candidates; their
    expected value goes into the engagement feature. One head call for the whole
    micro-batch, the users' candidates padded to the longest
    (:meth:`~tailstream.models.towers.two_tower.TwoTowerRecommender.grouped_logits`:
    each user's context is used in place, never copied per candidate); each row is
    computed as for the pair alone, so the probabilities are the same."""
    live = [(b, top) for b, top in enumerate(tops) if top is not None]
    first = [-1] * len(tops)
    if not live:
        return Heads(np.zeros((0, len(scorer.served.model.config.classes))), first)
    lens = [len(top) for _, top in live]
    flat = np.concatenate([pool.start[b] + top for b, top in live])  # rows in the pool
    slot_row = np.repeat(np.arange(len(live)), lens)
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    slot_col = np.arange(len(flat)) - np.repeat(offsets, lens)
    rows = np.zeros((len(live), max(lens)), dtype=np.int64)
    rows[slot_row, slot_col] = info.rows[key[flat]]  # the padding scores row 0, never read
    matrix = scorer.index.matrix
    at = torch.tensor([b for b, _ in live], device=matrix.device)
    v = matrix[torch.from_numpy(rows).to(matrix.device)].float()
    logits = scorer.served.model.grouped_logits(
        users.vectors[at], v, context_sims(v, users.ctx_items[at]), users.mask[at],
        ctx_kinds=users.kinds[at])
    proba = torch.softmax(logits, dim=-1)[torch.from_numpy(slot_row).to(matrix.device),
                                          torch.from_numpy(slot_col).to(matrix.device)]
    pool.x[flat, _F["engagement"]] = (proba @ scorer.value_weights).cpu().numpy()
    for (b, _), o in zip(live, offsets.tolist(), strict=True):
        first[b] = o
    return Heads(proba.cpu().numpy(), first)


def _select(scorer: Scorer, batch: Sequence[HybridRequest], pool: CandidatePool,
            key: np.ndarray, score: np.ndarray, tops: Sequence[np.ndarray | None],
            heads: Heads, info: Facts, features: ListFeatures | None
            ) -> list[list[Ranked]]:
    """Each user's list from the final scores: the category cap and tail quota in plain
    Python per user, then the outcomes of every list's head-scored items in one
    :meth:`~tailstream.models.serving.scorer.Scorer.outcomes` call."""
    cfg = scorer.ranking
    k = cfg.k
    score_l, key_l = score.tolist(), key.tolist()
    tail_l = (pool.x[:, _F["tail"]] > 0.5).tolist()
    plans: list[tuple[int, list[int], list[int], dict[int, int], list[str], list[str],
                      list[str | None]]] = []
    head_rows: list[int] = []
    asks: list[tuple[str, list[str]]] = []
    for b, (order_b, top) in enumerate(zip(_orders(score, pool.start), tops, strict=True)):
        if top is None:
            continue
        s0 = int(pool.start[b])
        order = order_b.tolist()
        kth = score_l[s0 + order[min(k, len(order)) - 1]]
        prefix = order[:4 * k] + [j for j in order[4 * k:] if tail_l[s0 + j]
                                  and score_l[s0 + j] >= kth - cfg.tail_margin]
        ids = [pool.ids[b][j] for j in prefix]
        tiers = [info.tiers[key_l[s0 + j]] for j in prefix]
        cats = [info.cats[key_l[s0 + j]] for j in prefix]
        picked = select_positions([score_l[s0 + j] for j in prefix], tiers, cats, k,
                                  cfg.tail_share, cfg.tail_margin, cfg.max_per_category)
        head_row = {j: n for n, j in enumerate(top.tolist())}
        scored = [pos for pos in picked if prefix[pos] in head_row]
        head_rows.extend(heads.first[b] + head_row[prefix[pos]] for pos in scored)
        asks.append((batch[b].request.user_id, [ids[pos] for pos in scored]))
        plans.append((b, prefix, picked, head_row, ids, tiers, cats))
    p_buy, p_cart, outcome = scorer.outcomes(
        heads.proba[np.asarray(head_rows, dtype=np.int64)],
        *scorer.list_inputs_many(features, asks))
    shown: list[int] = []  # every list's rows in the pool, and their categories
    shown_cats: list[str | None] = []
    for b, prefix, picked, *_, cats in plans:
        shown.extend(int(pool.start[b]) + prefix[pos] for pos in picked)
        shown_cats.extend(cats[pos] for pos in picked)
    reasons = iter(_reasons(pool.x[shown][:, _REASON_COLUMNS], shown_cats))
    out: list[list[Ranked]] = [[] for _ in batch]
    n = 0
    for b, prefix, picked, head_row, ids, tiers, cats in plans:
        s0 = int(pool.start[b])
        ranked = []
        for pos in picked:
            j = prefix[pos]
            buy, cart, what = 0.0, 0.0, ""
            if j in head_row:
                buy, cart, what = p_buy[n], p_cart[n], outcome[n]
                n += 1
            ranked.append(Ranked(ids[pos], score_l[s0 + j], tiers[pos], next(reasons),
                                 cats[pos], buy, cart, what))
        out[b] = ranked
    return out


_REASONS = (("rr_query_match", "matches your search"), ("rr_query_lookup",
                                                        "popular after similar searches"),
            ("rr_covisitation", "often viewed after what you just viewed"),
            ("rr_history", "you looked at this before"),
            ("rr_category", "popular in {cat}"), ("rr_retrieval", "similar to what you viewed"),
            ("rr_trending", "trending now"))


_REASON_COLUMNS = [_F[feature] for feature, _ in _REASONS]


def _reasons(rows: np.ndarray, categories: Sequence[str | None]) -> list[str]:
    """For each shown candidate (``rows``: its :data:`_REASON_COLUMNS`), the source that
    ranked it highest, in words: the first column, in :data:`_REASONS`' order, above every
    earlier one by more than 1e-9 ("popular right now" when none is above 0) — a few
    array operations for a whole turn, not a Python loop per item.

    >>> x = np.zeros((3, len(_REASONS)))
    >>> x[0, 2], x[1, 4], x[1, 6] = 0.5, 1.0, 1.0
    >>> _reasons(x, [None, "home/mug", None])
    ['often viewed after what you just viewed', 'popular in home/mug', 'popular right now']
    """
    values = np.asarray(rows, dtype=np.float64)
    best = np.zeros(len(values))
    which = np.full(len(values), -1)
    for c in range(values.shape[1]):
        up = values[:, c] > best + 1e-9
        best = np.where(up, values[:, c], best)
        which = np.where(up, c, which)
    return [_REASONS[w][1].format(cat=(category or "its category")[:40]) if w >= 0
            else "popular right now"
            for w, category in zip(which.tolist(), categories, strict=True)]
