"""The synthetic shop: funnel shares, long tail, drift, determinism, malformed injection."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from tailstream.contract import (
    InvalidEvent,
    Limits,
    Rejection,
    decode_payload,
    encode,
    validate_event,
    validate_item,
)
from tailstream.producers.records import ProducedRecord
from tailstream.producers.synthetic import ShopSimulator

NOW = 1.7e9


def take(sim: ShopSimulator, n: int) -> list[ProducedRecord]:
    return list(itertools.islice(sim.events(), n))


@pytest.fixture(scope="module")
def stream() -> list[ProducedRecord]:
    return take(ShopSimulator(seed=3, clock=lambda: NOW, drift_every=0), 60_000)


def test_funnel_shares_are_shop_like(stream: list[ProducedRecord]) -> None:
    kinds = Counter(r.kind for r in stream)
    total = sum(kinds.values())
    share = {k: v / total for k, v in kinds.items()}
    assert 0.80 <= share["click"] <= 0.92
    assert 0.03 <= share["cart"] <= 0.07
    assert 0.01 <= share["fav"] <= 0.04
    assert 0.008 <= share["purchase"] <= 0.03
    assert 0.03 <= share["search"] <= 0.10
    assert share["click"] > share["cart"] > share["purchase"]


def test_item_popularity_has_a_long_tail(stream: list[ProducedRecord]) -> None:
    clicks = Counter(json.loads(r.value)["item_id"] for r in stream if r.kind == "click")
    n_items = 5000
    top = sum(c for _, c in clicks.most_common(n_items // 10))
    assert top / sum(clicks.values()) > 0.4  # top 10 % of items take most interactions
    rare = sum(1 for c in clicks.values() if c <= 3) + (n_items - len(clicks))
    assert rare / n_items > 0.3  # and many items are barely seen


def test_events_are_valid_and_carry_their_fields(stream: list[ProducedRecord]) -> None:
    limits = Limits()
    for rec in stream[:5000]:
        values = decode_payload(rec.value, limits)
        assert not isinstance(values, Rejection)
        event = validate_event(rec.kind, values[0], limits, now=NOW)
        assert event.user_id == rec.key
        if rec.kind == "search":
            assert event.query
        else:
            assert event.item_id and event.category
        if rec.kind == "purchase":
            assert event.price is not None and event.quantity is not None


def test_same_seed_same_stream_and_other_seed_differs() -> None:
    a = take(ShopSimulator(seed=7, clock=lambda: NOW), 2000)
    b = take(ShopSimulator(seed=7, clock=lambda: NOW), 2000)
    c = take(ShopSimulator(seed=8, clock=lambda: NOW), 2000)
    assert a == b and a != c
    assert len({json.loads(r.value)["event_id"] for r in a}) == len(a)


def test_malformed_records_are_all_rejected_and_valid_ones_accepted() -> None:
    sim = ShopSimulator(seed=1, malformed_every=50, clock=lambda: NOW)
    recs = take(sim, 5000)
    assert [n for n, r in enumerate(recs, 1) if r.malformed] == list(range(50, 5001, 50))
    reasons = Counter()
    for rec in recs:
        values = decode_payload(rec.value, Limits())
        if isinstance(values, Rejection):
            reason = values.reason
        else:
            try:
                validate_event(rec.kind, values[0], Limits(), now=NOW)
                reason = None
            except InvalidEvent as exc:
                reason = exc.reason
        assert (reason is not None) == rec.malformed, rec
        if reason:
            reasons[reason] += 1
    assert set(reasons) == {"not_json", "missing_field", "wrong_type", "oversize",
                            "unknown_version"}


def test_drift_changes_the_best_sellers() -> None:
    def top_items(recs: list[ProducedRecord]) -> set[str]:
        c = Counter(json.loads(r.value)["item_id"] for r in recs if r.kind == "click")
        return {i for i, _ in c.most_common(20)}

    sim = ShopSimulator(seed=2, drift_every=5000, clock=lambda: NOW)
    before = top_items(take(sim, 5000))
    take(sim, 20_000)  # several rotations
    after = top_items(take(sim, 5000))
    assert len(before & after) < 10


def test_catalogue_and_new_items() -> None:
    sim = ShopSimulator(n_items=300, seed=0)
    items = [json.loads(r.value) for r in sim.catalogue()]
    assert len(items) == 300 and len({i["item_id"] for i in items}) == 300
    assert all(i["title"] and i["category"] and i["price"] > 0 for i in items)
    new = sim.new_items(3, category=items[0]["category"])
    assert [r.kind for r in new] == ["item"] * 3
    assert all(json.loads(r.value)["category"] == items[0]["category"] for r in new)


def test_bytes_are_the_contract_encoding(stream: list[ProducedRecord]) -> None:
    for rec in stream[:200]:
        assert rec.value == encode(json.loads(rec.value))
        assert rec.ts == NOW


def test_searches_lead_to_the_searched_item(stream: list[ProducedRecord]) -> None:
    searches = clicked = followed = 0
    for rec, nxt in itertools.pairwise(stream):
        if rec.kind != "search":
            continue
        searches += 1
        value = json.loads(rec.value)
        assert value["category"] and 1 <= len(value["result_item_ids"]) <= 8
        if "clicked_item_id" in value:
            clicked += 1
            assert value["clicked_item_id"] in value["result_item_ids"]
            nv = json.loads(nxt.value)
            if nxt.kind == "click" and nv["item_id"] == value["clicked_item_id"]:
                followed += 1
                assert nv["source"] == "search"
    assert searches > 1000
    assert 0.6 < clicked / searches < 0.8
    assert followed >= clicked - 5  # only an injected record could come between


def test_search_queries_come_from_titles_with_some_typos() -> None:
    sim = ShopSimulator(seed=4, clock=lambda: NOW)
    words = {w for item in sim.items for w in item.title.lower().split()}
    queries = [json.loads(r.value)["query"] for r in take(sim, 20_000) if r.kind == "search"]
    exact = sum(all(w in words for w in q.split()) for q in queries)
    assert 0.6 < exact / len(queries) < 0.95  # most are typed right, some are not


def test_catalogue_is_valid_with_many_categories_and_priced_by_category() -> None:
    sim = ShopSimulator(seed=0)
    items = [validate_item(json.loads(r.value), Limits()) for r in sim.catalogue()]
    cats = {i.category for i in items}
    assert 20 <= len(cats) <= 40
    assert all(i.title[0].isupper() and i.brand for i in items)

    def median_price(dept: str) -> float:
        prices = sorted(i.price or 0.0 for i in items if i.category.startswith(dept))
        return prices[len(prices) // 2]

    assert median_price("electronics/") > 2 * median_price("beauty/")


def test_new_items_join_the_tail_of_their_category() -> None:
    sim = ShopSimulator(n_items=200, seed=5, clock=lambda: NOW, drift_every=0)
    cat = sim.items[0].category
    new = {r.key for r in sim.new_items(2, category=cat)}
    clicks = Counter(json.loads(r.value)["item_id"] for r in take(sim, 25_000)
                     if r.kind == "click")
    assert all(0 < clicks[i] < clicks.most_common(1)[0][1] / 5 for i in new)
    with pytest.raises(ValueError, match="unknown category"):
        sim.new_items(1, category="nope/none")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ShopSimulator(malformed_every=1)
    with pytest.raises(ValueError):
        ShopSimulator(n_items=0)


def test_a_sale_about_doubles_the_purchase_share_from_its_record_on() -> None:
    from collections import Counter

    def shares(sale_at: int | None) -> tuple[float, float]:
        sim = ShopSimulator(seed=3, sale_at=sale_at, clock=lambda: 1.7e9)
        recs = list(itertools.islice(sim.events(), 40_000))

        def share(part: list) -> float:  # type: ignore[type-arg]
            c = Counter(r.kind for r in part)
            return c["purchase"] / sum(v for k, v in c.items() if k != "search")

        return share(recs[:20_000]), share(recs[20_000:])

    before, after = shares(20_000)
    plain_before, plain_after = shares(None)
    assert before == plain_before  # the same stream until the sale starts
    assert 1.6 < after / plain_after < 2.4
