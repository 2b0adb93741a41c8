"""The item-id memory: frequency filter, collisionless slots, twins told apart, checkpoints
and serving (``models/towers/ids.py``)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from tailstream.configs import FineTuneConfig, RankingConfig, TowerConfig, policy, tower_config
from tailstream.contract import CLASSES
from tailstream.metrics import TrainerMetrics
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.serving.scorer import Scorer
from tailstream.models.towers import ids
from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.loading import (
    ServedModel,
    build_model,
    checkpoint_tensors,
    load_served,
)
from tailstream.models.towers.store import ModelStore
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.towers.two_tower import TwoTowerRecommender
from tailstream.models.training.finetune import FineTuner, prepare_data
from tailstream.settings import Settings
from tailstream.streams.trainer.sources import InMemorySource
from tailstream.streams.trainer.trainer import Trainer

CPU = torch.device("cpu")
TOWER = TowerConfig(embed_dim=32, id_buckets=256, id_dim=8)


def model_of(encoder: Path, tower: TowerConfig = TOWER) -> tuple[TwoTowerRecommender, object]:
    enc = load_encoder(encoder)
    return build_model(enc, tower), enc.tokenizer


def test_the_base_model_is_the_text_model(tiny_encoder: Path) -> None:
    with_ids, _ = model_of(tiny_encoder)
    without, _ = model_of(tiny_encoder, TowerConfig(embed_dim=32))
    # The same seeded towers and head: the id memory draws from its own generator.
    assert torch.equal(with_ids.item_proj.weight, without.item_proj.weight)
    assert torch.equal(with_ids.outcome_head[0].weight, without.outcome_head[0].weight)
    assert with_ids.item_memory(["a", "b"]) is None  # nothing admitted: text alone
    with_ids.admit_ids({"a": 5}, 2)
    memory = with_ids.item_memory(["a", "b"])
    assert memory is not None and float(memory.detach().abs().sum()) == 0.0  # admitted, untrained


def test_only_frequent_items_get_a_slot_and_never_anothers(tiny_encoder: Path) -> None:
    model, _ = model_of(tiny_encoder)
    assert model.admit_ids({"hot": 3, "warm": 2, "cold": 1}, 2) == 2
    rows = model.id_rows(["hot", "warm", "cold", "new"]).tolist()
    pad = TOWER.id_buckets
    assert rows[0] != pad and rows[1] != pad and rows[0] != rows[1]
    assert rows[2] == pad and rows[3] == pad  # under the filter / never seen: text alone
    assert model.admit_ids({"hot": 9}, 2) == 0  # admitted once, kept
    assert model.id_rows(["hot"]).tolist() == rows[:1]
    # An id whose two buckets are both owned by others reads neither (no shared row).
    owner = torch.zeros(8, dtype=torch.long)
    names = [f"x{k}" for k in range(200)]
    fps = ids.fingerprints(names)
    ids.admit(owner, fps, torch.ones(len(names), dtype=torch.bool))
    assert int((owner != 0).sum()) == 8  # the table is full
    rows8 = ids.lookup(owner, fps)
    owned = rows8 < 8
    assert int(owned.sum()) == 8
    assert torch.equal(owner[rows8[owned]], fps[owned])  # each row read by its owner only


def twins(n: int = 600, seed: int = 0) -> list[Sample]:
    """Two items with the same text; coffee drinkers take one, tea drinkers the other."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        coffee = rng.random() < 0.5
        item = "twin-coffee" if coffee else "twin-tea"
        if rng.random() < 0.3:  # other items, so batches hold negatives
            item = f"other{rng.randrange(20)}"
        out.append(Sample(f"e{k}", f"u{k}", item, "click", float(k),
                          user_text="coffee beans dark roast" if coffee else "green tea leaves",
                          item_text="blue ceramic mug" if item.startswith("twin") else
                          f"gadget number {item}"))
    return out


def twin_gap(model: TwoTowerRecommender, tokenizer: object) -> float:
    """How much more a coffee drinker's score is for the coffee twin than the tea twin."""
    tv = TextVectors(model, tokenizer, device=CPU, max_len=32, fingerprint="t")
    vecs = tv.vectors(["coffee beans dark roast", "blue ceramic mug"])
    ctx = vecs[:1][None]
    user = model.user_vectors(ctx, torch.ones(1, 1, dtype=torch.bool))
    items = model.item_vectors(vecs[1:].repeat(2, 1))
    scores = model.retrieval_scores(user, items,
                                    model.item_memory(["twin-coffee", "twin-tea"]))
    return float(scores[0, 0] - scores[0, 1])


def train(model: TwoTowerRecommender, tokenizer: object, samples: list[Sample]) -> None:
    cfg = FineTuneConfig(policy="none", max_steps=60, batch_size=64, replay_share=0.0,
                         retrieval_weight=1.0, seed=0)
    tv = TextVectors(model, tokenizer, device=CPU, max_len=32, fingerprint="t")
    counts = {c: 1.0 for c in CLASSES}
    FineTuner(model, tokenizer, cfg, device=CPU, text_vectors=tv,
              class_weight=dict.fromkeys(CLASSES, 1.0), max_len=32
              ).train(prepare_data(samples, counts, 0.0))


def test_items_with_one_text_are_told_apart_by_their_ids(tiny_encoder: Path) -> None:
    samples = twins()
    with_ids, tok = model_of(tiny_encoder)
    with_ids.admit_ids({s.item_id: 2 for s in samples}, 2)
    train(with_ids, tok, samples)
    without, tok2 = model_of(tiny_encoder, TowerConfig(embed_dim=32))
    train(without, tok2, samples)
    with torch.no_grad():
        # Same text, same score up to float32 rounding (two equal rows of one product:
        # 1.9e-6 apart in one run): a coin flip.
        assert abs(twin_gap(without, tok2)) < 1e-5
        assert twin_gap(with_ids, tok) > 0.5  # the coffee twin first for a coffee drinker


def test_checkpoints_and_the_index_carry_the_memory(tiny_encoder: Path, tmp_path: Path) -> None:
    samples = twins(300)
    model, tok = model_of(tiny_encoder)
    model.admit_ids({s.item_id: 2 for s in samples}, 2)
    train(model, tok, samples)
    model.eval()
    enc = load_encoder(tiny_encoder)
    store = ModelStore(tmp_path)
    tensors, _ = checkpoint_tensors(model)
    version = store.save(tensors, {"tower": TOWER.to_dict(),
                                   "encoder": {"base_fingerprint": enc.fingerprint}})
    served = load_served(store, version, tiny_encoder, TOWER, CPU)
    assert torch.equal(served.model.id_owner, model.id_owner)
    with torch.no_grad():
        assert twin_gap(served.model, tok) == twin_gap(model, tok)
    scorer = Scorer(ServedModel(version, served.model, enc.tokenizer, enc.fingerprint, {}),
                    device=CPU, max_len=32, cache_size=1000, ranking=RankingConfig())
    scorer.add_items(["twin-coffee", "twin-tea"], ["blue ceramic mug"] * 2)
    # The head reads the text rows (one per text); search reads the rows with memory.
    assert torch.equal(scorer.index.vectors(["twin-coffee"]), scorer.index.vectors(["twin-tea"]))
    vecs = scorer.texts.vectors(["coffee beans dark roast"])
    user = served.model.user_vectors(vecs[None], torch.ones(1, 1, dtype=torch.bool))
    assert scorer.index.search(user, k=1)[1] == [["twin-coffee"]]
    # A store written before the id memory (no such weights, no such tower keys) loads.
    old = {k: v for k, v in tensors.items() if not k.startswith("id_")}
    tower = {k: v for k, v in TOWER.to_dict().items() if not k.startswith("id_")}
    legacy = store.save(old, {"tower": tower, "encoder": {"base_fingerprint": enc.fingerprint}})
    assert load_served(store, legacy, tiny_encoder, TOWER, CPU).model.item_memory(["a"]) is None


def test_a_store_from_before_the_id_memory_keeps_training(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """Upgrade path: the served version has no id table; the trainer's candidate is a copy
    of it, and its manifest must describe that shape (not today's settings'), or the new
    version would not load."""
    s = Settings().replace(encoder_path=str(tiny_encoder), data_dir=tmp_path, embed_dim=32,
                           text_max_len=32, finetune_max_steps=20, finetune_batch_size=64,
                           finetune_min_samples=50, selection_challengers=0)
    enc = load_encoder(tiny_encoder)
    legacy_tower = tower_config(s.replace(id_memory=False))
    assert tower_config(s).id_buckets > 0 and legacy_tower.id_buckets == 0
    tensors, _ = checkpoint_tensors(build_model(enc, legacy_tower))
    store = ModelStore(s.model_store_dir)
    old = {k: v for k, v in tensors.items() if not k.startswith("id_")}
    tower = {k: v for k, v in legacy_tower.to_dict().items() if not k.startswith("id_")}
    store.promote(store.save(old, {"tower": tower,
                                   "encoder": {"base_fingerprint": enc.fingerprint}}), "legacy")
    trainer = Trainer(s, store, TrainerMetrics(),
                      InMemorySource(shop_samples(1000), policy=policy(s)), lambda _: None,
                      device=CPU)
    report = trainer.handle({"reason": "buffer", "requested_at": 1.0})
    assert report.version
    assert store.manifest(report.version)["tower"]["id_buckets"] == 0
    loaded = load_served(store, report.version, tiny_encoder, tower_config(s), CPU)
    assert loaded.model.item_memory(["i00"]) is None
