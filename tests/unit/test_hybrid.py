"""Hybrid lists (models/serving/hybrid.py): the towers' candidates united with the
stateful sources and scored by the online blender, on a tiny random BERT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tailstream.configs import RankingConfig, SignalsConfig, TowerConfig
from tailstream.contract import Event
from tailstream.models.serving.blend import FEATURES, OnlineBlender
from tailstream.models.serving.hybrid import HybridRequest, hybrid_recommend
from tailstream.models.serving.scorer import Scorer
from tailstream.models.serving.signals import Signals
from tailstream.models.towers.context import ContextEntry, UserRequest
from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.loading import ServedModel, build_model

CPU = torch.device("cpu")
ITEMS = {f"i{n}": f"{['red', 'blue', 'green'][n % 3]} mug {n} | home/mug" for n in range(60)}


def scorer(tiny_encoder: Path, **ranking: Any) -> Scorer:
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=16, max_len=16)).eval()
    served = ServedModel("base", model, enc.tokenizer, enc.fingerprint, {})
    s = Scorer(served, device=CPU, max_len=16, cache_size=10_000,
               ranking=RankingConfig(**{"k": 5, "candidates": 20, "head_candidates": 10,
                                        "tail_share": 0.0, **ranking}))
    ids = list(ITEMS)
    s.add_items(ids, [ITEMS[i] for i in ids])
    return s


def info(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
    return ["head"] * len(ids), ["home/mug"] * len(ids), [-3.0] * len(ids)


def request(user: str, seen: list[str], sources: dict[str, list[str]],
            known: int | None = None, query: str | None = None) -> HybridRequest:
    ctx = [ContextEntry("i", ITEMS[i], ITEMS[i], i) for i in seen]
    return HybridRequest(UserRequest(user, ctx, set(seen)), sources, {"home/mug": 1.0},
                         query=query, known=known)


def test_lists_hold_only_known_unexcluded_items_from_every_source(tiny_encoder: Path) -> None:
    s = scorer(tiny_encoder)
    req = request("u", ["i1", "i2"], {"covisitation": ["i3", "i55", "i1"],
                                      "trending": ["i4", "i2"]}, known=30)
    req.sources = {k: [i for i in v if int(i[1:]) < 30] for k, v in req.sources.items()}
    [out] = hybrid_recommend(s, [req], info, OnlineBlender())
    ids = [r.item_id for r in out.ranked]
    assert len(ids) == 5
    assert not {"i1", "i2"} & set(ids)
    assert all(int(i[1:]) < 30 for i in out.candidates.ids)  # the towers' too
    assert {"i3", "i4"} <= set(out.candidates.ids)


def test_the_blender_learns_which_source_the_user_follows(tiny_encoder: Path) -> None:
    s = scorer(tiny_encoder)
    blender = OnlineBlender(lr=0.5)
    rng = np.random.default_rng(0)
    hits_before = hits_after = 0
    for n in range(80):
        covis = [f"i{k}" for k in rng.permutation(range(10, 60))[:6]]
        trend = [f"i{k}" for k in rng.permutation(range(10, 60))[:6]]
        [out] = hybrid_recommend(s, [request("u", ["i0"], {"covisitation": covis,
                                                           "trending": trend})],
                                 info, blender)
        target = covis[0]  # this shop's users take co-visitation's first suggestion
        hit = target in [r.item_id for r in out.ranked[:1]]
        if n < 10:
            hits_before += hit
        elif n >= 70:
            hits_after += hit
        blender.learn(out.candidates.x, out.candidates.row(target))
    assert blender.weight("rr_covisitation") > blender.weight("rr_trending") + 1.0
    assert hits_after == 10 and hits_after > hits_before


def test_a_search_proposes_items_that_match_the_query(tiny_encoder: Path) -> None:
    s = scorer(tiny_encoder)
    [plain, searched] = hybrid_recommend(
        s, [request("u", ["i0"], {}), request("v", ["i0"], {}, query="blue mug 7")],
        info, OnlineBlender())
    f = FEATURES.index("rr_query_match")
    assert plain.candidates.x[:, f].sum() == 0
    assert searched.candidates.x[:, f].max() == 1.0


def test_signals_feed_the_sources_in_time_order() -> None:
    sig = Signals(SignalsConfig(depth=5, recent=1))
    for n, (user, item) in enumerate([("a", "i1"), ("a", "i2"), ("b", "i1"), ("b", "i3")]):
        sig.observe(Event("click", f"e{n}", user, float(n), item_id=item))
    sig.observe(Event("search", "e9", "c", 5.0, query="blue mug"))
    sig.observe(Event("click", "e10", "c", 6.0, item_id="i9"))
    profile = {"items": ["i1", "i0"], "ctx": [["i", "i1"]], "ts": 6.0}
    out = sig.sources(profile, now=7.0)
    assert out["covisitation"][:2] == ["i2", "i3"] or set(out["covisitation"][:2]) == {
        "i2", "i3"}
    assert out["history"] == ["i0"] and "i1" not in out["trending"]
    searched = sig.sources({"items": [], "ctx": [["q", "blue mug"]], "ts": 6.5}, now=7.0)
    assert searched["query_lookup"] == ["i9"]
    late = sig.sources({"items": [], "ctx": [["q", "blue mug"]], "ts": 6.5}, now=1e6)
    assert "query_lookup" not in late  # too long after the search to steer


def test_the_worker_teaches_its_blender_with_each_users_next_interaction() -> None:
    import asyncio

    from tailstream.metrics import Metrics
    from tailstream.models.serving.blend import union
    from tailstream.settings import Settings
    from tailstream.streams.stores.blender_store import BlenderStore
    from tailstream.streams.worker.refresh import Refresher
    from tailstream.streams.worker.state import StreamState

    s = Settings()
    metrics = Metrics()
    state = StreamState(s, {}, signals=Signals(SignalsConfig(depth=5)))

    class NoLists:
        exposure = None
        last_published: dict[str, float] = {}
        pending = 0

        async def publish(self, lists: list[Any]) -> int:
            return 0

    refresh = Refresher(s, state, {}, NoLists(), metrics)  # type: ignore[arg-type]
    for user in ("a", "b"):
        refresh.shown[user] = union({"covisitation": ["x", "y"], "trending": ["z"]}, depth=5)
    before = refresh.blender.w.copy()
    refresh.learn_from([(Event("click", "e1", "a", 1.0, item_id="y"), None),
                        (Event("click", "e2", "b", 1.0, item_id="q"), None),  # not shown
                        (Event("click", "e3", "a", 2.0, item_id="x"), None)])  # taught once
    assert refresh.blender.updates == 1 and refresh.blender.offered == 2
    assert not np.allclose(refresh.blender.w, before)  # trending's item was not taken
    assert not refresh.shown
    get = metrics.registry.get_sample_value
    assert get("tailstream_blend_updates_total", {"outcome": "hit"}) == 1
    assert get("tailstream_blend_updates_total", {"outcome": "miss"}) == 1

    class FakeRedis:
        def __init__(self) -> None:
            self.data: dict[str, str] = {}

        async def get(self, key: str) -> str | None:
            return self.data.get(key)

        async def set(self, key: str, value: str) -> None:
            self.data[key] = value

    redis = FakeRedis()

    async def round_trip() -> OnlineBlender:
        await BlenderStore(redis, "t").save(refresh.blender)
        fresh = OnlineBlender()
        assert await BlenderStore(redis, "t").load_into(fresh)
        return fresh

    restored = asyncio.run(round_trip())
    assert np.allclose(restored.w, refresh.blender.w) and restored.updates == 1


@torch.inference_mode()
def expected_purchase(s: Scorer, req: UserRequest, item: str,
                      row: tuple[float, ...] | None) -> float:
    """p(purchase) of the head for (user, item) scored with the count features ``row``."""
    model = s.served.model
    users = s.user_vectors([req])
    v = s.index.matrix[torch.tensor(s.index.rows_of([item]))].float()
    counts = model.count_rows([row], CPU) if row is not None else None
    logits = model.outcome_logits(users.vectors, v, users.ctx_items, users.mask, counts,
                                  ctx_kinds=users.kinds)
    return float(torch.softmax(logits, -1)[0, model.config.classes.index("purchase")])


def test_listed_outcomes_read_the_count_features_of_the_items_shown(
        tiny_encoder: Path) -> None:
    """Candidates are ranked without the count features; the outcomes a list carries are
    the head's *with* them (as it was trained, and as its decision layer was fitted), for
    the items shown only — in both list makers."""
    s = scorer(tiny_encoder)
    model = s.served.model
    torch.manual_seed(3)
    with torch.no_grad():
        model.wide.weight.normal_(0, 2.0)
        model.wide_mean.normal_(0, 0.1)
    f = model.config.wide_features
    asked: list[tuple[str, list[str]]] = []

    def features(lists: Any) -> list[tuple[float, ...]]:
        asked.extend((user, list(items)) for user, items in lists)
        return [tuple(float((int(i[1:]) * (n + 1)) % 5) for n in range(f))
                for _, items in lists for i in items]

    req = request("u", ["i1", "i2"], {"covisitation": ["i3", "i4"]})
    [plain] = hybrid_recommend(s, [req], info, OnlineBlender())
    [hybrid] = hybrid_recommend(s, [req], info, OnlineBlender(), features)
    [towers] = s.recommend([req.request], info, features=features)
    assert [r.item_id for r in hybrid.ranked] == [r.item_id for r in plain.ranked]  # ranking
    assert asked[0] == ("u", [r.item_id for r in hybrid.ranked])  # k items, not candidates
    for lst in (hybrid.ranked, towers):
        for r in lst:
            row = features([("u", [r.item_id])])[0]
            assert r.p_purchase == pytest.approx(expected_purchase(s, req.request, r.item_id,
                                                                   row), abs=1e-5)
    moved = [abs(r.p_purchase - expected_purchase(s, req.request, r.item_id, None))
             for r in hybrid.ranked]
    assert max(moved) > 1e-3  # the features matter here: without them the test means nothing


def test_a_batch_s_lists_are_each_user_s_lists_alone(tiny_encoder: Path) -> None:
    """The micro-batch is scored as one pool of candidates (every column one array
    operation): each user's list, reasons, outcomes and candidates must be what the user
    gets alone — users of different sizes, an item the index does not hold, a search,
    a user with no candidates at all, tail quota and category cap at work."""
    s = scorer(tiny_encoder, tail_share=0.4, max_per_category=0.4)
    model = s.served.model
    torch.manual_seed(5)
    with torch.no_grad():
        model.wide.weight.normal_(0, 2.0)
    f = model.config.wide_features

    def varied(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
        n = [int(i[1:]) for i in ids]
        return (["tail" if k % 3 == 0 else "head" for k in n],
                [None if k % 7 == 0 else f"cat{k % 4}" for k in n], [-k / 10 for k in n])

    def features(lists: Any) -> list[tuple[float, ...]]:
        return [tuple(float((int(i[1:]) + len(user) * n) % 5) for n in range(f))
                if int(i[1:]) % 5 else () for user, items in lists for i in items]

    batch = [request("a", ["i1", "i2"], {"covisitation": ["i3", "i999", "i4"],
                                         "trending": ["i9", "i12", "i15"]}),
             request("bb", ["i20"], {"trending": ["i9", "i12"]}, query="red mug"),
             request("ccc", [], {}, known=0),
             request("dddd", ["i5", "i6", "i7", "i8"], {"history": ["i30", "i31"],
                                                       "category": [f"i{n}" for n in
                                                                    range(40, 59)]})]
    batch[3].affinity = {"cat1": 2.0, "cat2": 0.5, "nope": 9.0}
    blender = OnlineBlender()
    together = hybrid_recommend(s, batch, varied, blender, features)
    assert together[2].ranked == [] and together[2].candidates.ids == []
    assert "i999" not in together[0].candidates.ids
    assert {r.tier for r in together[3].ranked} == {"head", "tail"}
    for req, got in zip(batch, together, strict=True):
        [alone] = hybrid_recommend(s, [req], varied, blender, features)
        assert got.candidates.ids == alone.candidates.ids
        assert np.allclose(got.candidates.x, alone.candidates.x, atol=1e-5)
        assert ([(r.item_id, r.tier, r.reason, r.category, r.outcome) for r in got.ranked]
                == [(r.item_id, r.tier, r.reason, r.category, r.outcome)
                    for r in alone.ranked])
        for r, a in zip(got.ranked, alone.ranked, strict=True):
            assert (r.score, r.p_purchase, r.p_cart) == pytest.approx(
                (a.score, a.p_purchase, a.p_cart), abs=1e-5)


def test_a_turns_reasons_are_each_items_own_strongest_source() -> None:
    """The reasons of a turn's shown items, made with array operations over all of them,
    are what a walk over each item's source columns gives: the first source above every
    earlier one by more than 1e-9, near-ties, exact ties and no source at all included."""
    import random

    from tailstream.models.serving.hybrid import _REASONS, _reasons

    def one(row: list[float], category: str | None) -> str:  # the walk, item by item
        best, text = 0.0, "popular right now"
        for v, (_, words) in zip(row, _REASONS, strict=True):
            if v > best + 1e-9:
                best, text = v, words
        return text.format(cat=(category or "its category")[:40])

    rng = random.Random(5)
    values = [0.0, 0.0, 1.0, 0.5, 1 / 3, 1 / 3 + 5e-10, 1 / 3 + 2e-9, 0.25, 1e-10]
    rows = np.array([[rng.choice(values) for _ in _REASONS] for _ in range(3000)],
                    dtype=np.float32)
    cats = [rng.choice([None, "", "home/mug", "x" * 60]) for _ in range(len(rows))]
    want = [one(row, c) for row, c in zip(rows.tolist(), cats, strict=True)]
    assert _reasons(rows, cats) == want
    sources = {"popular in" if w.startswith("popular in ") else w for w in want}
    assert len(sources) == len(_REASONS) + 1  # every source, and none
    assert _reasons(rows[:0], []) == []
