"""Scoring with the transformer: retrieve from the item index, rank with the outcome head,
correct for popularity, keep the tail in every list, say why.

For each user (a micro-batch of users at a time):

1. **User vector** from the user tower over their recent context texts (queries and
   viewed items; vectors cached by text, so only new texts hit the encoder).
2. **Retrieval**: exact top-``candidates`` items by cosine over the whole index,
   excluding what the user just interacted with.
3. **Ranking** of the candidates, in logit units::

       score_i = cos(u, v_i) / T + γ · log q_i + λ_e · E_i

   The retrieval logit ``cos/T`` was trained with logQ correction (Yi et al., RecSys
   2019), so it estimates how much more likely the user is to pick item i than its
   popularity alone says (a pointwise mutual information), free of popularity bias.
   Adding ``γ · log q_i`` back is the popularity prior: ``γ = 1`` ranks by the full
   ``log p(i | u)`` (accurate on head items), ``γ = 0`` by the debiased score (the tail's
   best chance) — the head/tail trade-off as one parameter (``TAILSTREAM_RANK_POPULARITY_
   WEIGHT``), measured by ``tailstream eval``. ``q`` is smoothed, so a brand-new item has
   the prior of one interaction rather than of none. ``E_i = Σ_c value_c · p_c(i) /
   max value`` is the expected engagement from the outcome head (optionally blended with
   the river fast path's probabilities).
4. **Diversity**: at most ``max(1, ⌈max_per_category · k⌉)`` items per category, taken in
   score order (a category cap is the simplest rule that keeps one hot category from
   taking a whole list; skipped items fill the list only if nothing else is left).
5. **Tail exposure**: ``⌈tail_share · k⌉`` slots are reserved for tail-tier items, but a
   tail item takes one only if its score is within ``tail_margin`` (logits) of the k-th best
   unconstrained score, so a clearly better head item is never displaced.
6. **Reasons**: the context text most similar to the item in the item space explains it
   ("matches your search '…'", "similar to '…' you viewed"); otherwise "trending in …".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from tailstream.configs import RankingConfig
from tailstream.contract import display_text
from tailstream.models.imbalance.decisions import DecisionLayer
from tailstream.models.serving.index import ItemIndex
from tailstream.models.towers.context import UserRequest, entry_codes
from tailstream.models.towers.loading import ServedModel
from tailstream.models.towers.text_vectors import TextVectors, VectorStore
from tailstream.models.towers.two_tower import TextBatch, context_sims, pack_contexts

CLASS_VALUE: dict[str, float] = {"click": 1.0, "fav": 2.0, "cart": 3.0, "purchase": 5.0}
"""Relative value of each outcome for the expected-engagement term."""


@dataclass(frozen=True, slots=True)
class Ranked:
    item_id: str
    score: float
    tier: str
    reason: str
    category: str | None
    p_purchase: float
    p_cart: float
    outcome: str = ""
    """The decided outcome of showing this item (the version's decision layer at the live
    class prior: :meth:`Scorer.outcomes`); empty where no head scored it."""

    def to_dict(self, rank: int) -> dict[str, Any]:
        out = {"item_id": self.item_id, "score": round(self.score, 6), "rank": rank,
               "tier": self.tier, "reason": self.reason, "category": self.category,
               "p_purchase": round(self.p_purchase, 6), "p_cart": round(self.p_cart, 6)}
        if self.outcome:
            out["outcome"] = self.outcome
        return out


ItemInfo = Callable[[Sequence[str]], tuple[list[str], list[str | None], list[float]]]
"""``item_ids → (tiers, categories, log q)``, supplied by the stream's popularity state."""
OnlineProba = Callable[[str, Sequence[str]], torch.Tensor]
"""``(user_id, item_ids) → [N, K]`` class probabilities of the river fast path."""
ListFeatures = Callable[[Sequence[tuple[str, Sequence[str]]]], Sequence[Sequence[float]]]
"""``[(user_id, item_ids), …] → one row of streaming count features per (user, item)``,
the lists' rows one after the other (the ``feature_vector`` the head was trained on; an
empty row: unknown), supplied by the stream's state for the items lists show — a
whole turn's lists in one call."""


class Users(NamedTuple):
    """A micro-batch of users as the towers see them (:meth:`Scorer.user_vectors`)."""

    vectors: torch.Tensor  # [B, d]
    ctx_items: torch.Tensor  # [B, C, d], the context in the item space
    mask: torch.Tensor  # [B, C]
    kinds: torch.Tensor  # [B, C], kind codes


class Scorer:
    """Holds the served model, the text-vector cache and the item index of one worker."""

    def __init__(self, served: ServedModel, *, device: torch.device, max_len: int,
                 cache_size: int, ranking: RankingConfig,
                 shared: VectorStore | None = None) -> None:
        self.device = device
        self.max_len = max_len
        self.ranking = ranking
        self.served = served
        self.shared = shared
        self.texts = TextVectors(served.model, served.tokenizer, device=device, max_len=max_len,
                                 fingerprint=served.text_fingerprint, cache_size=cache_size,
                                 shared=shared)
        hidden = served.model.item_proj.in_features
        # Text vectors of catalogue items, kept beside the index so a promotion that leaves
        # the encoder alone re-projects the catalogue with one matrix product.
        self.item_texts = ItemIndex(hidden, device, torch.float16)
        self.index = ItemIndex(served.model.config.embed_dim, device)
        self.index.version = served.version
        classes = list(served.model.config.classes)
        top = max(CLASS_VALUE.values())
        self._value = torch.tensor([CLASS_VALUE.get(c, 0.0) / top for c in classes],
                                   device=device)
        self._purchase = classes.index("purchase") if "purchase" in classes else None
        self._cart = classes.index("cart") if "cart" in classes else None
        self.live_prior: np.ndarray | None = None
        """The stream's running class shares (the worker sets them after every batch)."""
        self.fast_path: Callable[[np.ndarray], np.ndarray] | None = None
        """The river fast path's probabilities ``[N, K]`` for count-feature rows, as of
        the last batch (the worker sets it; read only when the decision layer stacks it)."""
        self._decisions: DecisionLayer | None = None
        self._decisions_of: ServedModel | None = None
        self._wide: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._wide_of: ServedModel | None = None

    @property
    def version(self) -> str:
        return self.served.version

    @property
    def value_weights(self) -> torch.Tensor:
        """Each class's value over the best class's (the expected-engagement weights)."""
        return self._value

    # ------------------------------------------------------------------ catalogue
    @torch.inference_mode()
    def add_items(self, item_ids: Sequence[str], texts: Sequence[str]) -> None:
        """Embed catalogue items (new or changed) and make them searchable at once."""
        if not item_ids:
            return
        vecs = self.texts.vectors(texts)
        self.item_texts.upsert(item_ids, vecs)
        model = self.served.model
        items = model.item_vectors(vecs)
        self.index.upsert(item_ids, items, model.retrieval_items(items, item_ids))

    def remove_items(self, item_ids: Sequence[str]) -> int:
        """Take deleted catalogue items out of retrieval (and their text vectors with them)."""
        self.item_texts.remove(item_ids)
        return self.index.remove(item_ids)

    def needs_reencode(self, served: ServedModel) -> bool:
        """Whether ``served`` changed the encoder (text vectors must be recomputed)."""
        return served.text_fingerprint != self.texts.fingerprint

    @torch.inference_mode()
    def swap_model(self, served: ServedModel,
                   item_texts: Callable[[Sequence[str]], list[str]] | None = None,
                   chunk: int = 4096) -> None:
        """Serve ``served`` from now on: re-project (same encoder) or re-encode (new encoder)
        every catalogue item, then swap the index in one assignment."""
        ids = self.item_texts.ids
        if self.needs_reencode(served):
            if item_texts is None:
                raise ValueError("a new encoder needs the items' texts to re-encode them")
            fresh = TextVectors(served.model, served.tokenizer, device=self.device,
                                max_len=self.max_len, fingerprint=served.text_fingerprint,
                                cache_size=self.texts.cache_size, shared=self.shared)
            fresh.remote = self.texts.remote  # used only while the fingerprints agree
            text_vecs = fresh.vectors(item_texts(ids)) if ids else None
            new_texts = ItemIndex(self.item_texts.dim, self.device, torch.float16)
            if text_vecs is not None:
                new_texts.upsert(ids, text_vecs)
        else:
            fresh = self.texts
            fresh.model = served.model
            new_texts = self.item_texts
        vectors, search = _project(served, new_texts, ids, chunk, self.index.dim)
        self.index.replace_all(ids, vectors, served.version, search)
        self.item_texts = new_texts
        self.texts = fresh
        self.served = served

    @torch.inference_mode()
    def sibling(self, served: ServedModel,
                item_texts: Callable[[Sequence[str]], list[str]] | None = None,
                chunk: int = 4096) -> Scorer:
        """A scorer for ``served`` over this scorer's catalogue, to serve beside it (a
        canary's candidate). With the same encoder it shares this scorer's encoder
        weights, text-vector cache and the items' text vectors, and holds only its own
        towers, head and item index (the catalogue re-projected with one matrix product:
        ``embed_dim × 4`` bytes per item); with another encoder it is a whole second
        scorer (the catalogue re-encoded from ``item_texts``)."""
        other = Scorer(served, device=self.device, max_len=self.max_len,
                       cache_size=self.texts.cache_size, ranking=self.ranking,
                       shared=self.shared)
        other.live_prior = self.live_prior  # the same stream: decided at the same prior
        other.fast_path = self.fast_path
        other.texts.remote = self.texts.remote  # used only while the fingerprints agree
        ids = self.item_texts.ids
        if self.needs_reencode(served):
            if ids:
                if item_texts is None:
                    raise ValueError("a new encoder needs the items' texts to re-encode them")
                other.add_items(ids, item_texts(ids))
            return other
        served.model.encoder = self.served.model.encoder  # one copy of the encoder
        other.texts = self.texts
        other.item_texts = self.item_texts
        vectors, search = _project(served, self.item_texts, ids, chunk, other.index.dim)
        other.index.replace_all(ids, vectors, served.version, search)
        return other

    def adopt_texts(self) -> None:
        """Encode with this scorer's own model from now on (a canary promoted in place:
        the shared text cache still pointed at the model it replaced)."""
        self.texts.model = self.served.model

    # ------------------------------------------------------------------ users
    @torch.inference_mode()
    def user_vectors(self, requests: Sequence[UserRequest]) -> Users:
        """User vectors ``[B, d]``, their context in the item space ``[B, C, d]``, its
        mask and kind codes ``[B, C]`` (for the head's target attention and for
        reasons)."""
        model = self.served.model
        c = model.config.max_context
        contexts = [[e.text for e in r.context[:c]] for r in requests]
        batch = TextBatch([t for ctx in contexts for t in ctx])
        vecs = self.texts.vectors(batch.texts) if batch.texts else None
        ctx_t, mask, kinds, at = pack_contexts(
            contexts, vecs, batch, c, model.empty_context.shape[0], self.device,
            [entry_codes(r.context, c) for r in requests])
        return Users(model.user_vectors(ctx_t, mask, kinds), model.context_items_at(vecs, at),
                     mask, kinds)

    @torch.inference_mode()
    def recommend(self, requests: Sequence[UserRequest], item_info: ItemInfo,
                  online: OnlineProba | None = None,
                  known: Sequence[int] | None = None,
                  features: ListFeatures | None = None) -> list[list[Ranked]]:
        """A ranked list per request (empty when the index is).

        Everything numeric is done for the whole micro-batch at once (one retrieval
        product, one head call over every user's candidates); per user, Python only walks
        the best few candidates to apply the category cap and the tail quota.

        ``known[b]`` (offline evaluation): only the first ``known[b]`` rows of the index
        may be retrieved for request b (the evaluation inserts items in the order they
        became known, so no list can hold an item from the request's future).
        ``features``: the count features of the items a list shows, for the outcomes it
        carries (:meth:`outcomes`).
        """
        cfg = self.ranking
        if not requests or len(self.index) == 0:
            return [[] for _ in requests]
        model = self.served.model
        users, ctx_items, ctx_mask, ctx_kinds = self.user_vectors(requests)
        sim, rows = self.index.search_rows(users, cfg.candidates,
                                           exclude=[r.exclude for r in requests], limit=known)
        # Item facts for the distinct candidates of the whole batch, looked up once.
        uniq, inverse = torch.unique(rows, return_inverse=True)
        uniq_ids = [self.index.id_of(int(r)) for r in uniq.tolist()]
        tiers, cats, log_q = item_info(uniq_ids)
        lq = torch.tensor(log_q, device=self.device, dtype=sim.dtype)[inverse]
        # The outcome head is the expensive part: only the best `head_candidates` by
        # retrieval logit + popularity prior go through it.
        prior = sim / model.config.temperature + cfg.popularity_weight * lq
        h = min(cfg.head_candidates, rows.shape[1])
        prior, keep = torch.topk(prior, h, dim=1)
        sim, rows, inverse = sim.gather(1, keep), rows.gather(1, keep), inverse.gather(1, keep)
        b, c = rows.shape
        valid = torch.isfinite(sim)
        v = self.index.matrix[rows.reshape(-1)].float().reshape(b, c, -1)
        sims = context_sims(v, ctx_items)  # [b, c, C]: the head's and the reasons'
        proba = torch.softmax(model.grouped_logits(users, v, sims, ctx_mask,
                                                   ctx_kinds=ctx_kinds), dim=-1)
        if online is not None and cfg.online_blend > 0:
            blended = []
            for i, req in enumerate(requests):
                ids = [uniq_ids[int(k)] for k in inverse[i].tolist()]
                blended.append((1 - cfg.online_blend) * proba[i]
                               + cfg.online_blend * online(req.user_id, ids).to(proba))
            proba = torch.stack(blended)
        engagement = proba @ self._value
        score = (prior + cfg.engagement_weight * engagement).masked_fill(~valid, float("-inf"))
        # Which context entry explains each candidate best (for the reasons).
        ctx_sim = sims.masked_fill(~ctx_mask[:, None, :], float("-inf"))
        best_val, best_ctx = ctx_sim.max(dim=2)
        order = torch.argsort(score, dim=1, descending=True)
        k = cfg.k
        prefix = min(c, 4 * k)
        score_l, order_l = score.tolist(), order.tolist()
        inv_l, best_val_l, best_ctx_l = inverse.tolist(), best_val.tolist(), best_ctx.tolist()
        proba_np = proba.float().cpu().numpy()
        out: list[list[Ranked]] = []
        for i, req in enumerate(requests):
            ranked_rows = [j for j in order_l[i] if score_l[i][j] != float("-inf")]
            if not ranked_rows:
                out.append([])
                continue
            # The best few, plus tail items deeper down that could still take a reserved
            # slot (within tail_margin of the k-th best score).
            kth = score_l[i][ranked_rows[min(k, len(ranked_rows)) - 1]]
            chosen = ranked_rows[:prefix] + [
                j for j in ranked_rows[prefix:]
                if tiers[inv_l[i][j]] == "tail" and score_l[i][j] >= kth - cfg.tail_margin]
            inv = inv_l[i]
            picked = select_positions([score_l[i][j] for j in chosen],
                                      [tiers[inv[j]] for j in chosen],
                                      [cats[inv[j]] for j in chosen], k, cfg.tail_share,
                                      cfg.tail_margin, cfg.max_per_category)
            cols = [chosen[pos] for pos in picked]
            p_buy, p_cart, outcome = self.outcomes(
                proba_np[i, cols], *self.list_inputs(features, req.user_id,
                                                     [uniq_ids[inv[j]] for j in cols]))
            out.append([Ranked(uniq_ids[inv[j]], score_l[i][j], tiers[inv[j]],
                               self._reason(req, best_val_l[i][j], best_ctx_l[i][j],
                                            cats[inv[j]]),
                               cats[inv[j]], p_buy[n], p_cart[n], outcome[n])
                        for n, j in enumerate(cols)])
        return out

    # ------------------------------------------------------------------ decisions
    @property
    def decisions(self) -> DecisionLayer | None:
        """The served version's decision layer (its manifest's ``decisions``, fitted by
        the trainer on the gate's held-out window; None for the base model)."""
        served = self.served
        if self._decisions_of is not served:
            raw = served.manifest.get("decisions")
            self._decisions = DecisionLayer.from_dict(raw) if raw else None
            self._decisions_of = served
        return self._decisions

    def set_decisions(self, raw: Mapping[str, Any] | None) -> None:
        """Serve a refreshed decision layer (the trainer refitted the served version's
        thresholds at a rejected trigger) with the same weights: one assignment, so the
        scoring thread decides with the old layer or the new one, never a mix."""
        self.served = dataclasses.replace(self.served,
                                          manifest={**self.served.manifest, "decisions": raw})

    def list_inputs(self, features: ListFeatures | None, user_id: str,
                    item_ids: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """What :meth:`outcomes` reads for the items a list shows, from the count features
        of ``user_id`` with each (both None without ``features``):

        * ``[N, K]``: what they add to the head's logits
          (:meth:`TwoTowerRecommender.count_logits`, in numpy: a handful of rows per list,
          where torch's per-call overhead cost more than the arithmetic; an unknown row
          adds nothing);
        * ``[N, K]``: the river fast path's probabilities (:attr:`fast_path`), only when
          the decision layer stacks them (an unknown row: uniform); else None."""
        return self.list_inputs_many(features, [(user_id, item_ids)])

    def list_inputs_many(self, features: ListFeatures | None,
                         lists: Sequence[tuple[str, Sequence[str]]]
                         ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """:meth:`list_inputs` of several lists (user, items shown), their rows one after
        the other: the arithmetic once for a whole turn."""
        if features is None or not any(ids for _, ids in lists):
            return None, None
        if self._wide_of is not self.served:
            model = self.served.model
            self._wide = (model.wide_mean.detach().cpu().double().numpy(),
                          (model.wide_var.detach().cpu().double() + 1e-6).rsqrt().numpy(),
                          model.wide.weight.detach().cpu().double().numpy().T)
            self._wide_of = self.served
        assert self._wide is not None
        mean, inv_std, weight_t = self._wide
        rows = features([(user_id, ids) for user_id, ids in lists if ids])
        known = np.array([len(row) == len(mean) for row in rows])
        unknown = mean.tolist()
        x = np.array([row if ok else unknown for row, ok in zip(rows, known.tolist(),
                                                                 strict=True)],
                     dtype=np.float64)
        delta: np.ndarray = ((x - mean) * inv_std) @ weight_t
        layer, fast_path = self.decisions, self.fast_path
        if layer is None or not layer.reads(1) or fast_path is None:
            return delta, None
        fast = fast_path(x)
        fast[~known] = 1.0 / fast.shape[1]
        return delta, fast

    def outcomes(self, proba: np.ndarray, counts: np.ndarray | None = None,
                 fast: np.ndarray | None = None
                 ) -> tuple[list[float], list[float], list[str]]:
        """p(purchase), p(cart) and the decided outcome for rows of the head's class
        probabilities ``[N, K]``: the version's decision layer corrected to
        :attr:`live_prior` (the worker's running class shares; the stream's mix at
        training time until it has one) — so a sale that doubles purchases moves them at
        the next list, without a fine-tune — or the head's own probabilities and argmax
        when the version has no layer.

        Candidates are ranked without the count features (the head runs on hundreds of
        them per user); ``counts``, their logits ``[N, K]`` for the rows shown
        (:meth:`list_inputs`), put them back, as the head was trained and its decision
        layer fitted: ``softmax(log p + W · std(x))`` (the softmax drops the per-row
        constant). ``fast``, the river fast path's probabilities for the same rows
        (:meth:`list_inputs`), is what a layer that stacks it reads beside them (uniform
        when not given: what river says before it has learned)."""
        classes = self.served.model.config.classes
        if len(proba) == 0:
            return [], [], []
        if counts is not None:
            logp = np.log(np.clip(proba, 1e-12, None)) + counts
            logp -= logp.max(axis=1, keepdims=True)
            proba = np.exp(logp)
            proba /= proba.sum(axis=1, keepdims=True)
        layer = self.decisions
        if layer is not None:
            models = [proba]
            if layer.reads(1):
                models.append(fast if fast is not None
                              else np.full(proba.shape, 1.0 / proba.shape[1]))
            proba, decided = layer.predict(models, layer.serving_prior(self.live_prior))
        else:
            decided = proba.argmax(axis=1)
        p_buy = (proba[:, self._purchase].tolist() if self._purchase is not None
                 else [0.0] * len(proba))
        p_cart = proba[:, self._cart].tolist() if self._cart is not None else [0.0] * len(proba)
        return p_buy, p_cart, [classes[int(k)] for k in decided]

    def _reason(self, req: UserRequest, similarity: float, entry: int,
                category: str | None) -> str:
        if similarity < self.ranking.reason_min_similarity or entry >= len(req.context):
            return (f"trending in {display_text(category, 40)}" if category
                    else "popular right now")
        e = req.context[entry]
        label = display_text(e.label, 40)  # titles and queries come from outside
        return (f"matches your search '{label}'" if e.kind == "q"
                else f"similar to '{label}' you viewed")


def _project(served: ServedModel, texts: ItemIndex, ids: Sequence[str], chunk: int, dim: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The catalogue's item vectors under ``served`` (from the items' text vectors, in
    ``ids`` order) and the rows search reads (None when no item has id memory)."""
    model = served.model
    rows: list[torch.Tensor] = []
    search: list[torch.Tensor] = []
    for i in range(0, len(ids), chunk):
        part = model.item_vectors(texts.matrix[i:i + chunk].float())
        rows.append(part)
        moved = model.retrieval_items(part, ids[i:i + chunk])
        if moved is not None:
            search.append(moved)
    vectors = torch.cat(rows) if rows else torch.empty(0, dim)
    return vectors, torch.cat(search) if search and len(search) == len(rows) else None


def select(ranked: Sequence[Ranked], k: int, tail_share: float, tail_margin: float,
           max_per_category: float) -> list[Ranked]:
    """The final list from candidates sorted best first: category cap, then tail quota
    (see the module docstring), returned best first.

    >>> r = [Ranked(str(i), 1 - i / 10, "head" if i < 6 else "tail", "", None, 0, 0)
    ...      for i in range(8)]
    >>> [x.item_id for x in select(r, 4, 0.5, tail_margin=0.4, max_per_category=1.0)]
    ['0', '1', '6', '7']
    >>> [x.item_id for x in select(r, 4, 0.5, tail_margin=0.05, max_per_category=1.0)]
    ['0', '1', '2', '3']
    """
    picked = select_positions([r.score for r in ranked], [r.tier for r in ranked],
                              [r.category for r in ranked], k, tail_share, tail_margin,
                              max_per_category)
    return [ranked[j] for j in picked]


def select_positions(scores: Sequence[float], tiers: Sequence[str],
                     categories: Sequence[str | None], k: int, tail_share: float,
                     tail_margin: float, max_per_category: float) -> list[int]:
    """:func:`select` on parallel lists (best first); returns the chosen positions, best
    first. Works on plain lists so the serving path builds objects for the k winners only.

    >>> select_positions([3.0, 2.0, 1.9, 1.0], ["head", "head", "head", "tail"],
    ...                  ["a", "a", "b", "b"], 2, 0.5, 2.0, 0.5)
    [0, 3]
    """
    if k <= 0 or not scores:
        return []
    cap = max(1, math.ceil(max_per_category * k))
    per_cat: dict[str | None, int] = {}
    diverse: list[int] = []
    overflow: list[int] = []
    for j, key in enumerate(categories):
        if key is not None and per_cat.get(key, 0) >= cap:
            overflow.append(j)
            continue
        per_cat[key] = per_cat.get(key, 0) + 1
        diverse.append(j)
    pool = diverse + overflow  # capped items only if nothing else is left
    top = pool[:k]
    threshold = scores[top[-1]] - tail_margin
    quota = math.ceil(tail_share * k)
    have = sum(1 for j in top if tiers[j] == "tail")
    if have < quota:
        extra = [j for j in pool[k:] if tiers[j] == "tail" and scores[j] >= threshold][
            : quota - have]
        if extra:
            # Displace the lowest non-tail items, never a tail item already chosen.
            keep_head = [j for j in top if tiers[j] != "tail"]
            keep_tail = [j for j in top if tiers[j] == "tail"]
            keep_head = keep_head[: max(0, k - len(keep_tail) - len(extra))]
            top = keep_head + keep_tail + extra
    return sorted(top, key=lambda j: (-scores[j], j))
