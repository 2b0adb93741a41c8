"""The user tower's typed context: what the profile keeps, what a sample stores, and what
the towers and the head read from an entry's event kind."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from tailstream.configs import FineTuneConfig, TowerConfig
from tailstream.contract import CLASSES, Event
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.serving.baseline import new_profile, update_profile
from tailstream.models.towers.context import (
    CONTEXT_KINDS,
    CONTEXT_SEPARATOR,
    context_entries,
    entry_codes,
    kind_codes,
    sample_context,
)
from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.loading import build_model
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.towers.two_tower import TextBatch, context_sims, pack_contexts
from tailstream.models.training.evaluation import evaluate
from tailstream.models.training.finetune import FineTuner, prepare_data

CPU = torch.device("cpu")


def fold(*events: tuple[str, str]) -> dict:
    profile = new_profile()
    for n, (kind, value) in enumerate(events):
        ev = (Event(kind, f"e{n}", "u1", 100.0 + n, query=value) if kind == "search"
              else Event(kind, f"e{n}", "u1", 100.0 + n, item_id=value))
        profile = update_profile(profile, ev, "home", [])
    return profile


def test_the_profile_keeps_each_item_s_strongest_kind_in_recency_order() -> None:
    p = fold(("click", "a"), ("cart", "a"), ("click", "b"), ("search", "mug"), ("click", "a"))
    # "a" was carted, then looked at again: first, and still a cart.
    assert p["ctx"] == [["i", "a", "cart"], ["q", "mug"], ["i", "b", "click"]]
    assert fold(("cart", "a"), ("purchase", "a"))["ctx"] == [["i", "a", "purchase"]]


def test_the_profile_keeps_twenty_entries_by_default() -> None:
    p = fold(*[("click", f"i{n}") for n in range(30)])
    assert [e[1] for e in p["ctx"]] == [f"i{n}" for n in range(29, 9, -1)]
    assert TowerConfig().max_context == 20


def test_entries_carry_their_kinds_and_old_profiles_read_as_clicks() -> None:
    entries = context_entries({"ctx": [["i", "a", "fav"], ["q", "mug"], ["i", "b"]]},
                              {"a": "A | home"}, 20)
    assert [e.event for e in entries] == ["fav", "search", "click"]
    assert " ".join(e.event for e in entries) == "fav search click"
    assert kind_codes(" ".join(e.event for e in entries), 4) == [
        1 + CONTEXT_KINDS.index("fav"), 1 + CONTEXT_KINDS.index("search"), 1, 0]
    assert entry_codes(entries, 4) == kind_codes(" ".join(e.event for e in entries), 4)
    assert entry_codes(entries, 2) == kind_codes(" ".join(e.event for e in entries), 2)


@pytest.mark.parametrize("profile", [
    {"ctx": [["i", "a", "fav"], ["q", "mug"], ["i", "b"], ["i", "zz", "purchase"]]},
    {"queries": ["mug"], "items": ["a", "b"]},  # a profile from before "ctx"
    {},
])
def test_a_sample_stores_what_the_tower_reads_at_serving(profile: dict) -> None:
    entries = context_entries(profile, {"a": "A | home", "b": "B | home"}, 3)
    assert sample_context(profile, {"a": "A | home", "b": "B | home"}, 3) == (
        CONTEXT_SEPARATOR.join(e.text for e in entries), " ".join(e.event for e in entries))


def test_samples_keep_their_context_kinds_through_the_buffer_s_dict() -> None:
    s = Sample("e", "u", "i", "purchase", 1.0, user_text="A ; B", user_kinds="cart click")
    assert Sample.from_dict(s.to_dict()) == s
    assert Sample.from_dict({k: v for k, v in s.to_dict().items() if k != "user_kinds"}
                            ).user_kinds == ""


def test_pack_contexts_codes_each_row_s_kinds() -> None:
    texts = TextBatch(["a", "b"])
    _, mask, kinds, rows = pack_contexts([["a", "b"], []], torch.eye(2), texts, 3, 2, CPU,
                                         [[3, 1], []])
    assert mask.tolist() == [[True, True, False], [False, False, False]]
    assert kinds.tolist() == [[3, 1, 0], [0, 0, 0]]
    assert rows.tolist() == [[0, 1, -1], [-1, -1, -1]]


def _trained(model: torch.nn.Module, seed: int) -> torch.Generator:
    """Move every head parameter off its start (zeros there would hide a dropped term)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.head_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        model.context_kind.weight[0].zero_()  # the unknown kind's vector stays zero
    return gen


def test_the_user_tower_reads_kinds_as_if_added_to_each_entry(tiny_encoder: Path) -> None:
    """The tower never builds ``text + kind`` per entry; the user vectors must be those of
    the definition: attention over ``x + k`` pooled over ``x + k``."""
    model = build_model(load_encoder(tiny_encoder), TowerConfig(embed_dim=8))
    gen = _trained(model, 5)
    b, c, h = 4, 5, model.empty_context.shape[0]
    ctx = torch.randn(b, c, h, generator=gen)
    mask = torch.rand(b, c, generator=gen) > 0.3
    mask[0, 0] = True
    mask[2] = False  # no context: the learned empty vector, whatever its kinds say
    kinds = torch.randint(0, len(CONTEXT_KINDS) + 1, (b, c), generator=gen)
    ctx = ctx * mask[..., None]

    def reference(context: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        x = context + model.context_kind(k.masked_fill(~m, 0))
        empty = ~m.any(dim=1)
        x, m = x.clone(), m.clone()
        x[empty, 0] = model.empty_context
        m[empty, 0] = True
        s = model.context_attn(x).squeeze(-1) + model.recency_bias[:c]
        a = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1)
        return torch.nn.functional.normalize(
            model.user_proj(torch.einsum("bc,bch->bh", a, x)), dim=-1)

    with torch.no_grad():
        got = model.user_vectors(ctx, mask, kinds)
        assert torch.allclose(got, reference(ctx, mask, kinds), atol=1e-5)
        # The kinds matter (so the check above can fail), and not where masked.
        assert not torch.allclose(got, model.user_vectors(ctx, mask), atol=1e-3)
        shuffled = torch.where(mask, kinds, (kinds + 1) % (len(CONTEXT_KINDS) + 1))
        assert torch.equal(got, model.user_vectors(ctx, mask, shuffled))


def test_context_items_of_distinct_texts_are_those_of_every_entry(tiny_encoder: Path
                                                                   ) -> None:
    """Projecting each distinct text once and reading it per entry gives each entry's
    projection, zero at padding, and the same gradients."""
    model = build_model(load_encoder(tiny_encoder), TowerConfig(embed_dim=8))
    gen = _trained(model, 6)
    h = model.empty_context.shape[0]
    texts = TextBatch(["a", "b", "c"])
    vecs = torch.randn(3, h, generator=gen)
    contexts = [["b", "a", "b"], [], ["c"]]
    ctx, _, _, rows = pack_contexts(contexts, vecs, texts, 4, h, CPU)
    model.zero_grad()
    at = model.context_items_at(vecs, rows)
    at.pow(2).sum().backward()
    grad_at = model.item_proj.weight.grad.clone()
    model.zero_grad()
    every = model.context_items(ctx)
    every.pow(2).sum().backward()
    assert torch.allclose(at, every, atol=1e-6)
    assert torch.allclose(grad_at, model.item_proj.weight.grad, atol=1e-5)
    assert at[1].abs().sum() == 0 and at[0, 3].abs().sum() == 0
    assert torch.equal(model.context_items_at(None, rows[1:2]), torch.zeros(1, 4, 8))


def test_typed_matches_say_which_kind_of_entry_is_the_candidate(tiny_encoder: Path) -> None:
    model = build_model(load_encoder(tiny_encoder), TowerConfig(embed_dim=8))
    item = torch.nn.functional.normalize(torch.ones(1, 8), dim=-1)
    other = torch.nn.functional.normalize(torch.arange(8.0)[None] - 3.5, dim=-1)
    ctx = torch.stack([item[0], other[0]])[None]  # the very item, and an unrelated one
    mask = torch.tensor([[True, True]])
    cart, click = 1 + CONTEXT_KINDS.index("cart"), 1 + CONTEXT_KINDS.index("click")
    z = model.pair_features(item, item, ctx, mask, None, torch.tensor([[cart, click]]))
    t = len(CONTEXT_KINDS)
    typed = z[0, -(model.config.wide_features + t):-model.config.wide_features]
    assert typed[CONTEXT_KINDS.index("cart")] == pytest.approx(1.0, abs=1e-4)
    assert typed[CONTEXT_KINDS.index("click")] < 1e-6
    assert typed.sum() == pytest.approx(1.0, abs=1e-4)
    # At start the kinds change nothing: the base model reads texts alone.
    plain = model.outcome_logits(item, item, ctx, mask)
    typed_logits = model.outcome_logits(item, item, ctx, mask, None,
                                        torch.tensor([[cart, click]]))
    assert torch.equal(plain, typed_logits)
    hidden = torch.randn(1, 2, model.empty_context.shape[0])
    assert torch.equal(model.user_vectors(hidden, mask),
                       model.user_vectors(hidden, mask, torch.tensor([[cart, click]])))


def test_grouped_logits_are_the_pairs_logits_without_copying_contexts(
        tiny_encoder: Path) -> None:
    """The serving path scores each user's candidates against the user's context in
    place; every logit must be the one the pair gets alone (as trained)."""
    model = build_model(load_encoder(tiny_encoder), TowerConfig(embed_dim=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a head that is not at its start, so every input matters
        for p in model.head_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    b, c, cx, d = 3, 4, 5, 8
    unit = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(*shape, d, generator=gen), dim=-1)
    users, items, ctx = unit(b), unit(b, c), unit(b, cx)
    mask = torch.rand(b, cx, generator=gen) > 0.3
    mask[2] = False  # a user without context
    kinds = torch.randint(1, len(CONTEXT_KINDS) + 1, (b, cx), generator=gen)
    grouped = model.grouped_logits(users, items, context_sims(items, ctx), mask, kinds)
    assert grouped.shape[:2] == (b, c)
    for u in range(b):
        for j in range(c):
            alone = model.outcome_logits(users[u:u + 1], items[u, j:j + 1], ctx[u:u + 1],
                                         mask[u:u + 1], None, kinds[u:u + 1])
            assert torch.allclose(grouped[u, j], alone[0], atol=1e-5)
    assert not torch.allclose(grouped[0, 0], grouped[1, 0], atol=1e-3)


def test_the_head_learns_what_only_the_context_kind_tells(tiny_encoder: Path) -> None:
    """Every pair has the same texts (the user's one context entry is the item itself);
    only that entry's kind says whether it is a purchase: carted before, it is bought."""
    rng = random.Random(5)
    samples = []
    for i in range(1200):
        bought = rng.random() < 0.3
        samples.append(Sample(f"e{i}", f"u{i % 50}", f"i{i % 40}",
                              "purchase" if bought else "click", float(i),
                              user_text="red kettle | home", item_text="red kettle | home",
                              user_kinds="cart" if bought else "click"))
    n = Counter(s.label for s in samples)
    data = prepare_data(samples, {c: float(n.get(c, 0)) for c in CLASSES}, 0.2)
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=32))
    tv = TextVectors(model, enc.tokenizer, device=CPU, max_len=32, fingerprint="t")
    t = FineTuner(model, enc.tokenizer,
                  FineTuneConfig(policy="none", max_steps=60, batch_size=64, seed=1),
                  device=CPU, text_vectors=tv, class_weight=dict.fromkeys(CLASSES, 1.0),
                  max_len=32)
    before = evaluate(t.model, tv.vectors, data.holdout, data.stream_mix)
    t.train(data)
    after = evaluate(t.model, tv.vectors, data.holdout, data.stream_mix)
    assert before["recall_purchase"] < 0.5 < 0.95 < after["recall_purchase"]
    assert after["precision_purchase"] > 0.95
    # The same samples without kinds are a coin toss for the trained model.
    blind = [Sample(s.event_id, s.user_id, s.item_id, s.label, s.ts, user_text=s.user_text,
                    item_text=s.item_text) for s in data.holdout]
    guess = evaluate(t.model, tv.vectors, blind, data.stream_mix)
    assert guess["recall_purchase"] < 0.5 or guess["precision_purchase"] < 0.5


def test_the_user_tower_starts_with_a_recency_prior(tiny_encoder: Path) -> None:
    """Entry j starts with weight 2^(-j / half-life): the newest entries count most."""
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=8, max_context=3, context_half_life=1.0))
    hidden = model.empty_context.shape[0]
    basis = torch.eye(hidden)[:3][None]  # three orthogonal context vectors
    mask = torch.ones(1, 3, dtype=torch.bool)
    pooled = torch.softmax(model.recency_bias, dim=0)
    assert pooled.tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    expected = torch.nn.functional.normalize(model.user_proj(pooled @ basis[0])[None], dim=-1)
    assert torch.allclose(model.user_vectors(basis, mask), expected, atol=1e-6)
    flat = build_model(enc, TowerConfig(embed_dim=8, max_context=3, context_half_life=0.0))
    assert torch.equal(flat.recency_bias, torch.zeros(3))
