"""The trainer's run on CPU with a tiny random BERT: store, gate, rollback, failures."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tailstream import configs
from tailstream.configs import Policy, policy, tower_config
from tailstream.evaluation.specs import STRATEGIES, EvalConfig
from tailstream.evaluation.strategies import Harness
from tailstream.evaluation.stream import BlockState, Stream
from tailstream.evaluation.transformer import TransformerStrategy
from tailstream.metrics import TrainerMetrics
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.loading import checkpoint_tensors, load_served
from tailstream.models.towers.store import BASE_VERSION, CorruptCheckpoint, ModelStore, StoreError
from tailstream.models.towers.two_tower import ADDED_WEIGHTS
from tailstream.models.training.finetune import prepare_data
from tailstream.models.training.gate import decide
from tailstream.models.training.losses import LOSS_MAPPING
from tailstream.models.training.routine import fine_tune
from tailstream.models.training.selection import PolicySelector
from tailstream.settings import Settings
from tailstream.stack.client import version_lines
from tailstream.streams.trainer.sources import InMemorySource
from tailstream.streams.trainer.trainer import Trainer

CPU = torch.device("cpu")


def settings_for(encoder: Path, tmp: Path, **overrides: Any) -> Settings:
    """The trainer on a tiny encoder; one policy per trigger (no challengers) unless the
    test asks for policy selection."""
    base: dict[str, Any] = dict(
        encoder_path=str(encoder), data_dir=tmp, embed_dim=32, text_max_len=32,
        finetune_max_steps=60, finetune_batch_size=128, finetune_lr=3e-3,
        finetune_min_samples=50, weight_policy="class_balanced", weight_beta=0.999,
        selection_challengers=0)
    base.update(overrides)
    return Settings().replace(**base)


def make_trainer(s: Settings, samples: list[Sample]
                 ) -> tuple[Trainer, ModelStore, list[dict[str, Any]]]:
    store = ModelStore(s.model_store_dir)
    updates: list[dict[str, Any]] = []
    # The source stands in for the workers: it publishes their policy with its weights.
    trainer = Trainer(s, store, TrainerMetrics(), InMemorySource(samples, policy=policy(s)),
                      updates.append, device=CPU)
    return trainer, store, updates


def sample_value(metrics: TrainerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_gate_promotes_improvements_and_rejects_regressions() -> None:
    cur = {"recall_cart": 0.2, "recall_purchase": 0.3, "macro_f1": 0.4, "hit_at_10": 0.3,
           "support_cart": 40, "support_purchase": 20}
    assert decide(cur, {**cur, "recall_cart": 0.5}).promote
    held = decide(cur, {**cur, "recall_cart": 0.5, "recall_purchase": 0.295})
    assert held.promote  # within the recall tolerance: "holds"
    fell = decide(cur, {**cur, "recall_cart": 0.5, "recall_purchase": 0.25})
    assert not fell.promote and fell.code == "minority_recall_fell"
    assert "purchase recall fell 0.300 → 0.250" in fell.reason
    worse = decide(cur, {**cur, "recall_cart": 0.5, "hit_at_10": 0.2})
    assert not worse.promote and worse.code == "quality_fell"
    same = decide(cur, dict(cur))
    assert not same.promote and same.code == "no_improvement"


def test_a_better_candidate_is_promoted_and_announced(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = settings_for(tiny_encoder, tmp_path)
    trainer, store, updates = make_trainer(s, shop_samples(2000))
    report = trainer.handle({"reason": "buffer", "requested_at": 1.0})
    assert report.outcome == "promoted", report.reason
    assert store.current() == report.version == "v00001"
    assert len(updates) == 1
    assert {"version": "v00001", "parent": "base", "action": "promote",
            "reason": report.reason, "promoted_at": updates[0]["promoted_at"],
            "encoder_changed": False}.items() <= updates[0].items()
    manifest = store.manifest("v00001")
    assert manifest["status"] == "promoted" and manifest["parent"] == BASE_VERSION
    assert manifest["policy"]["policy"] == "class_balanced"
    assert set(manifest["weights_used"]) == {"click", "cart", "fav", "purchase"}
    assert manifest["data_window"]["holdout"] > 0
    assert manifest["metrics"]["candidate"]["recall_purchase"] > \
        manifest["metrics"]["current"]["recall_purchase"]
    assert len(manifest["files"]["model.safetensors"]) == 64
    # The decision layer the workers serve it with, fitted on the held-out window, and
    # what a worker loads with the version.
    assert manifest["decisions"]["fitted_on"] == manifest["data_window"]["holdout"]
    from tailstream.configs import tower_config
    from tailstream.models.towers.loading import load_served
    served = load_served(store, "v00001", s.encoder_path, tower_config(s), torch.device("cpu"))
    assert served.manifest["decisions"] == manifest["decisions"]
    assert sample_value(trainer.metrics, "tailstream_finetune_runs_total",
                        outcome="promoted") == 1
    assert sample_value(trainer.metrics, "tailstream_model_version_number") == 1
    # The trainer remembers what the promoted model learned, for replay next time.
    assert trainer.data.replay()


def test_checkpoint_round_trip_gives_the_same_scores(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    # The argmax gate and a lenient list tolerance: this test needs a promotion, not a
    # judgement of the candidate (the gate's own tests judge).
    s = settings_for(tiny_encoder, tmp_path, decision_objective="", gate_quality_tolerance=1.0)
    trainer, store, _ = make_trainer(s, shop_samples(1500))
    report = trainer.handle({"reason": "buffer"})
    assert report.outcome == "promoted" and report.version is not None, report.reason
    served, vectors = trainer.served()  # the promoted version, as the trainer holds it
    loaded = load_served(store, report.version, tiny_encoder, tower_config(s), CPU)
    texts = ["deluxe mug 3 | home/mug", "eco lamp 1 | home/lamp"]
    a = served.model.item_vectors(vectors.vectors(texts))
    b = loaded.model.item_vectors(vectors.vectors(texts))
    assert torch.allclose(a, b, atol=1e-6)
    assert loaded.text_fingerprint == served.text_fingerprint  # head-only: encoder unchanged


def test_a_tampered_checkpoint_is_refused(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    # Needs a promotion, not a judgement of the candidate (see the round-trip test).
    s = settings_for(tiny_encoder, tmp_path, decision_objective="", gate_quality_tolerance=1.0)
    trainer, store, _ = make_trainer(s, shop_samples(1500))
    first = trainer.handle({"reason": "buffer"})
    version = first.version
    assert first.outcome == "promoted" and version is not None, first.reason
    weights = store.root / "versions" / version / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        store.load(version)
    with pytest.raises(CorruptCheckpoint):
        load_served(store, version, tiny_encoder, tower_config(s), CPU)
    # The next run cannot start from a corrupt parent: it fails, nothing changes.
    trainer._served = None
    report = trainer.handle({"reason": "buffer"})
    assert report.outcome == "failed" and report.cause == "corrupt_checkpoint"
    assert store.current() == version
    assert len(store.versions()) == 1


def test_store_paths_cannot_escape(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    for bad in ("../x", "v1/../../etc", "/etc/passwd", "v0001", "latest"):
        with pytest.raises(StoreError):
            store.manifest(bad)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "CURRENT").write_text("../../etc/passwd")
    with pytest.raises(StoreError):
        store.current()


def test_a_candidate_that_is_worse_is_rejected_with_its_reason(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = settings_for(tiny_encoder, tmp_path, decision_objective="")  # the argmax's recall
    trainer, store, updates = make_trainer(s, shop_samples(2000))
    assert trainer.handle({"reason": "buffer"}).outcome == "promoted"
    # Then the workers switch to unweighted cross-entropy: on the stream's mix it learns to
    # say "click", minority recall falls, and the gate keeps v00001.
    trainer.data = InMemorySource(shop_samples(2000), policy=Policy("none"))
    report = trainer.handle({"reason": "drift"})
    assert report.outcome == "rejected", report.reason
    assert report.reason.startswith("rejected: ") and "recall fell" in report.reason
    assert store.current() == "v00001" and len(updates) == 1
    manifest = store.manifest(report.version or "")
    assert manifest["status"] == "rejected" and manifest["reason"] == report.reason
    assert manifest["parent"] == "v00001"
    runs = [json.loads(x) for x in (store.root / "runs.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in runs] == ["promoted", "rejected"]
    assert sample_value(trainer.metrics, "tailstream_promotion_decisions_total",
                        decision="rejected", reason="minority_recall_fell") == 1


def test_with_moved_decisions_a_candidate_trained_on_noise_is_rejected(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """The default gate (decisions with moved thresholds) holds the lists, the decision
    objective and the calibrated log-loss: a candidate that learned from labels shuffled
    at random (all but the newest, which the gate holds out) is worse on them."""
    s = settings_for(tiny_encoder, tmp_path)
    trainer, store, updates = make_trainer(s, shop_samples(2000))
    assert trainer.handle({"reason": "buffer"}).outcome == "promoted"
    clean = sorted(shop_samples(2000, seed=3), key=lambda x: x.ts)
    rng = random.Random(0)
    cut = int(0.7 * len(clean))
    labels = [x.label for x in clean[:cut]]
    rng.shuffle(labels)
    noisy = [dataclasses.replace(x, label=y) for x, y in zip(clean[:cut], labels, strict=True)]
    trainer.data = InMemorySource(noisy + clean[cut:], policy=policy(s))
    report = trainer.handle({"reason": "drift", "requested_at": 123.0})
    assert report.outcome == "rejected", report.reason
    assert "fell" in report.reason and store.current() == "v00001"
    # The rejected trigger still refits the served version's thresholds on its window:
    # kept in the store (a worker that starts later loads them) and announced.
    assert [u["action"] for u in updates] == ["promote", "decisions"]
    refresh = updates[1]
    assert refresh["version"] == "v00001" and refresh["window_of"] == report.version
    assert refresh["decisions"]["fitted_on"] > 0 and refresh["requested_at"] == 123.0
    kept = store.refreshed_decisions("v00001")
    assert kept is not None and kept["decisions"] == refresh["decisions"]
    assert refresh["decisions"] != store.manifest("v00001")["decisions"]  # a new window
    served = load_served(store, "v00001", tiny_encoder, tower_config(s), CPU)
    assert served.manifest["decisions"] == refresh["decisions"]
    assert report.decisions_refreshed == "v00001"
    assert sample_value(trainer.metrics, "tailstream_trainer_decision_refreshes_total") == 1
    # Switched off, a rejection leaves the served layer alone.
    trainer.settings = s.replace(decision_refresh=False)
    assert trainer.handle({"reason": "drift"}).outcome == "rejected"
    assert len(updates) == 2


def test_rollback_walks_back_through_promotions(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = settings_for(tiny_encoder, tmp_path)
    store = ModelStore(s.model_store_dir)
    trainer, _, _ = make_trainer(s, shop_samples(1500))
    first = trainer.handle({"reason": "buffer"}).version
    assert first == "v00001"
    store.promote(first, "manual")  # promoting the served version again changes nothing
    trainer.data = InMemorySource(shop_samples(1500, seed=5), policy=policy(s))
    trainer.settings = trainer.settings.replace(gate_quality_tolerance=1.0,
                                                gate_recall_tolerance=1.0)
    trainer.handle({"reason": "buffer"})
    versions = [m["version"] for m in store.versions()]
    assert versions == ["v00001", "v00002"]
    store.promote("v00002", "manual")
    assert store.rollback("test")["version"] == "v00001"
    assert store.current() == "v00001"
    assert store.manifest("v00002")["status"] == "rolled_back"
    trainer._served = None
    served, _ = trainer.served()
    assert served.version == "v00001"


def test_a_nan_loss_keeps_the_served_model(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_for(tiny_encoder, tmp_path)
    trainer, store, updates = make_trainer(s, shop_samples(1500))
    monkeypatch.setitem(LOSS_MAPPING, "class_balanced",
                        lambda logits, target, x: logits.sum(-1) * float("nan"))
    report = trainer.handle({"reason": "buffer"})
    assert report.outcome == "failed" and report.cause == "nan_loss"
    assert store.current() == BASE_VERSION and store.versions() == [] and updates == []
    assert sample_value(trainer.metrics, "tailstream_finetune_failures_total",
                        cause="nan_loss") == 1
    assert sample_value(trainer.metrics, "tailstream_finetune_running") == 0
    runs = [json.loads(x) for x in (store.root / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["cause"] == "nan_loss"


def test_too_few_samples_skip_the_run(tiny_encoder: Path, tmp_path: Path,
                                      shop_samples: Callable[..., list[Sample]]) -> None:
    s = settings_for(tiny_encoder, tmp_path, finetune_min_samples=500)
    trainer, store, _ = make_trainer(s, shop_samples(100))
    assert trainer.handle({"reason": "interval"}).outcome == "skipped"
    assert store.versions() == []


def test_the_trainer_and_the_evaluation_train_the_same_candidate(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """Both call the one routine: the same buffer, weights and policy through the trainer's
    path (a training request) and the evaluation's adaptive strategy (a block's end) give
    the same candidate metrics and the same gate decision."""
    s = settings_for(tiny_encoder, tmp_path, finetune_max_steps=40, finetune_max_seconds=1e6)
    samples = shop_samples(1500)
    live = InMemorySource(samples, policy=policy(s)).live_weights()
    assert live is not None
    trainer = Trainer(s, ModelStore(s.model_store_dir), TrainerMetrics(),
                      InMemorySource(samples, weights=live), lambda update: None, device=CPU)
    report = trainer.handle({"reason": "buffer"})
    assert report.outcome in ("promoted", "rejected"), report.reason

    block = BlockState(buffer=samples, decayed_counts=live.counts, weights=live.weights,
                       shares={}, tiers={}, item_counts={}, requests=[{"reason": "buffer"}],
                       policy=live.policy)
    stream = Stream([], [block, block], {}, {}, [[], []], [])
    harness = Harness(stream, s, EvalConfig(steps=s.finetune_max_steps,
                                            batch_size=s.finetune_batch_size, seed=0), tmp_path)
    candidate = TransformerStrategy(harness, "adaptive", STRATEGIES["adaptive"]).learn(block, 0)
    assert candidate is not None
    assert candidate.run.steps == report.steps == 40
    assert candidate.metrics == pytest.approx(report.metrics["candidate"], abs=1e-6)
    assert candidate.current == pytest.approx(report.metrics["current"], abs=1e-6)
    assert candidate.decision.promote == (report.outcome == "promoted")
    assert candidate.decision.reason == report.reason


def test_the_trainer_trains_with_the_workers_policy_not_its_own(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]],
        caplog: pytest.LogCaptureFixture) -> None:
    s = settings_for(tiny_encoder, tmp_path, weight_policy="focal", weight_gamma=3.0)
    published = Policy("inverse", min_weight=0.1, max_weight=20.0)
    trainer, store, _ = make_trainer(s, shop_samples(1500))
    trainer.data = InMemorySource(shop_samples(1500), policy=published)
    with caplog.at_level(logging.WARNING):
        report = trainer.handle({"reason": "buffer"})
    manifest = store.manifest(report.version or "")
    assert manifest["policy"] == published.describe() == {"policy": "inverse"}
    assert manifest["finetune"]["policy"] == "inverse"
    assert manifest["weights_used"] == trainer.data.live_weights().weights  # type: ignore[union-attr]
    assert "the workers published" in caplog.text and "focal" in caplog.text


def test_nothing_is_trained_before_the_workers_publish_a_policy(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = settings_for(tiny_encoder, tmp_path)
    trainer, store, _ = make_trainer(s, shop_samples(500))
    trainer.data = InMemorySource(shop_samples(500))  # neither weights nor a policy
    report = trainer.handle({"reason": "buffer"})
    assert report.outcome == "skipped" and "not published" in report.reason
    assert store.versions() == []


# --------------------------------------------------------------------------- policy selection
def selecting(encoder: Path, tmp: Path, **overrides: Any) -> Settings:
    """Workers on plain cross-entropy; the trainer also tries class-balanced weights and
    picks by minority recall (clearly better with class-balanced weights on this shop)."""
    base: dict[str, Any] = dict(weight_policy="none", selection_challengers=1,
                                selection_policies="none,class_balanced",
                                selection_objective="minority_recall",
                                decision_objective="")  # judged on the argmax

    return settings_for(encoder, tmp, **{**base, **overrides})


def test_the_trainer_selects_a_policy_and_reports_what_it_tried(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = selecting(tiny_encoder, tmp_path)
    trainer, store, updates = make_trainer(s, shop_samples(2000))
    report = trainer.handle({"reason": "interval"})
    assert report.outcome == "promoted", report.reason
    sel = report.selection
    assert [t["policy"] for t in sel["tried"]] == ["none", "class_balanced"]  # current first
    assert sel["objective"] == "minority_recall"
    assert sel["best"] == sel["promoted"] == report.policy == "class_balanced"
    for t in sel["tried"]:
        assert t["lift"] == pytest.approx(t["objective"] - t["served"])
        assert t["steps"] == 60
    assert sel["selector"]["triggers"] == 1 and sel["selector"]["incumbent"] == "class_balanced"
    assert " | selection by minority_recall (served " in report.reason
    assert updates[0]["reason"] == report.reason
    manifest = store.manifest(report.version or "")
    assert manifest["selection"] == json.loads(json.dumps(sel))
    assert manifest["policy"] == {"policy": "class_balanced", "beta": 0.999}
    assert manifest["policy_published"] == {"policy": "none"}
    assert manifest["finetune"]["policy"] == "class_balanced"
    assert manifest["weights_used"]["purchase"] > manifest["weights_used"]["click"]
    assert manifest["metrics"]["candidate"]["objective_minority_recall"] == \
        sel["tried"][1]["objective"]
    runs = [json.loads(x) for x in (store.root / "runs.jsonl").read_text().splitlines()]
    assert runs[-1]["selection"]["promoted"] == "class_balanced"
    assert runs[-1]["policy"] == "class_balanced"
    line = version_lines(store.versions())[0]  # `tailstream model list`
    assert "class_balanced" in line and "selection by minority_recall" in line
    assert sample_value(trainer.metrics, "tailstream_gate_metric_ratio", model="candidate",
                        metric="objective_minority_recall") == sel["tried"][1]["objective"]


def test_a_restarted_trainer_carries_on_selecting(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = selecting(tiny_encoder, tmp_path)
    trainer, store, _ = make_trainer(s, shop_samples(2000))
    trainer.handle({"reason": "interval"})
    state = json.loads((store.root / "selection.json").read_text())
    assert state["incumbent"] == "class_balanced" and state["triggers"] == 1
    again, _, _ = make_trainer(s, shop_samples(2000, seed=7))
    assert again.selector == trainer.selector
    report = again.handle({"reason": "interval"})
    assert report.outcome in ("promoted", "rejected"), report.reason
    assert [t["policy"] for t in report.selection["tried"]] == ["class_balanced", "none"]
    assert report.selection["selector"]["triggers"] == 2
    # No challenger configured: the current policy alone, as before selection existed.
    off, _, _ = make_trainer(s.replace(selection_challengers=0), shop_samples(2000, seed=8))
    assert off.selector is None
    plain = off.handle({"reason": "interval"})
    assert plain.selection == {} and " | selection" not in plain.reason


def test_the_evaluation_call_selects_like_the_trainer(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """The call the evaluation's ``adaptive`` strategy makes to run policy selection (one
    :class:`PolicySelector` per strategy, kept across its blocks): the same buffer, policy
    and weights give the trainer's trials, choice and gate decision."""
    s = selecting(tiny_encoder, tmp_path, finetune_max_steps=40, finetune_max_seconds=1e6)
    samples = shop_samples(1500)
    live = InMemorySource(samples, policy=policy(s)).live_weights()
    assert live is not None
    trainer = Trainer(s, ModelStore(s.model_store_dir), TrainerMetrics(),
                      InMemorySource(samples, weights=live), lambda update: None, device=CPU)
    report = trainer.handle({"reason": "buffer"})

    stream = Stream([], [], {}, {}, [[], []], [])
    harness = Harness(stream, s, EvalConfig(steps=s.finetune_max_steps,
                                            batch_size=s.finetune_batch_size, seed=0), tmp_path)
    strategy = TransformerStrategy(harness, "adaptive", STRATEGIES["adaptive"])
    selector = PolicySelector.from_config(configs.selection_config(s))
    cfg = dataclasses.replace(configs.finetune_config(s, live.policy), max_steps=40,
                              batch_size=s.finetune_batch_size, max_seconds=math.inf, seed=0)
    data = prepare_data(samples, live.counts, cfg.holdout_share, strategy.replay)
    cand = fine_tune(strategy.served, strategy.vectors, data, cfg=cfg,
                     class_weight=live.weights, device=harness.device,
                     gate=configs.gate_config(s), selector=selector, policy=live.policy,
                     counts=live.counts)
    assert [t.policy for t in cand.trials] == [t["policy"] for t in report.selection["tried"]]
    assert [t.objective for t in cand.trials] == pytest.approx(
        [t["objective"] for t in report.selection["tried"]], abs=1e-6)
    assert cand.policy == report.policy
    assert cand.decision.promote == (report.outcome == "promoted")
    assert selector.pulls == (trainer.selector.pulls if trainer.selector else None)


def test_a_store_written_before_the_wide_part_keeps_serving_and_training(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """An upgrade: the served version was saved by a release without the wide part. It
    loads with a zero wide part (the older model's outputs), and the next run trains."""
    s = settings_for(tiny_encoder, tmp_path)
    store = ModelStore(s.model_store_dir)
    base = load_served(store, BASE_VERSION, tiny_encoder, tower_config(s), CPU)
    old = {k: v for k, v in checkpoint_tensors(base.model)[0].items()
           if k not in ADDED_WEIGHTS}
    manifest = {"parent": BASE_VERSION, "tower": tower_config(s).to_dict(),
                "encoder": {"base_fingerprint": base.text_fingerprint, "included": False}}
    store.promote(store.save(old, manifest), "an older release")
    loaded = load_served(store, store.current(), tiny_encoder, tower_config(s), CPU)
    assert not loaded.model.wide.weight.any() and float(loaded.model.wide_rows) == 0
    samples = shop_samples(1500)
    trainer = Trainer(s, store, TrainerMetrics(), InMemorySource(samples, policy=policy(s)),
                      lambda update: None, device=CPU)
    report = trainer.handle({"reason": "buffer"})
    assert report.outcome in ("promoted", "rejected"), report.reason
    assert report.steps > 0
