"""The transformer recommender: two towers over one shared pretrained encoder, plus an
outcome head.

* **Text → vector.** Every text (an item's title/category/brand/price band, a search
  query) goes through the shared encoder and is mean-pooled over its tokens, as
  sentence-transformers does for all-MiniLM-L6-v2.
* **Item tower.** ``v = normalise(W_item · e(item text))``.
* **User tower.** The user's recent context texts (queries, viewed items' texts; most
  recent first, up to ``max_context``, 20 by default) are encoded, each plus a learned
  vector for its event kind (search, click, cart, fav, purchase: ``k_j``), pooled with
  learned attention plus a learned recency bias per position (SASRec's positional
  embedding in its simplest form: Kang & McAuley, ICDM 2018), and projected:
  ``u = normalise(W_user · Σ_j a_j (e(ctx_j) + k_j))``. Pooling
  cached text vectors, rather than encoding one long user string, keeps serving O(1) per
  event: item and query vectors are computed once and reused (YouTube DNN, Covington et
  al., RecSys 2016, averages watched-item embeddings the same way).
* **Retrieval score** ``s(u, i) = u·normalise(v + e_i) / T`` (a cosine over a
  temperature, the item side moved by its id memory), trained with an in-batch sampled
  softmax and logQ correction (Yi et al., RecSys 2019). ``e_i = P · E[row(i)]``: a
  hashed, collisionless id embedding that only items past a frequency filter own
  (``models/towers/ids.py``, Monolith's filter); new and rare items have ``e_i = 0`` and
  are their text. ``E`` starts at zero, so the base model is the text model. The outcome
  head and the target attention read ``v`` alone, so "the very same item" keeps its exact
  match with the context.
* **Outcome head.** Wide & deep:
  ``z = MLP([u, v, u ⊙ v, max_j s_j, Σ_j α_j s_j]) + W x + W_k m``
  → logits over click / cart / fav / purchase: CTR- and CVR-like probabilities from one
  model, trained with the imbalance loop's loss. ``x`` are the streaming count features
  the river fast path reads (item and user class rates, counts, repeat, affinity, tier,
  price: ``models/imbalance/features.py``), standardised by running moments; where they
  are unknown (ranking a list's candidates) ``x`` is their mean and the wide part adds a
  constant. ``s_j = cos(W_item e(ctx_j), v)`` compares the candidate
  with each recent context item in the item space (target attention, as in DIN: Zhou et
  al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018, with
  ``α = softmax(s / T)``; both enter as ``(s − 1) / T``, logits below "same item"): whether
  the user just looked at this very item, or at close ones, is the strongest single
  signal of a cart or a purchase. ``m`` is that signal by event kind: for each kind,
  ``m_kind = max_{j of that kind} exp((s_j − 1) / T)`` (1 for the very item, ~0.37 for a
  near-duplicate title, 0 for unrelated items or no entry of the kind), so the head can
  tell "carted this very item" (a purchase is near) from "clicked it".

Both projections start as the *same* random orthogonal map, so before any fine-tuning the
user and item spaces coincide and pretrained similarity already works (cold start from
text). Initialisation is seeded, so every process builds the identical base model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tailstream.configs import TowerConfig
from tailstream.models.towers import ids
from tailstream.models.towers.context import CONTEXT_KINDS

ADDED_WEIGHTS = frozenset({"wide.weight", "wide.bias", "wide_mean", "wide_var", "wide_rows",
                           "context_kind.weight", "typed.weight", "typed.bias",
                           "id_embed.weight", "id_out.weight", "id_owner"})
"""Weights a checkpoint from before the wide part, the context kinds or the id memory
lacks; their initial values (zero embeddings, no owners) make the model compute what the
older one did."""


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token vectors where ``mask`` is 1 (sentence-transformers' pooling).

    >>> mean_pool(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled_text(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> torch.Tensor:
    """A text's vector: the encoder's last hidden states mean-pooled, ``[N, hidden]``
    float32 — what the towers, the worker's encoder process and the caches all key on."""
    out = encoder(input_ids=input_ids, attention_mask=attention_mask)
    return mean_pool(out.last_hidden_state.float(), attention_mask)


class TwoTowerRecommender(nn.Module):
    wide_mean: torch.Tensor
    wide_var: torch.Tensor
    wide_rows: torch.Tensor
    id_owner: torch.Tensor

    def __init__(self, encoder: nn.Module, hidden_size: int, config: TowerConfig) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = config
        d, k = config.embed_dim, len(config.classes)
        gen = torch.Generator().manual_seed(config.seed)
        shared = torch.empty(d, hidden_size)
        _orthogonal_(shared, gen)
        self.item_proj = nn.Linear(hidden_size, d, bias=False)
        self.user_proj = nn.Linear(hidden_size, d, bias=False)
        with torch.no_grad():
            self.item_proj.weight.copy_(shared)
            self.user_proj.weight.copy_(shared)
        # Zero attention: the user tower starts as a mean, weighted by the recency prior
        # 2^(-j / half-life) (a plain mean at half-life 0).
        self.context_attn = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.context_attn.weight)
        nn.init.zeros_(self.context_attn.bias)
        position = torch.arange(config.max_context, dtype=torch.float32)
        h = config.context_half_life
        self.recency_bias = nn.Parameter(-position * math.log(2.0) / h if h > 0
                                         else torch.zeros(config.max_context))
        # A vector per event kind added to each context entry (0: unknown kind, never
        # trained); zero at start, so the base model reads texts alone.
        self.context_kind = nn.Embedding(len(CONTEXT_KINDS) + 1, hidden_size, padding_idx=0)
        nn.init.zeros_(self.context_kind.weight)
        # A user with no context yet (first event) gets a learned vector.
        self.empty_context = nn.Parameter(torch.zeros(hidden_size))
        self.id_embed, self.id_out = _id_memory(config, d)
        self.register_buffer("id_owner", torch.zeros(config.id_buckets, dtype=torch.long))
        self.outcome_head = nn.Sequential(nn.Linear(3 * d + 2, config.head_hidden), nn.GELU(),
                                          nn.Linear(config.head_hidden, k))
        # The wide part: a linear model over the standardised streaming count features,
        # zero at start (the base model's head is the deep part alone). Running moments
        # of the training rows standardise them; a row without features is the mean (0).
        f = config.wide_features
        self.wide = nn.Linear(f, k)
        nn.init.zeros_(self.wide.weight)
        nn.init.zeros_(self.wide.bias)
        self.register_buffer("wide_mean", torch.zeros(f))
        self.register_buffer("wide_var", torch.ones(f))
        self.register_buffer("wide_rows", torch.zeros(()))
        # Typed target attention (see the module docstring), linear into the logits.
        self.typed = nn.Linear(len(CONTEXT_KINDS), k)
        nn.init.zeros_(self.typed.weight)
        nn.init.zeros_(self.typed.bias)
        with torch.no_grad():
            for layer, scale in ((self.outcome_head[0], 1.0), (self.outcome_head[2], 0.01)):
                assert isinstance(layer, nn.Linear)
                bound = scale / layer.in_features ** 0.5
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound
                                   - bound)
                layer.bias.zero_()
            # Start from the prior (Lin et al. 2017, §4.1: bias the rare classes' logits to
            # their prior): the untrained head predicts "click" with the shop's base rates
            # instead of random classes, so the first candidate is judged against a sane
            # baseline, and early training is stable.
            last = self.outcome_head[2]
            assert isinstance(last, nn.Linear)
            prior = torch.tensor([config.head_prior.get(c, 0.01) for c in config.classes])
            last.bias.copy_(torch.log(prior / prior.sum()))

    # ------------------------------------------------------------------ encoder
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> torch.Tensor:
        """Mean-pooled encoder output, ``[N, hidden]`` (float32): :func:`pooled_text`."""
        return pooled_text(self.encoder, input_ids, attention_mask)

    # ------------------------------------------------------------------ towers
    def item_vectors(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """Unit item vectors ``[N, d]`` from pooled item-text vectors ``[N, hidden]``."""
        return F.normalize(self.item_proj(text_vectors.float()), dim=-1)

    def id_rows(self, item_ids: Sequence[str]) -> torch.Tensor:
        """Each item's row of the id memory (``id_buckets``: none), on the model's device."""
        fps = ids.fingerprints(item_ids)
        return ids.lookup(self.id_owner, fps).to(self.id_owner.device)

    def item_memory(self, item_ids: Sequence[str]) -> torch.Tensor | None:
        """``e_i`` ``[N, d]`` for ``item_ids``, or None when no item owns a slot (no table,
        or nothing admitted yet): retrieval then reads the text vectors alone."""
        if self.config.id_buckets == 0 or not bool((self.id_owner != 0).any()):
            return None
        return self.id_out(self.id_embed(self.id_rows(item_ids))).float()

    def retrieval_items(self, items: torch.Tensor, item_ids: Sequence[str]
                        ) -> torch.Tensor | None:
        """The retrieval score's item side ``normalise(v + e)`` for item vectors ``v``
        (:meth:`item_vectors`) of ``item_ids``, or None when no item has id memory."""
        memory = self.item_memory(item_ids)
        return None if memory is None else F.normalize(items.float() + memory, dim=-1)

    @torch.no_grad()
    def admit_ids(self, counts: Mapping[str, int], min_count: int) -> int:
        """Give the items seen at least ``min_count`` times a slot (kept from then on);
        returns how many were new."""
        if self.config.id_buckets == 0:
            return 0
        chosen = ids.frequent(counts, min_count)
        if not chosen:
            return 0
        fps = ids.fingerprints(chosen)
        owner = self.id_owner.cpu()
        added = ids.admit(owner, fps, torch.ones(len(chosen), dtype=torch.bool))
        self.id_owner.copy_(owner.to(self.id_owner.device))
        return added

    def user_vectors(self, context: torch.Tensor, mask: torch.Tensor,
                     kinds: torch.Tensor | None = None) -> torch.Tensor:
        """Unit user vectors ``[B, d]`` from context vectors ``[B, C, hidden]``, a
        ``[B, C]`` mask of real positions (rows without any fall back to the learned
        empty-context vector) and the entries' kind codes ``[B, C]``
        (:func:`~tailstream.models.towers.context.kind_codes`; None: unknown)."""
        # Each entry reads ``x + k`` (its text vector plus its kind's vector ``k``), and
        # both the attention and the pooling are linear in it: ``w·(x + k) = w·x + w·k``
        # and ``Σ a (x + k) = Σ a x + (Σ_{kind} a) k``. So the kinds enter as a score per
        # kind and a [B, kinds] attention mass — never as a [B, C, hidden] sum, which
        # with its gradient took ~4/5 of the user tower's time in a fine-tune step.
        context = context.float()
        b, c, _ = context.shape
        # Unknown (and padded) positions have kind 0, whose vector is zero; an empty row's
        # first position below reads the learned empty vector alone, as it always did.
        codes = kinds.masked_fill(~mask, 0) if kinds is not None else None
        empty = ~mask.any(dim=1)
        if empty.any():
            context = context.clone()
            mask = mask.clone()
            context[empty, 0] = self.empty_context
            mask[empty, 0] = True
        scores = self.context_attn(context).squeeze(-1) + self.recency_bias[:c]
        kind_vecs = self.context_kind.weight
        if codes is not None:
            scores = scores + (kind_vecs @ self.context_attn.weight[0])[codes]
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        pooled = torch.einsum("bc,bch->bh", attn, context)
        if codes is not None:
            mass = attn.new_zeros(b, kind_vecs.shape[0]).scatter_add(1, codes, attn)
            pooled = pooled + mass @ kind_vecs.to(mass.dtype)
        return F.normalize(self.user_proj(pooled), dim=-1)

    def context_items(self, context: torch.Tensor) -> torch.Tensor:
        """Context texts in the item space, ``[B, C, d]`` unit vectors (for the head's
        target attention and for explaining recommendations)."""
        return F.normalize(self.item_proj(context.float()), dim=-1)

    def context_items_at(self, vectors: torch.Tensor | None, rows: torch.Tensor
                         ) -> torch.Tensor:
        """:meth:`context_items` of packed contexts (:func:`pack_contexts`): each distinct
        text of ``vectors [U, hidden]`` projected once, then each position's row
        ``rows [B, C]`` read (``-1``, padding: the zero vector, as ``context_items`` of a
        zero entry). A batch's contexts repeat texts (popular items, a user's several
        samples), and a fine-tune step had projected every position."""
        if vectors is None:  # no texts at all: every position is padding
            return torch.zeros(*rows.shape, self.item_proj.out_features, device=rows.device)
        if vectors.is_inference() and torch.is_grad_enabled():
            vectors = vectors.clone()  # cached text vectors; training saves its input
        projected = F.normalize(self.item_proj(vectors.float()), dim=-1)
        padded = torch.cat([projected, projected.new_zeros(1, projected.shape[1])])
        return padded[rows.to(padded.device)]  # row -1 is the zero row appended last

    def outcome_logits(self, user: torch.Tensor, item: torch.Tensor,
                       ctx_items: torch.Tensor, ctx_mask: torch.Tensor,
                       counts: torch.Tensor | None = None,
                       ctx_kinds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, K]`` over :attr:`TowerConfig.classes` for (user, item) pairs, with
        each pair's context in the item space ``[B, C, d]``, its mask ``[B, C]``, its
        streaming count features ``[B, F]`` (:meth:`count_rows`; None: unknown, the
        wide part then adds only its bias) and its context's kind codes ``[B, C]``
        (None: unknown, the typed part adds only its bias)."""
        return self.head(self.pair_features(user, item, ctx_items, ctx_mask, counts,
                                            ctx_kinds))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Wide & deep (Cheng et al., "Wide & Deep Learning for Recommender Systems",
        DLRS 2016): ``logits = MLP(deep part of z) + W_k · typed matches
        + W · standardised counts + b``."""
        f, t = self.config.wide_features, len(CONTEXT_KINDS)
        return (self.outcome_head(z[:, :-(f + t)]) + self.typed(z[:, -(f + t):-f])
                + self.wide(z[:, -f:]))

    def count_logits(self, counts: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: what the count features add to the logits of pairs scored without
        them. The wide part is linear in the standardised counts, and a pair scored
        without counts has zeros there, so ``outcome_logits(..., counts)`` equals
        ``outcome_logits(...) + count_logits(counts)`` (the bias is in both)."""
        return self._standardised(counts) @ self.wide.weight.T

    def _standardised(self, counts: torch.Tensor) -> torch.Tensor:
        return (counts.float() - self.wide_mean) / (self.wide_var + 1e-6).sqrt()

    def count_rows(self, rows: Sequence[Sequence[float]], device: torch.device
                   ) -> torch.Tensor:
        """Feature vectors (``Sample.features``) as a ``[B, F]`` tensor; a row without
        them is the running mean (standardised: 0)."""
        f = self.config.wide_features
        out = self.wide_mean.to(device).repeat(len(rows), 1)
        have = [i for i, r in enumerate(rows) if len(r) == f]
        if have:
            out[have] = torch.tensor([list(rows[i]) for i in have], device=device,
                                     dtype=out.dtype)
        return out

    @torch.no_grad()
    def observe_counts(self, counts: torch.Tensor, momentum: float = 0.1) -> None:
        """Move the running moments of the count features towards a training batch's
        (the first batch sets them), as batch normalisation keeps its running
        statistics; serving standardises with them, so training and serving agree."""
        mean, var = counts.float().mean(0), counts.float().var(0, unbiased=False)
        if float(self.wide_rows) == 0:
            self.wide_mean.copy_(mean)
            self.wide_var.copy_(var)
        else:
            self.wide_mean.lerp_(mean, momentum)
            self.wide_var.lerp_(var, momentum)
        self.wide_rows += counts.shape[0]

    def pair_features(self, user: torch.Tensor, item: torch.Tensor, ctx_items: torch.Tensor,
                      ctx_mask: torch.Tensor, counts: torch.Tensor | None = None,
                      ctx_kinds: torch.Tensor | None = None) -> torch.Tensor:
        """The outcome head's input ``[B, 3d + 2 + 5 + F]``: the deep part, the typed
        matches, then the standardised count features (SMOTE interpolates these)."""
        sims = torch.einsum("bcd,bd->bc", ctx_items.float(), item.float())
        return self._pair_from_sims(user, item, sims, ctx_mask, counts, ctx_kinds)

    def grouped_logits(self, user: torch.Tensor, items: torch.Tensor, sims: torch.Tensor,
                       ctx_mask: torch.Tensor, ctx_kinds: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Logits ``[B, c, K]`` for ``c`` candidates ``items [B, c, d]`` of each of ``B``
        users ``[B, d]`` (no count features), given the candidates' cosines with their
        user's context ``sims [B, c, C]`` (:func:`context_sims`). The same logits as
        :meth:`outcome_logits` on the pairs one by one, without copying a user's context
        for each candidate: on a 256-user turn that copy (~300 MB at d = 384) had cost
        twenty times the products themselves."""
        b, c, d = items.shape
        cx = ctx_mask.shape[1]
        kinds = (ctx_kinds[:, None, :].expand(b, c, cx).reshape(b * c, cx)
                 if ctx_kinds is not None else None)
        z = self._pair_from_sims(user[:, None, :].expand(b, c, d).reshape(b * c, d),
                                 items.reshape(b * c, d), sims.reshape(b * c, cx),
                                 ctx_mask[:, None, :].expand(b, c, cx).reshape(b * c, cx),
                                 None, kinds)
        return self.head(z).reshape(b, c, -1)

    def _pair_from_sims(self, user: torch.Tensor, item: torch.Tensor, sims: torch.Tensor,
                        ctx_mask: torch.Tensor, counts: torch.Tensor | None,
                        ctx_kinds: torch.Tensor | None) -> torch.Tensor:
        if counts is None:
            std = torch.zeros(user.shape[0], self.config.wide_features, device=user.device)
        else:
            std = self._standardised(counts)
        return torch.cat([self._deep_features(user, item, sims, ctx_mask),
                          self._typed_matches(sims, ctx_mask, ctx_kinds), std], dim=-1)

    def _typed_matches(self, sims: torch.Tensor, ctx_mask: torch.Tensor,
                       ctx_kinds: torch.Tensor | None) -> torch.Tensor:
        """``[B, 5]``: per event kind, ``max_j exp((s_j − 1) / T)`` over the context
        entries of that kind (0 where there are none)."""
        t = len(CONTEXT_KINDS)
        if ctx_kinds is None:
            return torch.zeros(sims.shape[0], t, device=sims.device)
        match = torch.exp((sims - 1.0) / self.config.temperature).masked_fill(~ctx_mask, 0.0)
        onehot = F.one_hot(ctx_kinds.long(), t + 1)[..., 1:].to(match.dtype)
        return (match[..., None] * onehot).amax(dim=1)

    def _deep_features(self, user: torch.Tensor, item: torch.Tensor, sims: torch.Tensor,
                       ctx_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 3d + 2]``: the user, the item, their product, and the target attention
        (``sims``: the candidate's cosine with each context entry in the item space)."""
        has = ctx_mask.any(dim=1, keepdim=True)
        top = sims.masked_fill(~ctx_mask, float("-inf")).max(dim=1, keepdim=True).values
        top = torch.where(has, top, torch.zeros_like(top))
        attn = torch.softmax((sims / self.config.temperature).masked_fill(~ctx_mask, -1e4),
                             dim=1)
        soft = torch.where(has, (attn * sims).sum(1, keepdim=True), torch.zeros_like(top))
        # In logit units from "the very same item" (0) down (a near-duplicate title is
        # -1 or -2, an unrelated item -15): the head can then tell a repeat from a close
        # neighbour, which on raw cosines (1.0 vs 0.95) it learns only slowly.
        t = self.config.temperature
        top = torch.where(has, (top - 1.0) / t, torch.full_like(top, -1.0 / t))
        soft = torch.where(has, (soft - 1.0) / t, torch.full_like(soft, -1.0 / t))
        return torch.cat([user, item, user * item, top, soft], dim=-1)

    def retrieval_scores(self, user: torch.Tensor, items: torch.Tensor,
                         memory: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N]`` ``u·normalise(v + e) / T``: cosine similarities with the items' id
        memory (:meth:`item_memory`; None: none), over the temperature. The sum is
        normalised so memory can turn an item's vector, never outweigh every text by
        its length (unnormalised, frequent items' memory crowded out the rest)."""
        if memory is not None:
            items = F.normalize(items + memory, dim=-1)
        return user @ items.T / self.config.temperature

    # ------------------------------------------------------------------ parameters
    def head_parameters(self) -> list[nn.Parameter]:
        """Everything but the encoder (always trained)."""
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def head_state(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.state_dict().items() if not n.startswith("encoder.")}


def context_sims(items: torch.Tensor, ctx_items: torch.Tensor) -> torch.Tensor:
    """``sims[b, j, x] = items[b, j] · ctx_items[b, x]``: each of a user's candidates'
    cosine (unit vectors) with each entry of that user's context, one batched product.

    >>> context_sims(torch.eye(2)[None], torch.tensor([[[1.0, 0.0]]])).tolist()
    [[[1.0], [0.0]]]
    """
    return torch.einsum("bjd,bxd->bjx", items.float(), ctx_items.float())


def _id_memory(config: TowerConfig, d: int) -> tuple[nn.Embedding, nn.Linear]:
    """The id table ``E`` (``id_buckets`` rows and a padding row, all zero: no memory until
    trained) and its projection ``P`` to the item space. ``P`` is a seeded random map of
    its own generator (the towers' and head's draws stay as they were) and not zero, or
    ``E`` would get no gradient."""
    table = nn.Embedding(config.id_buckets + 1, config.id_dim, padding_idx=config.id_buckets)
    nn.init.zeros_(table.weight)
    out = nn.Linear(config.id_dim, d, bias=False)
    gen = torch.Generator().manual_seed(config.seed + 7919)
    with torch.no_grad():
        w = torch.empty(d, config.id_dim)
        _orthogonal_(w, gen)
        out.weight.copy_(w)
    return table, out


def _orthogonal_(t: torch.Tensor, gen: torch.Generator) -> None:
    """Seeded (semi-)orthogonal init (rows or columns orthonormal, whichever fit)."""
    nn.init.orthogonal_(t, generator=gen)


class Packed(NamedTuple):
    """A batch of contexts as the towers read them (:func:`pack_contexts`)."""

    ctx: torch.Tensor
    """Context vectors ``[B, C, hidden]`` (zero at padding)."""
    mask: torch.Tensor
    """``[B, C]``: True at real entries."""
    kinds: torch.Tensor
    """``[B, C]`` kind codes (0: unknown or padding)."""
    rows: torch.Tensor
    """``[B, C]``: each entry's row of the distinct text vectors (−1 at padding), for
    :meth:`TwoTowerRecommender.context_items_at`."""


def pack_contexts(contexts: Sequence[Sequence[str]], vectors: torch.Tensor | None,
                  texts: TextBatch, max_context: int, hidden: int, device: torch.device,
                  kinds: Sequence[Sequence[int]] | None = None) -> Packed:
    """Context vectors ``[B, C, hidden]``, mask ``[B, C]``, kind codes ``[B, C]`` (0
    where unknown) and each entry's row of ``vectors`` from each row's texts, whose
    vectors are rows of ``vectors`` as numbered by ``texts``, and each row's kind codes.

    >>> p = pack_contexts([["b", "a"], []], torch.eye(2), TextBatch(["a", "b"]), 3, 2,
    ...                   torch.device("cpu"))
    >>> p.rows.tolist(), p.ctx[0, 0].tolist()
    ([[1, 0, -1], [-1, -1, -1]], [0.0, 1.0])
    """
    b_n = len(contexts)
    ctx = torch.zeros(b_n, max_context, hidden, device=device)
    mask = torch.zeros(b_n, max_context, dtype=torch.bool, device=device)
    codes = torch.zeros(b_n, max_context, dtype=torch.long)
    at = torch.full((b_n, max_context), -1, dtype=torch.long)
    # One gather and one scatter for the whole batch (a row's parts are positions
    # 0..n-1 of that row), not one per row: 20 entries a row made the loop the cost.
    rows: list[int] = []
    cols: list[int] = []
    src: list[int] = []
    found: list[int] = []
    for b, parts in enumerate(contexts):
        parts = list(parts)[:max_context]
        n = len(parts)
        if not n or vectors is None:
            continue
        rows.extend([b] * n)
        cols.extend(range(n))
        src.extend(texts.rows(parts))
        if kinds is not None:
            k = list(kinds[b])[:n]
            found.extend(k + [0] * (n - len(k)))
    if rows and vectors is not None:
        r, c, where = torch.tensor(rows), torch.tensor(cols), torch.tensor(src)
        ctx[r.to(device), c.to(device)] = vectors[where.to(vectors.device)].to(device,
                                                                               ctx.dtype)
        mask[r.to(device), c.to(device)] = True
        at[r, c] = where
        if kinds is not None:
            codes[r, c] = torch.tensor(found)
    return Packed(ctx, mask, codes.to(device), at.to(device))


class TextBatch:
    """Unique texts of a batch, tokenised once; rows of the batch index into them."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.index: dict[str, int] = {}
        for t in texts:
            self.index.setdefault(t, len(self.index))

    @property
    def texts(self) -> list[str]:
        return list(self.index)

    def rows(self, texts: Sequence[str]) -> list[int]:
        return [self.index[t] for t in texts]


def tokenize(tokenizer: Any, texts: Sequence[str], max_len: int,
             fixed_length: bool = False) -> dict[str, torch.Tensor]:
    """Token ids and mask, padded to the longest text (or to ``max_len`` when
    ``fixed_length``, for benchmarks at a set sequence length)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len,
                    padding="max_length" if fixed_length else "longest", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
