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

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tailstream.models.serving.blend import (
    FEATURES,
    Candidates,
    HybridRequest,
    OnlineBlender,
    union,
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
    the count features of the items shown, for the outcomes a list carries."""
    if not batch:
        return []
    cfg = scorer.ranking
    requests = [h.request for h in batch]
    limit = ([h.known if h.known is not None else len(scorer.index) for h in batch]
             if any(h.known is not None for h in batch) else None)
    users = scorer.user_vectors(requests)
    neural = _search(scorer, users.vectors, cfg.candidates, [r.exclude for r in requests], limit)
    matched = _query_match(scorer, batch, limit)
    cands: list[Candidates] = []
    for h, retrieved, by_query in zip(batch, neural, matched, strict=True):
        sources = {**h.sources, "retrieval": retrieved}
        if by_query:
            sources["query_match"] = by_query
        cands.append(union(sources, depth=cfg.candidates, exclude=h.request.exclude))
    info = _batch_info(scorer, cands, item_info)
    keys = _facts(scorer, batch, users.vectors, cands, info)
    tops = [_head_candidates(blender, cand, cfg.head_candidates) for cand in cands]
    probas = _engagement(scorer, users, cands, keys, tops, info)
    out: list[HybridList] = []
    for h, cand, key, top, proba in zip(batch, cands, keys, tops, probas, strict=True):
        if top is None or proba is None:
            out.append(HybridList([], cand))
            continue
        score = blender.scores(cand.x)
        ranked = _select(scorer, cand, key, score, top, proba, info,
                         functools.partial(scorer.list_inputs, features, h.request.user_id))
        out.append(HybridList(ranked, cand))
    return out


def _head_candidates(blender: OnlineBlender, cand: Candidates, n: int) -> np.ndarray | None:
    """The best ``n`` candidates by the blender's score without engagement (the ones the
    outcome head scores); None when there are none."""
    if not cand.ids:
        return None
    first = blender.scores(cand.x) - blender.weight("engagement") * cand.x[:, _F["engagement"]]
    return np.argsort(-first, kind="stable")[:n]


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


def _batch_info(scorer: Scorer, cands: Sequence[Candidates], item_info: ItemInfo) -> Facts:
    """Tier, category, log q and index row of every candidate of the micro-batch, in one
    ``item_info`` call: users' candidates overlap (trending is one list for everyone,
    categories are shared), and the selection reads the same items again — two calls per
    user had been a quarter of a worker's scoring thread (sketch gathers and lookups)."""
    ids = list(dict.fromkeys(i for cand in cands for i in cand.ids))
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
           cands: Sequence[Candidates], info: Facts) -> list[np.ndarray]:
    """Fill cosine, category affinity, log popularity and tail for every candidate; drop
    candidates the index does not hold (they cannot be scored or explained). Returns each
    user's candidates' positions in ``info``."""
    matrix = scorer.index.search_matrix  # the retrieval score's item side (id memory)
    keys: list[np.ndarray] = []
    at = info.at
    for b, (h, cand) in enumerate(zip(batch, cands, strict=True)):
        key = np.fromiter((at[i] for i in cand.ids), dtype=np.int64, count=len(cand.ids))
        rows = info.rows[key]
        held = rows >= 0
        if not held.all():
            kept = np.flatnonzero(held)
            cand.ids = [cand.ids[k] for k in kept]
            cand.x = cand.x[kept]
            key, rows = key[kept], rows[kept]
        keys.append(key)
        if not cand.ids:
            continue
        vecs = matrix[torch.from_numpy(rows).to(matrix.device)].float()
        cand.x[:, _F["cosine"]] = (vecs @ users[b].float()).cpu().numpy()
        top = max(h.affinity.values(), default=0.0)
        if top > 0:
            affinity = np.zeros(len(info.cat_names) + 1)
            for cat, weight in h.affinity.items():
                code = info.cat_names.get(cat)
                if code is not None:
                    affinity[code] = weight / top
            cand.x[:, _F["category_affinity"]] = affinity[info.cat_code[key]]
        cand.x[:, _F["log_popularity"]] = info.log_q[key]
        cand.x[:, _F["tail"]] = info.tail[key]
    return keys


def _engagement(scorer: Scorer, users: Users, cands: Sequence[Candidates],
                keys: Sequence[np.ndarray], tops: Sequence[np.ndarray | None],
                info: Facts) -> list[np.ndarray | None]:
    """The outcome head's class probabilities ``[len(top), K]`` for each user's chosen
    candidates (None for a user without any); their expected value goes into the
    engagement feature. One head call for the whole micro-batch, the users' candidates
    padded to the longest (:meth:`~tailstream.models.towers.two_tower.TwoTower.grouped_logits`:
    each user's context is used in place, never copied per candidate); each row is
    computed as for the pair alone, so the probabilities are the same."""
    live = [(b, top) for b, top in enumerate(tops) if top is not None]
    if not live:
        return [None] * len(cands)
    matrix = scorer.index.matrix
    chosen = [info.rows[keys[b][top]] for b, top in live]
    rows = np.zeros((len(live), max(len(r) for r in chosen)), dtype=np.int64)
    for n, r in enumerate(chosen):
        rows[n, :len(r)] = r  # the padding scores row 0, never read
    at = torch.tensor([b for b, _ in live], device=matrix.device)
    v = matrix[torch.from_numpy(rows).to(matrix.device)].float()
    logits = scorer.served.model.grouped_logits(
        users.vectors[at], v, context_sims(v, users.ctx_items[at]), users.mask[at],
        ctx_kinds=users.kinds[at])
    proba = torch.softmax(logits, dim=-1)
    value = (proba @ scorer.value_weights).cpu().numpy()
    proba_np = proba.cpu().numpy()
    out: list[np.ndarray | None] = [None] * len(cands)
    for n, ((b, top), r) in enumerate(zip(live, chosen, strict=True)):
        cands[b].x[top, _F["engagement"]] = value[n, :len(r)]
        out[b] = proba_np[n, :len(r)]
    return out


def _select(scorer: Scorer, cand: Candidates, key: np.ndarray, score: np.ndarray,
            top: np.ndarray, proba: np.ndarray, info: Facts,
            inputs: Callable[[Sequence[str]], tuple[np.ndarray | None, np.ndarray | None]]
            ) -> list[Ranked]:
    cfg = scorer.ranking
    order = np.argsort(-score, kind="stable")
    k = cfg.k
    kth = score[order[min(k, len(order)) - 1]]
    tiers_all = cand.x[:, _F["tail"]] > 0.5
    prefix = list(order[:4 * k]) + [int(j) for j in order[4 * k:]
                                    if tiers_all[j] and score[j] >= kth - cfg.tail_margin]
    ids = [cand.ids[int(j)] for j in prefix]
    at = key[np.asarray(prefix, dtype=np.int64)].tolist()
    tiers = [info.tiers[k] for k in at]
    cats = [info.cats[k] for k in at]
    picked = select_positions([float(score[j]) for j in prefix], tiers, cats, k,
                              cfg.tail_share, cfg.tail_margin, cfg.max_per_category)
    head_row = {int(j): n for n, j in enumerate(top)}
    scored = [pos for pos in picked if int(prefix[pos]) in head_row]
    p_buy, p_cart, outcome = scorer.outcomes(
        proba[[head_row[int(prefix[pos])] for pos in scored]],
        *inputs([ids[pos] for pos in scored]))
    decided = {pos: (p_buy[n], p_cart[n], outcome[n]) for n, pos in enumerate(scored)}
    out = []
    for pos in picked:
        j = int(prefix[pos])
        buy, cart, what = decided.get(pos, (0.0, 0.0, ""))
        out.append(Ranked(ids[pos], float(score[j]), tiers[pos], _reason(cand, j, cats[pos]),
                          cats[pos], buy, cart, what))
    return out


_REASONS = (("rr_query_match", "matches your search"), ("rr_query_lookup",
                                                        "popular after similar searches"),
            ("rr_covisitation", "often viewed after what you just viewed"),
            ("rr_history", "you looked at this before"),
            ("rr_category", "popular in {cat}"), ("rr_retrieval", "similar to what you viewed"),
            ("rr_trending", "trending now"))


_REASON_COLUMNS = [_F[feature] for feature, _ in _REASONS]


def _reason(cand: Candidates, j: int, category: str | None) -> str:
    """The source that ranked the item highest, in words."""
    best, text = 0.0, "popular right now"
    # One row read (a numpy scalar per feature had been a third of the selection's time).
    for v, (_, words) in zip(cand.x[j, _REASON_COLUMNS].tolist(), _REASONS, strict=True):
        if v > best + 1e-9:
            best, text = v, words
    cat = (category or "its category")[:40]
    return text.format(cat=cat) if not math.isnan(best) else text
