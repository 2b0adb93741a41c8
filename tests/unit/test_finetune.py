"""Fine-tuning on CPU with a tiny random BERT: batches, loss wiring, training signal."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tailstream.models.training.finetune as finetune_module
from tailstream.configs import FineTuneConfig, Policy, TowerConfig
from tailstream.contract import CLASSES
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.features import FEATURE_NAMES
from tailstream.models.imbalance.policies import class_weights
from tailstream.models.towers.adapters import configure_trainable, merge_lora
from tailstream.models.towers.encoder import EncoderNotFound, load_encoder, resolve_encoder_path
from tailstream.models.towers.loading import build_model
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.training.evaluation import evaluate
from tailstream.models.training.finetune import (
    FineTuner,
    item_sampling_probability,
    prepare_data,
    sampling_plan,
)
from tailstream.models.training.losses import LOSS_MAPPING, LossInputs

CPU = torch.device("cpu")


def tuner(encoder: Path, cfg: FineTuneConfig, weights: dict[str, float] | None = None,
          layers: int = 0) -> FineTuner:
    enc = load_encoder(encoder)
    model = build_model(enc, TowerConfig(embed_dim=32))
    configure_trainable(model.encoder, layers)
    tv = TextVectors(model, enc.tokenizer, device=CPU, max_len=32, fingerprint="t")
    return FineTuner(model, enc.tokenizer, cfg, device=CPU,
                     text_vectors=tv if layers == 0 else None,
                     class_weight=weights or dict.fromkeys(CLASSES, 1.0), max_len=32)


def counts_of(samples: list[Sample]) -> dict[str, float]:
    n = Counter(s.label for s in samples)
    return {c: float(n.get(c, 0)) for c in CLASSES}


def test_missing_encoder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EncoderNotFound, match="TAILSTREAM_ENCODER_PATH"):
        resolve_encoder_path(tmp_path)


def test_holdout_is_the_newest_of_each_class(shop_samples: Callable[..., list[Sample]]) -> None:
    samples = shop_samples(500)
    data = prepare_data(samples, counts_of(samples), 0.2)
    assert not {s.event_id for s in data.pool} & {s.event_id for s in data.holdout}
    for c in {s.label for s in samples}:
        for tail in (True, False):  # the newest of each stratum of the class
            pool = [s.ts for s in data.pool if s.label == c and (s.tier == "tail") == tail]
            held = [s.ts for s in data.holdout if s.label == c and (s.tier == "tail") == tail]
            if held and pool:
                assert min(held) > max(pool)
    assert len(data.holdout) == pytest.approx(100, abs=6)


def test_holdout_takes_its_share_of_the_tail_fifo_and_of_the_reservoir() -> None:
    """A buffer's clicks: a reservoir over the whole stream (t 0–1,000) and a FIFO of the
    recent tail-item clicks (t 900–1,000). The newest fifth of the clicks as a whole
    would be 25 tail clicks (half the FIFO) and 5 others; stratified, the candidate keeps
    80 % of each."""
    reservoir = [Sample(f"r{i}", "u", f"h{i % 7}", "click", float(i * 10), tier="head")
                 for i in range(100)]
    fifo = [Sample(f"t{i}", "u", f"t{i}", "click", 900.0 + i * 2, tier="tail")
            for i in range(50)]
    data = prepare_data(reservoir + fifo, {"click": 1.0}, 0.2)
    held = Counter(s.tier for s in data.holdout)
    assert held == {"head": 20, "tail": 10}
    assert {s.event_id for s in data.holdout if s.tier == "tail"} == {
        f"t{i}" for i in range(40, 50)}


def test_sampling_plan_reweights_the_buffer_back_to_the_stream() -> None:
    pool = ([Sample(f"c{i}", "u", f"i{i}", "click", 0.0) for i in range(60)]
            + [Sample(f"p{i}", "u", f"j{i}", "purchase", 0.0) for i in range(40)])
    data = prepare_data(pool, {"click": 98, "purchase": 2}, 0.0)
    plan = sampling_plan(data, FineTuneConfig(builder="none", replay_share=0.0), CLASSES)
    # The buffer holds 60/40; the stream is 98/2: w = π_stream / π_batch.
    assert plan.sample_weight["click"] == pytest.approx(0.98 / 0.6)
    assert plan.sample_weight["purchase"] == pytest.approx(0.02 / 0.4)
    assert sum(plan.batch_mix[c] * plan.sample_weight[c] for c in plan.batch_mix) == \
        pytest.approx(1.0)
    over = sampling_plan(data, FineTuneConfig(builder="oversample", replay_share=0.0), CLASSES)
    assert over.main_mix == {"click": 0.5, "purchase": 0.5}
    assert over.sample_weight == pytest.approx({"click": 1.0, "purchase": 1.0})


def test_item_sampling_probability_is_a_distribution(
        shop_samples: Callable[..., list[Sample]]) -> None:
    samples = shop_samples(400)
    replay = shop_samples(100, seed=3)
    q = item_sampling_probability(samples, {"click": 0.4, "cart": 0.2, "fav": 0.2,
                                            "purchase": 0.2}, replay, 0.25)
    assert sum(math.exp(v) for v in q.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("builder", ["none", "oversample", "undersample"])
def test_batches_have_the_builders_mix_and_the_replay_share(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]], builder: str) -> None:
    samples = shop_samples(1500)
    replay = [Sample(f"r{i}", "u", "ri", "click", 0.0, item_text="old") for i in range(50)]
    data = prepare_data(samples, counts_of(samples), 0.2, replay)
    t = tuner(tiny_encoder, FineTuneConfig(builder=builder, batch_size=200, replay_share=0.25))
    plan = sampling_plan(data, t.cfg, CLASSES)
    mix: Counter[str] = Counter()
    replayed = 0
    for _ in range(20):
        batch = t.draw(data, plan)
        assert len(batch) == 200
        replayed += sum(s.event_id.startswith("r") for s in batch)
        mix.update(s.label for s in batch if not s.event_id.startswith("r"))
    assert replayed == 20 * 50
    total = sum(mix.values())
    for c, share in plan.main_mix.items():
        assert mix[c] / total == pytest.approx(share, abs=0.03)


@pytest.mark.parametrize("policy", sorted(LOSS_MAPPING))
def test_the_policy_picks_the_loss(policy: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 3, 0, 0])
    w = torch.tensor([0.5, 2.0, 3.0, 4.0])
    prior = torch.log(torch.tensor([0.85, 0.07, 0.03, 0.05]))
    x = LossInputs(w, torch.ones(6), prior, gamma=2.0, tau=1.0)
    logp = torch.log_softmax(logits, -1)
    nll = -logp[torch.arange(6), target]
    expected = {
        "none": nll,
        "inverse": w[target] * nll,
        "sqrt_inverse": w[target] * nll,
        "class_balanced": w[target] * nll,
        "focal": w[target] * (1 - torch.exp(-nll)) ** 2 * nll,
        "logit_adjusted": -torch.log_softmax(logits + prior, -1)[torch.arange(6), target],
        "importance": (torch.exp(-nll) / prior.exp()[target]).clamp(0.1, 10.0) * nll,
    }[policy]
    got = LOSS_MAPPING[policy](logits, target, x)
    assert torch.allclose(got, expected, atol=1e-6)


def test_training_steps_use_the_configured_loss(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    samples = shop_samples(600)
    data = prepare_data(samples, counts_of(samples), 0.2)
    seen: list[str] = []
    for policy in ("focal", "logit_adjusted"):
        original = LOSS_MAPPING[policy]

        def spy(logits: torch.Tensor, target: torch.Tensor, x: LossInputs,
                _name: str = policy, _fn: Callable[..., torch.Tensor] = original
                ) -> torch.Tensor:
            seen.append(_name)
            return _fn(logits, target, x)

        monkeypatch.setitem(LOSS_MAPPING, policy, spy)
        tuner(tiny_encoder, FineTuneConfig(policy=policy, max_steps=2, batch_size=32)).train(data)
    assert seen == ["focal", "focal", "logit_adjusted", "logit_adjusted"]


def test_class_balanced_training_lifts_minority_recall(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    samples = shop_samples(2500)
    counts = counts_of(samples)
    data = prepare_data(samples, counts, 0.2)
    results = {}
    for policy in ("none", "class_balanced"):
        weights = class_weights(Policy(policy, beta=0.999), counts)
        t = tuner(tiny_encoder, FineTuneConfig(policy=policy, max_steps=120, batch_size=128,
                                               lr=3e-3, seed=1), weights)
        run = t.train(data)
        assert run.steps == 120 and run.loss < run.loss_first
        assert t.text_vectors is not None
        results[policy] = evaluate(t.model, t.text_vectors.vectors, data.holdout,
                                   data.stream_mix)
    print({p: round(r["minority_macro_recall"], 3) for p, r in results.items()})
    assert results["class_balanced"]["minority_macro_recall"] > \
        results["none"]["minority_macro_recall"] + 0.3


def test_training_the_top_layer_changes_only_it(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    samples = shop_samples(300)
    data = prepare_data(samples, counts_of(samples), 0.2)
    t = tuner(tiny_encoder, FineTuneConfig(max_steps=3, batch_size=32, encoder_lr=1e-2),
              layers=1)
    before = {n: p.detach().clone() for n, p in t.model.encoder.named_parameters()}
    t.train(data)
    changed = {n for n, p in t.model.encoder.named_parameters()
               if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("encoder.layer.1.") for n in changed)


def test_lora_adapters_train_and_merge_to_the_same_function(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    samples = shop_samples(300)
    data = prepare_data(samples, counts_of(samples), 0.2)
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig(embed_dim=32))
    n = configure_trainable(model.encoder, layers=2, lora_rank=4)
    assert n == 2 * 2 * 4 * (32 + 32)  # 2 layers × (q, v) × rank × (in + out)
    t = FineTuner(model, enc.tokenizer, FineTuneConfig(max_steps=3, batch_size=32,
                                                         encoder_lr=1e-2),
                  device=CPU, text_vectors=None, class_weight=dict.fromkeys(CLASSES, 1.0),
                  max_len=32)
    t.train(data)
    ids = enc.tokenizer(["deluxe kettle 1 | home/kettle"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        adapted = model.encode_tokens(ids["input_ids"], ids["attention_mask"])
        assert merge_lora(model.encoder) == 4
        merged = model.encode_tokens(ids["input_ids"], ids["attention_mask"])
    assert torch.allclose(adapted, merged, atol=1e-5)


@pytest.mark.parametrize("sampler", ["smote", "adasyn"])
def test_synthetic_pairs_join_the_minority_classes(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]], sampler: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SMOTE or ADASYN pairs (imbalanced-learn, on the head's input features) join every
    step, with their class's label, and their loss reaches the towers."""
    samples = shop_samples(600)
    data = prepare_data(samples, counts_of(samples), 0.2)
    t = tuner(tiny_encoder, FineTuneConfig(max_steps=3, batch_size=64, smote_share=0.25,
                                           sampler=sampler, builder="oversample"))
    made: list[str] = []
    original = finetune_module.synthetic_embeddings

    def spy(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["sampler"] == sampler and args[0].requires_grad
        out = original(*args, **kwargs)
        made.extend(out[1])
        return out

    monkeypatch.setattr(finetune_module, "synthetic_embeddings", spy)
    run = t.train(data)
    assert run.synthetic_pairs == len(made) == 3 * 16
    assert set(made) <= set(t.cfg.minority_classes) and len(set(made)) > 1


def test_augmentation_rewrites_only_minority_texts(
        tiny_encoder: Path) -> None:
    pool = ([Sample(f"c{i}", "u", f"i{i}", "click", float(i), item_text="cheap phone case")
             for i in range(50)]
            + [Sample(f"p{i}", "u", f"j{i}", "purchase", float(i),
                      item_text="cheap phone case") for i in range(50)])
    data = prepare_data(pool, {"click": 50, "purchase": 50}, 0.0)
    t = tuner(tiny_encoder, FineTuneConfig(batch_size=100, augment_share=1.0, replay_share=0))
    t.rng = random.Random(0)
    batch = t.draw(data, sampling_plan(data, t.cfg, CLASSES))
    changed = {s.label for s in batch if s.item_text != "cheap phone case"}
    assert changed == {"purchase"}


def test_ties_do_not_count_as_hits_in_the_gate(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """A model that scores every item the same (an untrained one, for users without
    context) must not get HitRate@10 = 1 from the gate: ties rank in the middle."""
    samples = shop_samples(600)
    data = prepare_data(samples, counts_of(samples), 0.3)
    t = tuner(tiny_encoder, FineTuneConfig(max_steps=1, batch_size=32))
    assert t.text_vectors is not None

    def flat(texts: list[str]) -> torch.Tensor:  # every text the same vector: all scores tie
        return torch.ones(len(texts), t.model.empty_context.shape[0])

    result = evaluate(t.model, flat, data.holdout, data.stream_mix)
    items = len({s.item_id for s in data.holdout})
    assert items > 40
    assert result["hit_at_10"] < 0.5, result["hit_at_10"]


def test_a_pickled_encoder_is_never_loaded(tiny_encoder: Path, tmp_path: Path) -> None:
    """Only model.safetensors is read: a folder whose weights are a pickle is refused."""
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_encoder, pickled)
    state = load_encoder(tiny_encoder).model.state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises((EncoderNotFound, OSError)):
        load_encoder(pickled)


def test_the_wide_part_learns_what_only_the_count_features_tell(tiny_encoder: Path) -> None:
    """Every pair has the same texts; only the ``repeat`` count feature says whether it is
    a purchase. The deep part cannot tell them apart; the wide part must."""
    rng = random.Random(3)
    repeat = FEATURE_NAMES.index("repeat")
    samples = []
    for i in range(1200):
        bought = rng.random() < 0.3
        x = [rng.random() * 0.2 for _ in FEATURE_NAMES]
        x[repeat] = float(bought)
        samples.append(Sample(f"e{i}", f"u{i % 50}", f"i{i % 40}",
                              "purchase" if bought else "click", float(i),
                              user_text="red kettle", item_text="red kettle | home",
                              features=tuple(x)))
    data = prepare_data(samples, counts_of(samples), 0.2)
    t = tuner(tiny_encoder, FineTuneConfig(policy="none", max_steps=60, batch_size=64, seed=1))
    assert t.text_vectors is not None
    before = evaluate(t.model, t.text_vectors.vectors, data.holdout, data.stream_mix)
    t.train(data)
    after = evaluate(t.model, t.text_vectors.vectors, data.holdout, data.stream_mix)
    print(before["recall_purchase"], after["recall_purchase"])
    assert before["recall_purchase"] < 0.5 < 0.95 < after["recall_purchase"]
    assert after["precision_purchase"] > 0.95
    # Without the features (a list's candidates), the wide part adds only its bias.
    assert float(t.model.wide_rows) > 0
    z = t.model.pair_features(torch.zeros(2, 32), torch.zeros(2, 32), torch.zeros(2, 1, 32),
                              torch.zeros(2, 1, dtype=torch.bool))
    assert torch.equal(z[:, -len(FEATURE_NAMES):], torch.zeros(2, len(FEATURE_NAMES)))


def test_samples_keep_their_count_features_through_the_buffer_s_json() -> None:
    s = Sample("e1", "u1", "i1", "cart", 1.0, features=(0.1, 0.25))
    assert Sample.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert Sample.from_dict({k: v for k, v in s.to_dict().items() if k != "features"}
                            ).features == ()


def test_the_tower_config_sizes_the_wide_part_to_the_count_features() -> None:
    assert TowerConfig().wide_features == len(FEATURE_NAMES)
