"""The decision layer as workers serve it: fitted by the trainer on the gate's held-out
window, carried in the version's manifest, corrected to the worker's running class prior
(models/training/routine.py ``fit_decisions``, models/serving/scorer.py ``outcomes``,
streams/worker/imbalance.py ``live_prior``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tailstream.configs import GateConfig, RankingConfig, TowerConfig
from tailstream.contract import CLASSES, Event
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.decisions import DecisionLayer, RunningPrior, as_prior
from tailstream.models.imbalance.features import FEATURE_NAMES
from tailstream.models.imbalance.online import OnlineOutcomeModel
from tailstream.models.serving.blend import OnlineBlender
from tailstream.models.serving.hybrid import HybridRequest, hybrid_recommend
from tailstream.models.serving.scorer import Scorer
from tailstream.models.towers.context import ContextEntry, UserRequest
from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.loading import ServedModel, build_model
from tailstream.models.training.finetune import TrainData
from tailstream.models.training.routine import ADOPTED, Candidate, fit_decisions, refresh_decisions

CPU = torch.device("cpu")
ITEMS = {f"i{n}": f"{['red', 'blue', 'green'][n % 3]} mug {n} | home/mug" for n in range(40)}
PURCHASE = CLASSES.index("purchase")


def weak_head(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A head whose p(purchase) is a little higher for purchases, labels at a 90/4/3/3 mix."""
    rng = np.random.default_rng(seed)
    y = rng.choice(4, size=n, p=[0.9, 0.04, 0.03, 0.03])
    logits = rng.normal(0, 0.3, (n, 4)) + np.log([0.9, 0.04, 0.03, 0.03])
    logits[np.arange(n), y] += 0.8
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def served_scorer(tiny_encoder: Path, decisions: dict[str, object] | None) -> Scorer:
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=16, max_len=16)).eval()
    served = ServedModel("v1", model, enc.tokenizer, enc.fingerprint,
                         {"decisions": decisions} if decisions else {})
    s = Scorer(served, device=CPU, max_len=16, cache_size=10_000,
               ranking=RankingConfig(k=5, candidates=20, head_candidates=10, tail_share=0.0))
    s.add_items(list(ITEMS), list(ITEMS.values()))
    return s


def layer_dict() -> dict[str, object]:
    proba, y = weak_head(3000)
    return DecisionLayer(4, "g_mean", (1, 2, 3)).fit(
        [proba], y, live_prior=np.array([0.9, 0.04, 0.03, 0.03])).to_dict()


def test_the_trainer_fits_the_layer_on_the_held_out_window_only(tiny_encoder: Path) -> None:
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=16, max_len=16))
    proba, y = weak_head(400)
    holdout = [Sample(f"e{n}", "u", "i", CLASSES[int(k)], float(n)) for n, k in enumerate(y)]
    data = TrainData([], holdout, [], {"click": 0.9, "cart": 0.04, "fav": 0.03,
                                       "purchase": 0.03})
    cand = Candidate(model, None, 0, None, ADOPTED, holdout_proba=proba)  # type: ignore[arg-type]
    fitted = fit_decisions(cand, data, GateConfig())
    assert fitted is not None and fitted["fitted_on"] == 400
    layer = DecisionLayer.from_dict(fitted)
    assert layer.fit_prior is not None
    assert np.allclose(layer.fit_prior, as_prior(data.stream_mix, CLASSES))
    # Moved thresholds: rare classes get decided at all (the plain argmax hardly does).
    _, pred = layer.predict([proba], layer.fit_prior)
    assert (pred == PURCHASE).sum() > (proba.argmax(1) == PURCHASE).sum()
    # Nothing to fit on: no moved decisions, or too small a window.
    assert fit_decisions(cand, data, dataclasses.replace(GateConfig(), move_to=None)) is None
    small = TrainData([], holdout[:20], [], data.stream_mix)
    assert fit_decisions(dataclasses.replace(cand, holdout_proba=proba[:20]), small,
                         GateConfig()) is None


def test_a_sale_moves_served_decisions_without_a_fine_tune(tiny_encoder: Path) -> None:
    s = served_scorer(tiny_encoder, layer_dict())
    rows, _ = weak_head(500, seed=1)
    buy, _, decided = s.outcomes(rows)  # no live prior yet: the mix it was fitted for
    s.live_prior = np.array([0.81, 0.04, 0.03, 0.12])  # purchases × 4
    buy_sale, _, decided_sale = s.outcomes(rows)
    assert all(b2 > b1 for b1, b2 in zip(buy, buy_sale, strict=True))
    assert decided_sale.count("purchase") > decided.count("purchase")
    assert set(decided) <= set(CLASSES)
    # A canary's scorer decides at the same running prior as the serving one.
    canary = s.sibling(s.served)
    assert canary.outcomes(rows)[2] == decided_sale


def test_the_base_model_serves_the_heads_own_probabilities(tiny_encoder: Path) -> None:
    s = served_scorer(tiny_encoder, None)
    rows, _ = weak_head(50)
    buy, cart, decided = s.outcomes(rows)
    assert np.allclose(buy, rows[:, PURCHASE]) and np.allclose(cart, rows[:, 1])
    assert decided == [CLASSES[int(k)] for k in rows.argmax(1)]


def test_every_listed_item_carries_its_decided_outcome(tiny_encoder: Path) -> None:
    s = served_scorer(tiny_encoder, layer_dict())
    ctx = [ContextEntry("i", ITEMS["i1"], ITEMS["i1"], "i1")]
    req = HybridRequest(UserRequest("u", ctx, {"i1"}), {"trending": ["i2", "i3"]},
                        {"home/mug": 1.0})
    [out] = hybrid_recommend(s, [req], lambda ids: (["head"] * len(ids),
                                                    ["home/mug"] * len(ids),
                                                    [-3.0] * len(ids)), OnlineBlender())
    scored = [r for r in out.ranked if r.outcome]
    assert scored and all(r.outcome in CLASSES for r in scored)
    wire = scored[0].to_dict(1)
    assert wire["outcome"] == scored[0].outcome and 0.0 <= wire["p_purchase"] <= 1.0
    towers = s.recommend([req.request], lambda ids: (["head"] * len(ids),
                                                  ["home/mug"] * len(ids),
                                                  [-3.0] * len(ids)))
    assert towers[0] and all(r.outcome in CLASSES for r in towers[0])


def test_the_workers_running_prior_waits_for_the_mix_then_follows_it() -> None:
    from tailstream.settings import Settings
    from tailstream.streams.worker.imbalance import ImbalanceLoop, Observation

    settings = Settings().replace(mix_warmup_events=100, decision_prior_half_life=50.0)
    loop = ImbalanceLoop(settings)

    def batch(kind: str, n: int, start: int) -> list[Observation]:
        return [Observation(Event(kind, f"{kind}{start + k}", f"u{k % 7}", float(start + k),
                                  item_id=f"i{k % 11}"), 0, {}, 0.0, False, "item",
                            lambda: ("", ""))
                for k in range(n)]

    loop.observe_batch(batch("click", 60, 0))
    assert loop.live_prior() is None  # under mix_warmup_events: the fitted mix stands
    loop.observe_batch(batch("click", 60, 60))
    before = loop.live_prior()
    assert before is not None and before[CLASSES.index("click")] > 0.99
    loop.observe_batch(batch("purchase", 50, 120))  # one half-life of purchases
    after = loop.live_prior()
    assert after is not None and 0.45 < after[PURCHASE] < 0.6
    ref = RunningPrior(4, 50.0)
    for k in [0] * 120 + [PURCHASE] * 50:
        ref.observe(k)
    assert np.allclose(after, ref.prior())
    from tailstream.metrics import Metrics
    metrics = Metrics()
    metrics.observe_imbalance(loop)
    assert metrics.registry.get_sample_value(
        "tailstream_decision_prior_ratio", {"event_class": "purchase"}) == after[PURCHASE]


# --------------------------------------------------------------------------- refreshes
def test_a_rejected_trigger_refits_the_served_models_thresholds_on_its_window(
        tiny_encoder: Path) -> None:
    """refresh_decisions fits on the *served* head's window probabilities (not the
    candidate's), and only when the refresh is on and the window can carry a layer."""
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=16, max_len=16))
    served_proba, y = weak_head(400, seed=4)
    holdout = [Sample(f"e{n}", "u", "i", CLASSES[int(k)], float(n)) for n, k in enumerate(y)]
    data = TrainData([], holdout, [], {"click": 0.9, "cart": 0.04, "fav": 0.03,
                                       "purchase": 0.03})
    # The rejected candidate's own probabilities say nothing (uniform): a layer fitted on
    # them would differ from one fitted on the served head's.
    cand = Candidate(model, None, 0, None, ADOPTED,  # type: ignore[arg-type]
                     holdout_proba=np.full_like(served_proba, 0.25))
    fitted = refresh_decisions([served_proba], cand, data, GateConfig())
    assert fitted is not None and fitted["fitted_on"] == 400
    expected = fit_decisions(dataclasses.replace(cand, holdout_proba=served_proba), data,
                             GateConfig())
    assert fitted == expected
    assert fitted != fit_decisions(cand, data, GateConfig())
    off = dataclasses.replace(GateConfig(), refresh_decisions=False)
    assert refresh_decisions([served_proba], cand, data, off) is None
    assert refresh_decisions([], cand, data, GateConfig()) is None


def test_a_refreshed_layer_takes_over_from_the_argmax_in_one_assignment(
        tiny_encoder: Path) -> None:
    s = served_scorer(tiny_encoder, None)
    rows, _ = weak_head(500, seed=1)
    before = s.outcomes(rows)[2]
    assert s.decisions is None and before == [CLASSES[int(k)] for k in rows.argmax(1)]
    weights = s.served.model
    s.set_decisions(layer_dict())
    after = s.outcomes(rows)[2]
    assert s.decisions is not None and s.served.model is weights  # same weights
    assert after.count("purchase") > before.count("purchase")


def test_the_store_keeps_refreshes_for_workers_that_start_later(
        tiny_encoder: Path, tmp_path: Path) -> None:
    import asyncio

    from tailstream.metrics import Metrics
    from tailstream.models.towers.loading import load_served
    from tailstream.models.towers.store import ModelStore, StoreError
    from tailstream.settings import Secret, Settings
    from tailstream.streams.worker.model_updates import apply_model_update
    from tailstream.streams.worker.scoring import ScoringService

    store = ModelStore(tmp_path / "models")
    assert store.refreshed_decisions("base") is None
    tower = TowerConfig(embed_dim=16, max_len=16)
    assert load_served(store, "base", tiny_encoder, tower, CPU).manifest.get("decisions") is None
    layer = layer_dict()
    store.save_decisions("base", layer, {"window_of": "v00001"})
    loaded = load_served(store, "base", tiny_encoder, tower, CPU)
    assert loaded.manifest["decisions"] == layer and loaded.manifest["decisions_refreshed_at"]
    with pytest.raises(StoreError):
        store.save_decisions("v00007", layer)  # no such version
    (store.root / "decisions" / "base.json").write_text("{not json")
    assert store.refreshed_decisions("base") is None  # unreadable: the manifest's serves
    store.save_decisions("base", layer)

    settings = Settings().replace(
        kafka_bootstrap="127.0.0.1:1", redis_url=Secret("redis://127.0.0.1:1/0"),
        data_dir=tmp_path, model_dir=store.root, encoder_path=str(tiny_encoder),
        embed_dim=16, text_max_len=16, text_vectors_shared=False, device="cpu")
    metrics = Metrics()
    service = ScoringService(settings, metrics)
    try:
        asyncio.run(service.start())
        assert service.scorer is not None and service.scorer.decisions is not None
        other = dict(layer, fitted_on=1)
        assert not service.refresh_decisions("v00003", other)  # another version: stale
        # As the worker's model-updates task applies it: no swap, no refresh of lists.
        asyncio.run(apply_model_update({"action": "decisions", "version": "base",
                                        "decisions": other}, service, None,  # type: ignore[arg-type]
                                       lambda ids: []))
        assert service.scorer.decisions is not None
        assert service.scorer.decisions.fitted_on == 1
        assert service.version.startswith("base")
        # The river fast path reaches the scorer only for a layer that stacks it.
        online = OnlineOutcomeModel()
        service.set_live_prior(np.full(4, 0.25), online)
        assert service.scorer.fast_path is None
        proba, y = weak_head(2000)
        other = np.full((len(y), 4), 0.2)
        other[np.arange(len(y)), y] += np.random.default_rng(1).uniform(0.0, 0.4, len(y))
        stacked = DecisionLayer(4).fit([proba, other / other.sum(1, keepdims=True)], y)
        assert stacked.reads(1)
        assert service.refresh_decisions("base", stacked.to_dict())
        service.set_live_prior(np.full(4, 0.25), online)
        assert service.scorer.fast_path is not None
        assert np.allclose(service.scorer.fast_path(np.zeros((2, len(FEATURE_NAMES)))), 0.25)
    finally:
        service.close()
    assert metrics.registry.get_sample_value("tailstream_decision_refreshes_total") == 2


def test_the_layer_stacks_the_fast_paths_probabilities_where_they_help(
        tiny_encoder: Path) -> None:
    """The held-out samples carry the river fast path's prediction: with
    ``TAILSTREAM_DECISION_STACK_FAST`` the trainer's layer stacks it beside the head when it
    predicts better out of fold, and leaves it out when it is noise; without, never."""
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=16, max_len=16))
    proba, y = weak_head(1500)
    rng = np.random.default_rng(7)
    sharp = np.full((len(y), 4), 0.1)
    sharp[np.arange(len(y)), y] = 0.7  # a fast path that knows the class well
    noise = rng.dirichlet([1, 1, 1, 1], size=len(y))
    mix = {"click": 0.9, "cart": 0.04, "fav": 0.03, "purchase": 0.03}
    cand = Candidate(model, None, 0, None, ADOPTED, holdout_proba=proba)  # type: ignore[arg-type]
    chosen = {}
    for name, fast, gate in (("sharp", sharp, GateConfig(stack_fast=True)),
                             ("noise", noise, GateConfig(stack_fast=True)),
                             ("off", sharp, GateConfig())):
        holdout = [Sample(f"e{n}", "u", "i", CLASSES[int(k)], float(n), fast=tuple(fast[n]))
                   for n, k in enumerate(y)]
        fitted = fit_decisions(cand, TrainData([], holdout, [], mix), gate)
        assert fitted is not None
        chosen[name] = DecisionLayer.from_dict(fitted)
    assert chosen["sharp"].reads(1) and not chosen["noise"].reads(1)
    assert chosen["noise"].inputs == (0,)
    assert chosen["off"].inputs == (0,)  # TAILSTREAM_DECISION_STACK_FAST off: the head
    _, pred = chosen["sharp"].predict([proba, sharp], None)
    assert (pred == y).mean() > 0.9


def test_listed_outcomes_stack_the_fast_path_when_the_layer_does(tiny_encoder: Path) -> None:
    """A served layer that stacks the fast path reads it for the items a list shows —
    from the same count-feature rows, as of the last batch — in both list makers; a layer
    that does not never asks for it."""
    proba, y = weak_head(3000)
    rng = np.random.default_rng(8)
    other = np.full((len(y), 4), 0.2)
    other[np.arange(len(y)), y] += rng.uniform(0.0, 0.4, len(y))
    other /= other.sum(1, keepdims=True)
    layer = DecisionLayer(4, "g_mean", (1, 2, 3)).fit(
        [proba, other], y, live_prior=np.array([0.9, 0.04, 0.03, 0.03]))
    assert layer.reads(0) and layer.reads(1)
    s = served_scorer(tiny_encoder, layer.to_dict())
    f = s.served.model.config.wide_features

    def features(lists: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[float, ...]]:
        return [tuple(float((int(i[1:]) * (n + 1)) % 5) / 5 for n in range(f))
                for _, items in lists for i in items]

    asked: list[np.ndarray] = []

    def fast_path(rows: np.ndarray) -> np.ndarray:
        asked.append(rows.copy())
        z = np.exp(3.0 * rows[:, :4])
        return z / z.sum(1, keepdims=True)

    s.fast_path = fast_path
    req = UserRequest("u", [ContextEntry("i", ITEMS["i1"], ITEMS["i1"], "i1")], {"i1"})
    [towers] = s.recommend([req], lambda ids: (["head"] * len(ids), [None] * len(ids),
                                                [-3.0] * len(ids)), features=features)
    assert len(asked) == 1 and len(asked[0]) == len(towers)  # the items shown, once
    counts, fast = s.list_inputs(features, "u", [r.item_id for r in towers])
    assert fast is not None and np.allclose(fast, fast_path(np.array(
        features([("u", [r.item_id for r in towers])]))))
    users = s.user_vectors([req])
    rows = s.index.rows_of([r.item_id for r in towers])
    head = s.served.model.outcome_logits(
        users.vectors.expand(len(rows), -1),
        s.index.matrix[torch.tensor(rows)].float(), users.ctx_items.expand(len(rows), -1, -1),
        users.mask.expand(len(rows), -1), None, ctx_kinds=users.kinds.expand(len(rows), -1))
    plain = torch.softmax(head, -1).detach().numpy()
    buy, _, decided = s.outcomes(plain, counts, fast)
    assert [r.p_purchase for r in towers] == pytest.approx(buy, abs=1e-5)
    assert [r.outcome for r in towers] == decided
    without = s.outcomes(plain, counts, None)[0]  # uniform in its place
    assert max(abs(a - b) for a, b in zip(buy, without, strict=True)) > 1e-3
    [hybrid] = hybrid_recommend(s, [HybridRequest(req, {"covisitation": ["i3", "i4"]},
                                                  {"home/mug": 1.0})],
                                lambda ids: (["head"] * len(ids), ["home/mug"] * len(ids),
                                             [-3.0] * len(ids)),
                                OnlineBlender(), features)
    assert len(asked) == 4  # list_inputs and the check above, then the hybrid list's
    assert len(asked[-1]) == len([r for r in hybrid.ranked if r.outcome])  # items shown
    # A layer of the head alone never computes the fast path.
    s.set_decisions(layer_dict())
    asked.clear()
    s.recommend([req], lambda ids: (["head"] * len(ids), [None] * len(ids),
                                    [-3.0] * len(ids)), features=features)
    assert not asked and hybrid.ranked


def test_the_evaluation_decides_with_the_fast_path_when_the_layer_stacks_it() -> None:
    """``adaptive`` decides each interaction as a worker would: with the river fast
    path's prediction made before that interaction beside the head's, when the served
    layer stacks it (uniform where there was none)."""
    from types import SimpleNamespace

    from tailstream.evaluation.stream import Interaction
    from tailstream.evaluation.transformer import TransformerStrategy

    proba, y = weak_head(2000)
    rng = np.random.default_rng(9)
    fast = np.full((len(y), 4), 0.15)
    fast[np.arange(len(y)), y] += 0.4
    fast /= fast.sum(1, keepdims=True)
    layer = DecisionLayer(4, "g_mean", (1, 2, 3)).fit([proba, fast], y)
    assert layer.reads(1)
    strategy = TransformerStrategy.__new__(TransformerStrategy)
    strategy.scorer = SimpleNamespace(decisions=layer)  # type: ignore[assignment]
    strategy.spec = SimpleNamespace(adaptive=True)  # type: ignore[assignment]
    strategy.settings = SimpleNamespace(mix_warmup_events=10**9)  # type: ignore[assignment]
    strategy.prior = RunningPrior(4)
    strategy._prior_events = 0
    strategy.result = SimpleNamespace(decisions=[])  # type: ignore[assignment]
    picks = rng.choice(len(y), 200, replace=False)
    block = [Interaction(Sample(f"e{n}", "u", "i", CLASSES[int(y[n])], float(n)), 1, "head",
                         None, dict(zip(CLASSES, fast[n].tolist(), strict=True)) if n % 9
                         else None, None, None, False) for n in picks]
    probs, _ = strategy._decide(block, proba[picks])
    given = fast[picks].copy()
    given[[i for i, n in enumerate(picks) if n % 9 == 0]] = 0.25
    expected, _ = layer.predict([proba[picks], given], layer.serving_prior(None))
    assert np.allclose(probs, expected)
    assert not np.allclose(probs, layer.predict([proba[picks], np.full((200, 4), 0.25)],
                                                layer.serving_prior(None))[0])
