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

import math
from collections.abc import Sequence
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
from tailstream.models.serving.scorer import ItemInfo, Ranked, Scorer, select_positions

QUERY_PREFIX = "search: "
"""How a query is written for the encoder (as in the user's context)."""
_F = {name: k for k, name in enumerate(FEATURES)}


@dataclass
class HybridList:
    ranked: list[Ranked]
    candidates: Candidates


@torch.inference_mode()
def hybrid_recommend(scorer: Scorer, batch: Sequence[HybridRequest], item_info: ItemInfo,
                     blender: OnlineBlender) -> list[HybridList]:
    """Lists (and candidates) for ``batch`` (see the module docstring)."""
    if not batch:
        return []
    cfg = scorer.ranking
    requests = [h.request for h in batch]
    limit = ([h.known if h.known is not None else len(scorer.index) for h in batch]
             if any(h.known is not None for h in batch) else None)
    users, ctx_items, ctx_mask = scorer.user_vectors(requests)
    neural = _search(scorer, users, cfg.candidates, [r.exclude for r in requests], limit)
    matched = _query_match(scorer, batch, limit)
    cands: list[Candidates] = []
    for h, retrieved, by_query in zip(batch, neural, matched, strict=True):
        sources = {**h.sources, "retrieval": retrieved}
        if by_query:
            sources["query_match"] = by_query
        cands.append(union(sources, depth=cfg.candidates, exclude=h.request.exclude))
    _facts(scorer, batch, users, cands, item_info)
    out: list[HybridList] = []
    for b, cand in enumerate(cands):
        if not cand.ids:
            out.append(HybridList([], cand))
            continue
        first = blender.scores(cand.x) - blender.weight("engagement") * cand.x[:, _F["engagement"]]
        top = np.argsort(-first, kind="stable")[:cfg.head_candidates]
        proba = _engagement(scorer, users[b], ctx_items[b], ctx_mask[b], cand, top)
        score = blender.scores(cand.x)
        out.append(HybridList(_select(scorer, cand, score, top, proba, item_info), cand))
    return out


def _search(scorer: Scorer, vectors: torch.Tensor, k: int, exclude: Sequence[set[str]],
            limit: Sequence[int] | None) -> list[list[str]]:
    if len(scorer.index) == 0 or len(vectors) == 0:
        return [[] for _ in range(len(vectors))]
    sim, rows = scorer.index.search_rows(vectors, k, exclude=exclude, limit=limit)
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
                    [limit[b] for b in asked] if limit is not None else None)
    for b, ids in zip(asked, found, strict=True):
        out[b] = ids
    return out


def _facts(scorer: Scorer, batch: Sequence[HybridRequest], users: torch.Tensor,
           cands: Sequence[Candidates], item_info: ItemInfo) -> None:
    """Fill cosine, category affinity, log popularity and tail for every candidate; drop
    candidates the index does not hold (they cannot be scored or explained)."""
    index = scorer.index
    for b, (h, cand) in enumerate(zip(batch, cands, strict=True)):
        rows = [index.row(i) for i in cand.ids]
        keep = [k for k, r in enumerate(rows) if r is not None]
        if len(keep) < len(cand.ids):
            cand.ids = [cand.ids[k] for k in keep]
            cand.x = cand.x[keep]
            rows = [rows[k] for k in keep]
        if not cand.ids:
            continue
        vecs = index.matrix[torch.tensor(rows, device=index.matrix.device)].float()
        cand.x[:, _F["cosine"]] = (vecs @ users[b].float()).cpu().numpy()
        tiers, cats, log_q = item_info(cand.ids)
        top = max(h.affinity.values(), default=0.0)
        if top > 0:
            cand.x[:, _F["category_affinity"]] = [h.affinity.get(c, 0.0) / top if c else 0.0
                                                  for c in cats]
        cand.x[:, _F["log_popularity"]] = log_q
        cand.x[:, _F["tail"]] = [t == "tail" for t in tiers]


def _engagement(scorer: Scorer, user: torch.Tensor, ctx_items: torch.Tensor,
                ctx_mask: torch.Tensor, cand: Candidates, top: np.ndarray) -> np.ndarray:
    """The outcome head's class probabilities ``[len(top), K]`` for the chosen candidates;
    their expected value goes into the engagement feature."""
    model = scorer.served.model
    n = len(top)
    rows = torch.tensor([scorer.index.row(cand.ids[int(j)]) for j in top],
                        device=scorer.index.matrix.device)
    v = scorer.index.matrix[rows].float()
    logits = model.outcome_logits(user[None].expand(n, -1), v,
                                  ctx_items[None].expand(n, -1, -1),
                                  ctx_mask[None].expand(n, -1))
    proba = torch.softmax(logits, dim=-1)
    cand.x[top, _F["engagement"]] = (proba @ scorer.value_weights).cpu().numpy()
    return proba.cpu().numpy()


def _select(scorer: Scorer, cand: Candidates, score: np.ndarray, top: np.ndarray,
            proba: np.ndarray, item_info: ItemInfo) -> list[Ranked]:
    cfg = scorer.ranking
    order = np.argsort(-score, kind="stable")
    k = cfg.k
    kth = score[order[min(k, len(order)) - 1]]
    tiers_all = cand.x[:, _F["tail"]] > 0.5
    prefix = list(order[:4 * k]) + [int(j) for j in order[4 * k:]
                                    if tiers_all[j] and score[j] >= kth - cfg.tail_margin]
    ids = [cand.ids[int(j)] for j in prefix]
    tiers, cats, _ = item_info(ids)
    picked = select_positions([float(score[j]) for j in prefix], tiers, cats, k,
                              cfg.tail_share, cfg.tail_margin, cfg.max_per_category)
    head_row = {int(j): n for n, j in enumerate(top)}
    purchase, cart = scorer.class_columns
    out = []
    for pos in picked:
        j = int(prefix[pos])
        p = proba[head_row[j]] if j in head_row else None
        out.append(Ranked(ids[pos], float(score[j]), tiers[pos], _reason(cand, j, cats[pos]),
                          cats[pos],
                          float(p[purchase]) if p is not None and purchase is not None else 0.0,
                          float(p[cart]) if p is not None and cart is not None else 0.0))
    return out


_REASONS = (("rr_query_match", "matches your search"), ("rr_query_lookup",
                                                        "popular after similar searches"),
            ("rr_covisitation", "often viewed after what you just viewed"),
            ("rr_history", "you looked at this before"),
            ("rr_category", "popular in {cat}"), ("rr_retrieval", "similar to what you viewed"),
            ("rr_trending", "trending now"))


def _reason(cand: Candidates, j: int, category: str | None) -> str:
    """The source that ranked the item highest, in words."""
    best, text = 0.0, "popular right now"
    for feature, words in _REASONS:
        v = float(cand.x[j, _F[feature]])
        if v > best + 1e-9:
            best, text = v, words
    cat = (category or "its category")[:40]
    return text.format(cat=cat) if not math.isnan(best) else text
