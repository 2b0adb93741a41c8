"""Online attribution and the canary, with in-memory fakes: what a served list is credited
with, the per-version figures, the canary's test and the trainer's canary controller."""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from tailstream.configs import AttributionConfig
from tailstream.contract import Event
from tailstream.metrics import Metrics, TrainerMetrics
from tailstream.models.serving.canary import in_canary, judge_canary, one_sided_z
from tailstream.models.towers.store import ModelStore
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.stores.impressions import (
    Impression,
    OnlineCounters,
    OnlineFigures,
    read_online,
)
from tailstream.streams.stores.publisher import RecList
from tailstream.streams.trainer.canary import CanaryController

T0 = 1_700_000_000.0


def imp(user: str, items: list[str], version: str = "v00001", at: float = T0,
        tiers: list[str] | None = None, arm: str = "serving") -> Impression:
    return Impression(user, f"l-{user}-{at}", version, arm, "hybrid", "event", at,
                      tuple(items), tuple(tiers or ["head"] * len(items)))


def ev(kind: str, user: str, item: str, ts: float, n: list[int] = [0]) -> tuple[Event, None]:  # noqa: B006
    n[0] += 1
    return Event(kind, f"e{n[0]}", user, ts, item_id=item), None


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


class Figures:
    """Stands in for Redis under OnlineCounters: the hash fields it would hold."""

    def __init__(self) -> None:
        self.fields: defaultdict[str, defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int))

    def take(self, counters: OnlineCounters) -> None:
        for version, counts in counters.pending.items():
            for k, n in counts.items():
                self.fields[version][k] += n
        counters.pending.clear()

    def of(self, version: str) -> OnlineFigures:
        return OnlineFigures.from_hash(dict(self.fields[version]))


def attribution(window_s: float = 1800.0, max_users: int = 1000
                ) -> tuple[Any, Metrics, OnlineCounters]:
    from tailstream.streams.worker.attribution import Attribution

    metrics = Metrics()
    counters = OnlineCounters(None, "ts")
    return (Attribution(AttributionConfig(window_s=window_s, max_users=max_users,
                                          tail_target=0.25), metrics, counters),
            metrics, counters)


# --------------------------------------------------------------------------- attribution
def test_the_next_interaction_judges_the_list_and_hits_are_attributed() -> None:
    att, m, counters = attribution()
    att.shown([imp("u1", ["a", "b", "c"], tiers=["head", "torso", "tail"]),
               imp("u2", ["a", "b"]), imp("u3", ["x"], version="v00002", arm="canary")])
    att.observe([ev("click", "u1", "c", T0 + 5), ev("click", "u2", "zz", T0 + 5),
                 ev("click", "u3", "x", T0 + 1)])
    # u1's first interaction hit position 3 (a tail item); u2's missed.
    assert value(m, "tailstream_judged_lists_total", model_version="v00001", outcome="hit") == 1
    assert value(m, "tailstream_judged_lists_total", model_version="v00001",
                 outcome="miss") == 1
    assert value(m, "tailstream_attributed_total", model_version="v00001", tier="tail",
                 **{"class": "click"}) == 1
    assert value(m, "tailstream_attributed_position_total", position="2-3") == 1
    assert value(m, "tailstream_impression_lists_total", model_version="v00002",
                 arm="canary") == 1
    assert value(m, "tailstream_impressions_total", model_version="v00001", tier="head") == 3
    assert value(m, "tailstream_tail_exposure_target_ratio") == 0.25
    # Only the first interaction judges a list: a later one is attributed, not judged.
    att.observe([ev("cart", "u1", "a", T0 + 9)])
    assert value(m, "tailstream_judged_lists_total", model_version="v00001", outcome="hit") == 1
    assert value(m, "tailstream_attributed_total", model_version="v00001", tier="head",
                 **{"class": "cart"}) == 1
    figs = Figures()
    figs.take(counters)
    v1, v2 = figs.of("v00001"), figs.of("v00002")
    assert (v1.lists, v1.judged, v1.hits, v1.hit_rate) == (2, 2, 1, 0.5)
    assert v1.items == {"head": 3, "torso": 1, "tail": 1}
    assert v1.attributed == {"click": 1, "cart": 1}
    assert v1.attributed_tiers == {"click": {"tail": 1}, "cart": {"head": 1}}
    assert v1.positions == {"2-3": 1, "1": 1}
    assert (v2.judged, v2.hits, v2.ctr) == (1, 1, 1.0)


def test_a_purchase_after_the_click_is_credited_to_the_list_that_showed_the_item() -> None:
    att, m, counters = attribution()
    att.shown([imp("u1", ["a", "b"], tiers=["tail", "head"])])
    att.observe([ev("click", "u1", "a", T0 + 1)])
    # The click made a new list without "a" (the user just saw it) …
    att.shown([imp("u1", ["c", "d"], version="v00002", at=T0 + 2)])
    # … and the cart and purchase of "a" still count for the list (and version) that showed it.
    att.observe([ev("cart", "u1", "a", T0 + 3), ev("purchase", "u1", "a", T0 + 4)])
    figs = Figures()
    figs.take(counters)
    first = figs.of("v00001")
    assert first.attributed == {"click": 1, "cart": 1, "purchase": 1}
    assert first.tail_conversion_share == 1.0 and first.cvr == 1.0
    # The new list was judged by the cart (a miss), not credited with it.
    second = figs.of("v00002")
    assert (second.judged, second.hits, second.attributed) == (1, 0, {})


def test_events_before_the_list_or_past_the_window_are_never_attributed() -> None:
    att, m, counters = attribution(window_s=60.0)
    att.shown([imp("u1", ["a"], at=T0), imp("u2", ["a"], at=T0)])
    # Happened before the list existed (a backlog, a replayed log): not judged, not credited.
    assert att.observe([ev("click", "u1", "a", T0 - 0.5)]) == 0
    # Past the window: the list is forgotten.
    assert att.observe([ev("click", "u2", "a", T0 + 61)]) == 0
    assert "u2" not in att.lists
    # Searches and events without an item are not interactions with a list.
    assert att.observe([(Event("search", "s1", "u1", T0 + 1, query="kettle"), None)]) == 0
    assert att.observe([ev("click", "u1", "a", T0 + 1)]) == 1
    figs = Figures()
    figs.take(counters)
    assert (figs.of("v00001").judged, figs.of("v00001").hits) == (1, 1)


def test_the_lists_kept_in_memory_are_bounded() -> None:
    att, _, _ = attribution(max_users=100)
    att.shown([imp(f"u{i}", ["a"]) for i in range(1000)])
    assert len(att.lists) == 100 and "u999" in att.lists and "u0" not in att.lists


class FakeAsyncRedis:
    """``mget`` only, counting round trips."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values
        self.calls: list[list[str]] = []

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.calls.append(list(keys))
        return [self.values.get(k) for k in keys]


def test_users_this_worker_never_served_are_looked_up_in_redis_once_per_batch() -> None:
    from tailstream.streams.worker.attribution import Attribution

    keys = Keys("ts")
    fake = FakeAsyncRedis({keys.impression("moved"): imp("moved", ["a"]).to_json()})
    att = Attribution(AttributionConfig(), Metrics(), None, redis=fake, prefix="ts")
    att.shown([imp("local", ["b"])])

    async def run() -> tuple[int, int]:
        found = await att.prefetch(["moved", "new", "local", "moved"])
        again = await att.prefetch(["new", "moved"])  # both known now: no round trip
        return found, again

    found, again = asyncio.run(run())
    assert (found, again) == (1, 0)
    assert fake.calls == [[keys.impression("moved"), keys.impression("new")]]
    assert att.observe([ev("click", "moved", "a", T0 + 1)]) == 1


def test_a_rec_list_is_an_impression_and_its_record_round_trips() -> None:
    rec = RecList("u1", [{"item_id": "a", "score": 1.0, "rank": 1, "tier": "tail"},
                         {"item_id": "b", "score": 0.5, "rank": 2, "tier": "head"}],
                  "v00003", "event", T0, "e1", T0, arm="canary", policy="hybrid")
    i = rec.impression(T0 + 0.1)
    assert (i.items, i.tiers, i.arm, i.policy, i.position("b"), i.position("z")) == (
        ("a", "b"), ("tail", "head"), "canary", "hybrid", 2, 0)
    record = json.loads(i.to_json())
    assert record["items"][1] == {"item_id": "b", "position": 2, "tier": "head"}
    assert record["trigger"] == "event" and record["model_version"] == "v00003"
    assert Impression.from_json(i.to_json()) == i
    assert rec.impression(T0).list_id != i.list_id


# --------------------------------------------------------------------------- the test
def test_canary_users_are_a_sticky_hashed_share() -> None:
    users = [f"u{i}" for i in range(20_000)]
    first = {u for u in users if in_canary(u, 0.1, "v00002")}
    assert abs(len(first) / len(users) - 0.1) < 0.01
    assert first == {u for u in users if in_canary(u, 0.1, "v00002")}  # sticky
    other = {u for u in users if in_canary(u, 0.1, "v00003")}
    assert len(first & other) < 0.2 * len(first)  # each canary draws its own users
    assert {u for u in users if in_canary(u, 0.2, "v00002")} >= first  # a bigger share grows


def test_equal_arms_are_rolled_back_about_as_often_as_the_confidence_allows() -> None:
    rng = random.Random(7)
    alarms = 0
    trials = 2000
    for _ in range(trials):
        h_c = sum(rng.random() < 0.3 for _ in range(200))
        h_s = sum(rng.random() < 0.3 for _ in range(1000))
        alarms += judge_canary((h_c, 200), (h_s, 1000), confidence=0.95, min_lists=100,
                               final=True).decision == "roll_back"
    assert 0.03 < alarms / trials < 0.07


def test_the_z_statistic_is_the_pooled_two_proportion_one() -> None:
    z, p = one_sided_z(40, 100, 50, 100)
    pooled = 0.45
    assert z == pytest.approx(-0.1 / (pooled * (1 - pooled) * 0.02) ** 0.5)
    assert p == pytest.approx(0.0770, abs=1e-3)
    with pytest.raises(ValueError):
        one_sided_z(0, 0, 1, 10)


# --------------------------------------------------------------------------- the controller
class FakeSyncRedis:
    """The few Redis commands the controller and :func:`read_online` use."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.sets: dict[str, set[str]] = defaultdict(set)

    def hset(self, key: str, field: str | None = None, value: str | None = None, *,
             mapping: dict[str, str] | None = None) -> None:
        h = self.hashes.setdefault(key, {})
        if field is not None:
            h[field] = str(value)
        h.update({k: str(v) for k, v in (mapping or {}).items()})

    def hget(self, key: str, field: str) -> bytes | None:
        v = self.hashes.get(key, {}).get(field)
        return None if v is None else v.encode()

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {k.encode(): v.encode() for k, v in self.hashes.get(key, {}).items()}

    def hincrby(self, key: str, field: str, n: int) -> None:
        h = self.hashes.setdefault(key, {})
        h[field] = str(int(h.get(field, "0")) + n)

    def delete(self, key: str) -> None:
        self.hashes.pop(key, None)

    def smembers(self, key: str) -> set[bytes]:
        return {v.encode() for v in self.sets[key]}

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self)


class FakePipe:
    def __init__(self, redis: FakeSyncRedis) -> None:
        self.redis = redis
        self.calls: list[str] = []

    def hgetall(self, key: str) -> None:
        self.calls.append(key)

    def execute(self) -> list[dict[bytes, bytes]]:
        return [self.redis.hgetall(k) for k in self.calls]


PREFIX = "ts"


def serve(redis: FakeSyncRedis, version: str, hits: int, judged: int, lists: int = 0) -> None:
    """What the workers' counters add for ``version`` (judged lists and hits)."""
    keys = Keys(PREFIX)
    redis.sets[keys.online_versions].add(version)
    for field, n in (("judged", judged), ("hits", hits), ("lists", lists or judged)):
        redis.hincrby(keys.online(version), field, n)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def controller(tmp_path: Path, **overrides: Any
               ) -> tuple[CanaryController, ModelStore, FakeSyncRedis, list[dict[str, Any]],
                          Clock, TrainerMetrics]:
    s = Settings().replace(data_dir=tmp_path, redis_prefix=PREFIX, canary_share=0.1,
                           canary_window_s=60.0, canary_min_lists=100, **overrides)
    store = ModelStore(s.model_store_dir)
    tensors = {"w": torch.zeros(2)}
    store.promote(store.save(tensors, {"parent": "base"}), "test: serving")  # v00001
    store.save(tensors, {"parent": "v00001"})  # v00002, the candidate
    updates: list[dict[str, Any]] = []
    redis, clock, metrics = FakeSyncRedis(), Clock(), TrainerMetrics()
    return (CanaryController(s, store, metrics, redis, updates.append, clock=clock), store,
            redis, updates, clock, metrics)


def canary_count(metrics: TrainerMetrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("tailstream_canaries_total",
                                             {"outcome": outcome}) or 0.0


def test_a_worse_candidate_is_rolled_back_with_the_reason_and_the_serving_version_stays(
        tmp_path: Path) -> None:
    ctl, store, redis, updates, clock, metrics = controller(tmp_path)
    serve(redis, "v00001", hits=5_000, judged=10_000)  # before the canary: not counted
    ctl.start("v00002", "v00001", "gate: improved")
    assert updates[-1]["action"] == "canary" and updates[-1]["share"] == 0.1
    assert store.manifest("v00002")["status"] == "canary" and store.current() == "v00001"
    assert redis.hget(Keys(PREFIX).canary, "version") == b"v00002"
    serve(redis, "v00002", hits=30, judged=200)
    serve(redis, "v00001", hits=600, judged=2000)
    clock.now += 30
    assert ctl.tick() is None and ctl.active is not None  # the window is not over
    assert store.current() == "v00001"
    clock.now += 31
    verdict = ctl.tick()
    assert verdict is not None and verdict.decision == "roll_back" and verdict.code == "worse"
    assert store.current() == "v00001"  # the serving version never changed
    manifest = store.manifest("v00002")
    assert manifest["status"] == "rolled_back"
    assert manifest["reason"].startswith("canary rolled back: worse online: hit rate 0.150")
    assert manifest["canary"]["verdict"]["serving_lists"] == 2000  # the window's only
    assert updates[-1]["action"] == "canary_rollback" and updates[-1]["version"] == "v00002"
    assert Keys(PREFIX).canary not in redis.hashes and ctl.active is None
    assert canary_count(metrics, "rolled_back") == 1 and canary_count(metrics, "promoted") == 0
    lines = (store.root / "canaries.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["verdict"]["decision"] == "roll_back"


def test_a_candidate_not_worse_is_promoted_when_its_window_ends(tmp_path: Path) -> None:
    ctl, store, redis, updates, clock, metrics = controller(tmp_path)
    promoted: list[str] = []
    ctl.after_promotion = promoted.append
    ctl.start("v00002", "v00001", "gate: improved", {"requested_at": T0 - 50.0})
    serve(redis, "v00002", hits=70, judged=200)
    serve(redis, "v00001", hits=600, judged=2000)
    clock.now += 61
    verdict = ctl.tick()
    assert verdict is not None and verdict.decision == "promote"
    assert store.current() == "v00002" and promoted == ["v00002"]
    assert store.manifest("v00002")["status"] == "promoted"
    assert "canary: not worse online" in store.manifest("v00002")["reason"]
    last = updates[-1]
    assert last["action"] == "promote" and last["version"] == "v00002"
    assert last["requested_at"] == T0 - 50.0  # the model-update latency's stages
    assert canary_count(metrics, "promoted") == 1


def test_too_few_judged_lists_wait_then_roll_back(tmp_path: Path) -> None:
    ctl, store, redis, updates, clock, _ = controller(tmp_path)
    ctl.start("v00002", "v00001", "gate: improved")
    serve(redis, "v00002", hits=20, judged=40)
    serve(redis, "v00001", hits=600, judged=2000)
    clock.now += 61
    assert ctl.tick() is None and ctl.active is not None  # waits for judged lists
    clock.now += 120  # three windows in all
    verdict = ctl.tick()
    assert verdict is not None and verdict.code == "too_few_lists"
    assert store.current() == "v00001"
    assert "too few judged lists online: the candidate has 40 < 100" in \
        store.manifest("v00002")["reason"]


def test_a_restarted_trainer_carries_on_with_the_canary(tmp_path: Path) -> None:
    ctl, store, redis, updates, clock, _ = controller(tmp_path)
    ctl.start("v00002", "v00001", "gate: improved")
    again = CanaryController(Settings().replace(data_dir=tmp_path, redis_prefix=PREFIX,
                                                canary_min_lists=100),
                             store, TrainerMetrics(), redis, updates.append, clock=clock)
    restored = again.restore()
    assert restored is not None and restored.version == "v00002"
    assert ctl.active is not None and restored.ends_at == ctl.active.ends_at


def test_online_gauges_by_role(tmp_path: Path) -> None:
    ctl, store, redis, _, clock, metrics = controller(tmp_path)
    serve(redis, "base-53aa5117", hits=10, judged=100)
    serve(redis, "v00001", hits=30, judged=100)
    store.promote("v00002", "test")
    serve(redis, "v00002", hits=20, judged=50)
    figures = ctl.publish_gauges()
    assert set(figures) == {"serving", "previous"}
    get = metrics.registry.get_sample_value
    assert get("tailstream_online_hit_rate_ratio", {"role": "serving"}) == 0.4
    assert get("tailstream_online_hit_rate_ratio", {"role": "previous"}) == 0.3
    assert get("tailstream_online_judged_lists", {"role": "serving"}) == 50
    # The base's lists are labelled base-<fingerprint>; "base" finds them.
    assert read_online(redis, PREFIX, ["base"])["base-53aa5117"].hits == 10


# --------------------------------------------------------------------------- the trainer
def canary_trainer(tiny_encoder: Path, tmp_path: Path, shop_samples: Any, **overrides: Any
                   ) -> tuple[Any, ModelStore, list[dict[str, Any]], TrainerMetrics, Any,
                              FakeSyncRedis, Clock, Settings]:
    """A trainer on a tiny encoder whose gate passes any candidate to a canary."""
    from tailstream.configs import policy
    from tailstream.streams.trainer.sources import InMemorySource
    from tailstream.streams.trainer.trainer import Trainer

    s = Settings().replace(
        encoder_path=str(tiny_encoder), data_dir=tmp_path, embed_dim=32, text_max_len=32,
        finetune_max_steps=40, finetune_batch_size=128, finetune_lr=3e-3,
        finetune_min_samples=50, selection_challengers=0, gate_quality_tolerance=1.0,
        gate_recall_tolerance=1.0, redis_prefix=PREFIX, canary_min_lists=100, **overrides)
    store = ModelStore(s.model_store_dir)
    updates: list[dict[str, Any]] = []
    metrics = TrainerMetrics()
    source = InMemorySource(shop_samples(1500), policy=policy(s))
    trainer = Trainer(s, store, metrics, source, updates.append, device=torch.device("cpu"))
    redis, clock = FakeSyncRedis(), Clock()
    trainer.canary = CanaryController(s, store, metrics, redis, updates.append, clock=clock)
    return trainer, store, updates, metrics, source, redis, clock, s


def test_a_candidate_the_gate_passes_serves_a_canary_before_any_promotion(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Any) -> None:
    trainer, store, updates, metrics, source, redis, clock, s = canary_trainer(
        tiny_encoder, tmp_path, shop_samples)
    report = trainer.handle({"reason": "buffer", "requested_at": T0})
    assert report.outcome == "canary", report.reason
    assert store.current() == "base" and store.manifest("v00001")["status"] == "canary"
    # The serving version's decisions are refitted on the trigger's window first: it keeps
    # the users outside the canary (and all of them after a rollback).
    assert [u["action"] for u in updates] == ["decisions", "canary"]
    assert updates[0]["version"] == "base" and updates[0]["window_of"] == "v00001"
    assert report.decisions_refreshed == "base"
    assert metrics.registry.get_sample_value("tailstream_finetune_runs_total",
                                             {"outcome": "canary"}) == 1
    # No run while the canary is served.
    assert trainer.handle({"reason": "buffer"}).outcome == "skipped"
    assert not source.memory
    # Lists of the base model carry its fingerprint's label.
    serve(redis, "v00001", hits=60, judged=200)
    serve(redis, "base-53aa5117", hits=300, judged=1000)
    clock.now += s.canary_window_s + 1
    verdict = trainer.canary.tick()
    assert verdict is not None and verdict.decision == "promote", verdict
    assert store.current() == "v00001"
    assert [u["action"] for u in updates] == ["decisions", "canary", "promote"]
    assert source.memory  # the promoted run's samples kept for replay


def test_a_canary_rolled_back_leaves_the_serving_version_deciding_at_its_window(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Any) -> None:
    """A candidate the gate passes and the canary rolls back: the base model that goes on
    serving decides with the layer refitted at that trigger, not with its argmax — and so
    does a worker that starts later; switched off, nothing is refitted."""
    from tailstream.configs import tower_config
    from tailstream.models.towers.loading import load_served

    trainer, store, updates, _, _, redis, clock, s = canary_trainer(
        tiny_encoder, tmp_path, shop_samples)
    assert trainer.handle({"reason": "buffer"}).outcome == "canary"
    serve(redis, "v00001", hits=20, judged=200)
    serve(redis, "base-53aa5117", hits=500, judged=1000)
    clock.now += s.canary_window_s + 1
    verdict = trainer.canary.tick()
    assert verdict is not None and verdict.decision == "roll_back", verdict
    assert [u["action"] for u in updates] == ["decisions", "canary", "canary_rollback"]
    assert store.current() == "base"
    layer = updates[0]["decisions"]
    assert layer["fitted_on"] > 0
    served = load_served(store, "base", tiny_encoder, tower_config(s), torch.device("cpu"))
    assert served.manifest["decisions"] == layer

    off_trainer, _, off_updates, *_ = canary_trainer(
        tiny_encoder, tmp_path / "off", shop_samples, decision_refresh=False)
    report = off_trainer.handle({"reason": "buffer"})
    assert report.outcome == "canary" and report.decisions_refreshed is None
    assert [u["action"] for u in off_updates] == ["canary"]


# --------------------------------------------------------------------------- the worker
def test_the_scoring_service_serves_a_canary_beside_the_serving_version(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Any) -> None:
    from tailstream.configs import tower_config
    from tailstream.models.towers.context import UserRequest
    from tailstream.models.towers.loading import checkpoint_tensors, load_served
    from tailstream.streams.worker.scoring import CANARY, SERVING, ScoringService

    s = Settings().replace(data_dir=tmp_path, encoder_path=str(tiny_encoder), embed_dim=32,
                           text_max_len=32, text_vectors_shared=False, recs_k=5,
                           device="cpu")
    store = ModelStore(s.model_store_dir)
    base = load_served(store, "base", tiny_encoder, tower_config(s), torch.device("cpu"))
    tensors, _ = checkpoint_tensors(base.model)
    tensors = {k: (v.flip(0) if k.startswith("item_proj") else v) for k, v in tensors.items()}
    store.save(tensors, {"tower": tower_config(s).to_dict(), "encoder": {
        "base_fingerprint": base.text_fingerprint, "included": False}})  # v00001
    metrics = Metrics()
    service = ScoringService(s, metrics)
    texts = {x.item_id: x.item_text for x in shop_samples(300)}

    def item_info(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
        return (["tail"] * len(ids), [None] * len(ids), [0.0] * len(ids))

    def item_texts(ids: Any) -> list[str]:
        return [texts[i] for i in ids]

    async def run() -> dict[str, Any]:
        await service.start()
        for item, text in texts.items():
            service.queue_item(item, text)
        while await service.embed_pending(64):
            pass
        serving = service.scorer
        assert serving is not None
        assert await service.start_canary("v00001", 0.5, item_texts)
        canary = service.canary
        assert canary is not None
        out: dict[str, Any] = {"shares_encoder": canary.served.model.encoder is
                               serving.served.model.encoder,
                               "shares_texts": canary.texts is serving.texts,
                               "indexed": len(canary.index)}
        service.queue_item("late", "a late item | home/late")
        await service.embed_pending(64)
        out["late"] = canary.index.row("late") is not None
        arms = [service.arm(f"u{i}") for i in range(400)]
        out["canary_share"] = arms.count(CANARY) / len(arms)
        request = UserRequest("u1", [], set())
        out["lists"] = [await service.recommend([request], item_info, scorer=x)
                        for x in (serving, canary)]
        out["promoted"] = await service.swap_to("v00001", item_texts)
        out["in_place"] = service.scorer is canary and service.canary is None
        out["arm_after"] = {service.arm(f"u{i}") for i in range(50)}
        return out

    try:
        out = asyncio.run(run())
    finally:
        service.close()
    assert out["shares_encoder"] and out["shares_texts"] and out["indexed"] == len(texts)
    assert out["late"]  # items that arrive during a canary reach its index too
    assert 0.4 < out["canary_share"] < 0.6
    assert [len(lst[0]) for lst in out["lists"]] == [5, 5]
    assert out["promoted"] and out["in_place"] and out["arm_after"] == {SERVING}
    assert metrics.registry.get_sample_value("tailstream_serving_model_version_number") == 1
    assert metrics.registry.get_sample_value("tailstream_canary_share_ratio") == 0


class StubScorer:
    def __init__(self, version: str) -> None:
        self.version = version


class StubScoring:
    """The few ScoringService members the refresher uses; the canary takes users u0-u4."""

    def __init__(self) -> None:
        self.ready = True
        self.serving, self.canary = StubScorer("v00001"), StubScorer("v00002")
        self.calls: list[tuple[str, list[str]]] = []
        self.inline: list[bool] = []

    def arm(self, user: str) -> str:
        return "canary" if user in {f"u{i}" for i in range(5)} else "serving"

    def scorer_for(self, arm: str) -> StubScorer:
        return self.canary if arm == "canary" else self.serving

    async def recommend(self, requests: list[Any], item_info: Any, *, scorer: StubScorer,
                        features: Any = None, inline: bool = False) -> list[list[Any]]:
        from tailstream.models.serving.scorer import Ranked

        self.calls.append((scorer.version, [r.user_id for r in requests]))
        self.inline.append(inline)
        return [[Ranked(f"{scorer.version}-i", 1.0, "tail", "", None, 0.0, 0.0)]
                for _ in requests]


def test_canary_users_get_the_candidates_lists_in_a_call_of_their_own() -> None:
    from tailstream.streams.worker.refresh import Refresher
    from tailstream.streams.worker.state import StreamState

    from .test_pipeline import FakeListSink

    s = Settings().replace(refresh_rate=1e6)
    profiles: dict[str, Any] = {}
    sink = FakeListSink()
    scoring = StubScoring()
    refresher = Refresher(s, StreamState(s, profiles), profiles, sink, Metrics(),
                          scoring)  # type: ignore[arg-type]
    users = [f"u{i}" for i in range(10)]

    async def run() -> None:
        await refresher.enqueue({u: (f"e-{u}", T0) for u in users})
        await refresher.drain()

    asyncio.run(run())
    assert sorted(scoring.calls) == [("v00001", users[5:]), ("v00002", users[:5])]
    by_user = {rec.user_id: rec for rec in sink.published}
    assert {(by_user[u].model_version, by_user[u].arm) for u in users[:5]} == {
        ("v00002", "canary")}
    assert {(by_user[u].model_version, by_user[u].arm) for u in users[5:]} == {
        ("v00001", "serving")}
    assert {rec.policy for rec in sink.published} == {"towers"}
    assert by_user["u0"].items[0]["item_id"] == "v00002-i"


@pytest.mark.parametrize("enabled", [True, False])
def test_a_turn_the_budget_fits_runs_on_the_event_loop_and_a_catch_up_turn_on_the_thread(
        enabled: bool) -> None:
    from tailstream.streams.worker.refresh import Refresher
    from tailstream.streams.worker.state import StreamState

    from .test_pipeline import FakeListSink

    s = Settings().replace(latency_budget_ms=250.0, scoring_batch=256, scoring_inline=enabled)
    profiles: dict[str, Any] = {}
    scoring = StubScoring()
    scoring.arm = lambda user: "serving"  # type: ignore[method-assign]
    refresher = Refresher(s, StreamState(s, profiles), profiles, FakeListSink(), Metrics(),
                          scoring)  # type: ignore[arg-type]
    for n in (10, 50, 100):  # 20 ms + 2 ms per user: 30 % of 250 ms fits 27 users
        refresher.sizer.observe(n, 0.02 + 0.002 * n)

    async def run() -> list[int]:
        refresher._task = asyncio.get_running_loop().create_future()  # no scoring task
        await refresher.enqueue({f"u{n}": (f"e{n}", T0) for n in range(100)})
        sizes = [await refresher.score_next()]
        for user in refresher.queued_at:  # the rest have waited past the budget
            refresher.queued_at[user] -= 1.0
        sizes.append(await refresher.score_next())
        await refresher.refresh_users(["u0", "u1"], "promotion")
        return sizes

    sizes = asyncio.run(run())
    assert sizes[0] == 27 and sizes[1] > 27
    assert scoring.inline == [enabled, False, False]  # a bulk refresh: on the thread


def test_an_inline_turn_runs_on_the_calling_thread_and_is_counted(tmp_path: Path) -> None:
    import threading

    from tailstream.streams.worker.scoring import ScoringService

    metrics = Metrics()
    service = ScoringService(Settings().replace(data_dir=tmp_path), metrics)

    async def run() -> tuple[int, int, int]:
        here = threading.get_ident()
        inline = await service._turn(True, threading.get_ident)
        threaded = await service._turn(False, threading.get_ident)
        return here, inline, threaded

    try:
        here, inline, threaded = asyncio.run(run())
    finally:
        service.close()
    assert inline == here and threaded != here
    for where in ("loop", "thread"):
        assert metrics.registry.get_sample_value("tailstream_scoring_turns_total",
                                                 {"where": where}) == 1


# --------------------------------------------------------------------------- the shop
def test_the_synthetic_shop_takes_more_from_lists_that_appeal_more() -> None:
    import itertools

    from tailstream.producers.synthetic import ShopSimulator

    def shop(lists: Any, uptake: float = 0.5) -> ShopSimulator:
        return ShopSimulator(n_users=200, n_items=1000, seed=5, clock=lambda: T0,
                             uptake=uptake, lists=lists)

    probe = shop(None)

    def good(user: str) -> list[str]:  # the user's categories, the most liked items first
        u = int(user[1:])
        mine = [i for c in probe._users[u] for i in probe._by_cat[c]]
        return [probe.items[i].item_id
                for i in sorted(mine, key=lambda i: -probe.appeal(u, i))[:20]]

    def bad(user: str) -> list[str]:  # someone else's categories
        u = int(user[1:])
        other = [i for i in range(1000) if probe.items[i].category not in probe._users[u]]
        return [probe.items[i].item_id for i in other[:20]]

    takes = {}
    for name, lists in (("good", good), ("bad", bad)):
        sim = shop(lists)
        records = list(itertools.islice(sim.events(), 20_000))
        rec = [r for r in records if r.kind == "click" and json.loads(r.value)["source"] == "rec"]
        assert len(rec) == sim.taken
        takes[name] = sim.taken
    assert takes["good"] > 3 * takes["bad"] > 0
    # Without a list reader the stream is the shop's usual one, byte for byte.
    plain = list(itertools.islice(ShopSimulator(n_users=200, n_items=1000, seed=5,
                                                clock=lambda: T0).events(), 2000))
    assert plain == list(itertools.islice(shop(None).events(), 2000))


# --------------------------------------------------------------------------- the demo
def test_the_demo_shop_waits_for_the_canary_of_the_run_going_at_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tailstream.stack import demo

    trainer: dict[str, float] = {}
    monkeypatch.setattr(demo, "_scrape_or_empty", lambda url: dict(trainer))
    monkeypatch.setattr(demo, "trainer_metrics_url", lambda ts: "")

    def state(runs: float, running: float, canary: float, started: float,
              rejected: float = 0.0) -> None:
        trainer.clear()
        trainer.update({"tailstream_finetune_runs_total": runs,
                        "tailstream_finetune_runs_total{outcome=rejected}": rejected,
                        "tailstream_finetune_running": running,
                        "tailstream_canary_running": 1.0 if canary else 0.0,
                        "tailstream_canary_model_version_number": canary,
                        "tailstream_canaries_total{outcome=started}": started})

    ts = Settings().replace(finetune_max_seconds=120.0, canary_window_s=20.0)
    clock = demo.ShopClock(60.0, ts)
    state(0, 1, 0, 0)
    assert not clock.up(30.0)  # before the time
    assert not clock.up(61.0)  # a run is going at the end: wait for it
    state(1, 0, 1, 1)
    assert not clock.up(80.0)  # it started a canary: wait for its decision
    state(2, 1, 0, 1)
    assert clock.up(100.0)  # decided; the next run is not waited for
    idle = demo.ShopClock(60.0, ts)
    state(3, 0, 0, 1)
    assert idle.up(60.0)  # nothing going on at the end
    # A run trains the current policy and one challenger (the default), each up to
    # finetune_max_seconds: its allowance is two of them.
    assert demo.run_allowance(ts) == 240.0
    late = demo.ShopClock(60.0, ts)
    state(3, 1, 0, 1)
    assert not late.up(61.0)
    assert not late.up(60.0 + 120.0 + 30.0 + 60.0)  # one policy's time is not enough
    assert late.up(60.0 + 240.0 + 30.0 + 60.0)  # bounded
    rejected = demo.ShopClock(60.0, ts)
    state(3, 1, 0, 1, rejected=1)
    assert not rejected.up(61.0)  # a run is going at the end …
    state(4, 1, 0, 1, rejected=2)
    assert not rejected.up(90.0)  # … the gate rejected it, the queued one runs: wait
    assert not rejected.up(60.0 + 240.0 + 30.0 + 60.0 + 1.0)  # its own allowance …
    assert rejected.up(60.0 + 480.0 + 30.0 + 60.0)  # … bounded too
    single = demo.ShopClock(60.0, ts.replace(selection_challengers=0))
    state(3, 1, 0, 1)
    assert not single.up(61.0)
    assert single.up(60.0 + 120.0 + 30.0 + 60.0)  # without selection: one policy's
    rejected = demo.ShopClock(60.0, ts)
    state(3, 1, 0, 1, rejected=1)
    assert not rejected.up(61.0)
    state(4, 1, 0, 1, rejected=2)
    assert not rejected.up(90.0)
    state(5, 0, 5, 2, rejected=2)
    assert not rejected.up(120.0)  # that one started a canary: wait for its decision
    state(5, 0, 0, 2, rejected=2)
    assert rejected.up(140.0)  # decided
    promoted = demo.ShopClock(60.0, ts)  # no canaries (TAILSTREAM_CANARY_SHARE=0)
    state(3, 1, 0, 1, rejected=1)
    assert not promoted.up(61.0)
    state(4, 1, 0, 1, rejected=1)
    assert promoted.up(90.0)  # the run of then was promoted: the next is not waited for
    assert demo.ShopClock(60.0, None).up(60.0)  # no trainer


def test_the_demo_counts_canaries_from_the_decisions_it_lists(tmp_path: Path) -> None:
    """A canary decided while the trainer shut down is in the decisions file but not in
    the counters scraped before: the summary's counts must still add up to its list."""
    from tailstream.stack.demo import canary_summary

    ws = Settings().replace(data_dir=tmp_path)
    root = ModelStore(ws.model_store_dir).root
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"version": "v00002", "serving": "base", "verdict": {"decision": "promote"}},
            {"version": "v00003", "serving": "v00002", "verdict": {"decision": "roll_back"}}]
    (root / "canaries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = canary_summary(None, ws)
    assert (out["started"], out["promoted"], out["rolled_back"]) == (2, 1, 1)
    assert [d["version"] for d in out["decisions"]] == ["v00002", "v00003"]


def test_the_demo_summary_names_the_served_decision_layer_and_prior(tmp_path: Path) -> None:
    import torch

    from tailstream.stack.demo import model_summary

    ws = Settings().replace(data_dir=tmp_path)
    store = ModelStore(ws.model_store_dir)
    layer = {"rule": "balanced", "objective": "g_mean", "fitted_on": 812,
             "offsets": [0.0, 2.9, 3.5, 3.9], "coef": [[0.0]]}
    version = store.save({"w": torch.zeros(1)}, {"decisions": layer})
    store.promote(version, "better")
    (store.root / "runs.jsonl").write_text(json.dumps(
        {"version": version, "outcome": "promoted", "policy": "inverse"}) + "\n")
    out = model_summary(ws, {"tailstream_decision_prior_ratio{event_class=purchase}": 0.03})
    assert out["served_policy"] == "inverse" and out["promotions"] == 1
    assert out["served_decisions"] == {**{k: layer[k] for k in
                                          ("rule", "objective", "fitted_on", "offsets")},
                                       "refreshed": False}
    assert out["decision_prior"] == {"purchase": 0.03}
    # A rejected trigger refitted the served version's layer: the summary shows that one.
    store.save_decisions(version, {**layer, "fitted_on": 240})
    again = model_summary(ws, {})["served_decisions"]
    assert again["fitted_on"] == 240 and again["refreshed"] is True
    empty = Settings().replace(data_dir=tmp_path / "empty")
    base = model_summary(empty, {})
    assert base["served_decisions"] is None and base["served_policy"] == "base (untrained)"
    ModelStore(empty.model_store_dir).save_decisions("base", layer)  # the base refreshed
    assert model_summary(empty, {})["served_decisions"]["refreshed"] is True


def test_the_demo_compares_events_per_s_only_while_the_shop_sends() -> None:
    """During and outside fine-tunes are both rates of an open shop: the drain after it
    closes (no events to read) and the settling fine-tunes count in neither."""
    from tailstream.stack.demo import LiveView

    view = LiveView(Settings(), None, None, None, None, ui=False,  # type: ignore[arg-type]
                    source="test")
    samples = [  # elapsed s, events consumed, a fine-tune running, the shop open
        (0.0, 0, False, True), (1.0, 300, False, True), (2.0, 600, True, True),
        (3.0, 880, True, True), (4.0, 900, False, False), (9.0, 900, False, False),
        (10.0, 900, True, False)]
    rates = [view.note_rate(t, n, running, shop) for t, n, running, shop in samples]
    assert rates == [0.0, 300.0, 300.0, 280.0, 20.0, 0.0, 0.0]
    during, outside = view.rates()
    assert during == pytest.approx(290.0) and outside == pytest.approx(300.0)
