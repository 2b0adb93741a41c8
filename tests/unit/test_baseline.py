from __future__ import annotations

import random
from typing import Any

from tailstream.contract import Event
from tailstream.models.serving.baseline import (
    QueryIndex,
    Recommendation,
    new_profile,
    ranked_by_affinity,
    recommend,
    tokens,
    update_profile,
    with_tail_share,
)
from tailstream.models.serving.popularity import PopularityTracker


def _shop() -> PopularityTracker:
    p = PopularityTracker(half_life_s=1e9, head_share=0.5, torso_share=0.3, per_category=50)
    for cat in ("shoes", "hats"):
        for i in range(30):
            item = f"{cat}-{i}"
            p.set_category(item, cat)
            for _ in range(max(0, 30 - i) ** 2 // 30):  # skewed: low ids are popular
                p.observe(item, cat, 1.0, ts=0.0)
    p.refresh(now=0.0)
    return p


def test_profile_accumulates_and_decays() -> None:
    p = new_profile()
    p = update_profile(p, Event("click", "1", "u", 0.0, item_id="shoes-1"), "shoes", [],
                       half_life_s=100.0)
    p = update_profile(p, Event("purchase", "2", "u", 100.0, item_id="hats-1"), "hats", [],
                       half_life_s=100.0)
    assert p["cats"] == {"shoes": 0.5, "hats": 4.0}
    assert p["items"] == ["hats-1", "shoes-1"]


def test_profile_is_bounded_and_input_untouched() -> None:
    p = new_profile()
    for n in range(100):
        q = update_profile(p, Event("click", str(n), "u", float(n), item_id=f"i{n}"),
                           f"c{n}", [], keep=5)
        assert p is not q
        p = q
    assert len(p["items"]) == 5 and len(p["cats"]) <= 5


def test_recommend_follows_interest_and_keeps_a_tail_share() -> None:
    pop = _shop()
    p = update_profile(new_profile(), Event("click", "1", "u", 0.0, item_id="shoes-0"),
                       "shoes", [])
    recs = recommend(p, pop, k=10, tail_share=0.3)
    assert len(recs) == 10
    assert all(r.category == "shoes" for r in recs)
    assert sum(r.tier == "tail" for r in recs) >= 3
    assert "shoes-0" not in {r.item_id for r in recs}  # not echoing what was just seen
    assert recs[0].reason.startswith("similar to item shoes-0")


def test_cold_user_gets_trending_items() -> None:
    recs = recommend(new_profile(), _shop(), k=5, tail_share=0.2)
    assert len(recs) == 5 and all(r.reason.startswith("trending") for r in recs)


def test_search_reads_intent_from_the_query() -> None:
    index = QueryIndex()
    index.add("Red running shoe", "shoes")
    index.add("Wool winter hat", "hats")
    assert index.categories("runing shoes")[0] == "shoes"  # typo tolerated by prefix
    p = update_profile(new_profile(), Event("search", "1", "u", 0.0, query="wool hat"), None,
                       index.categories("wool hat"))
    recs = recommend(p, _shop(), k=10, tail_share=0.3)
    assert all(r.category == "hats" for r in recs)
    assert recs[0].reason == "matches your search 'wool hat'"


def test_an_unknown_query_token_reads_the_first_known_token_with_its_prefix() -> None:
    """The prefix look-up answers what a scan of every known token, in the order they
    were first seen, would: the first token sharing the unknown one's 4 characters."""
    import random
    from collections import Counter

    def scanned(index: QueryIndex, query: str) -> list[str]:
        scores: Counter[str] = Counter()
        for tok in tokens(query):
            hits = index._cats.get(tok)
            if hits is None and len(tok) >= 4:
                hits = next((c for known, c in index._cats.items()
                             if known.startswith(tok[:4])), None)
            for cat, c in (hits or {}).items():
                scores[cat] += round(1000 * c / sum(hits.values()))  # type: ignore[union-attr]
        return [c for c, _ in scores.most_common(3)]

    rng = random.Random(3)
    words = ["".join(rng.choice("abcdef") for _ in range(rng.randrange(3, 8)))
             for _ in range(400)]
    index = QueryIndex()
    for n in range(600):
        index.add(" ".join(rng.sample(words, 3)), f"cat{n % 17}")
    queries = [" ".join(w if rng.random() < 0.5 else w[:-1] + "z" for w in rng.sample(words, 2))
               for _ in range(500)]
    assert [index.categories(q) for q in queries] == [scanned(index, q) for q in queries]
    assert sum(1 for q in queries if index.categories(q)) > 400  # typos found their words


def test_tail_quota_never_exceeded_when_tail_is_worse() -> None:
    ranked = [Recommendation(str(i), 1 - i / 100, "head" if i < 50 else "tail", "", None)
              for i in range(100)]
    out = with_tail_share(ranked, 10, 0.2)
    assert [r.item_id for r in out][:8] == [str(i) for i in range(8)]
    assert sum(r.tier == "tail" for r in out) == 2


def _random_profile(rng: random.Random, cats: list[str], items: int) -> dict[str, Any]:
    """Some of ``cats`` with affinities that often tie, and six recent items."""
    return {"cats": {c: rng.choice([1.0, 2.0, rng.random()])
                     for c in rng.sample(cats, rng.randint(0, len(cats)))},
            "items": [f"i{rng.randrange(items)}" for _ in range(6)]}


def _whole_ranking(profile: dict[str, Any], p: PopularityTracker, k: int) -> list[str]:
    """The baseline list without a tail quota: every candidate scored, then the best k."""
    return [r.item_id for r in recommend(profile, p, k=k, tail_share=0.0)]


def test_the_category_source_ranks_as_the_baseline_list_without_a_quota() -> None:
    """``ranked_by_affinity`` (the hybrid lists' category source) is ``recommend``'s
    ranking with ``tail_share=0``, ids only: users with no, one or many categories
    (ties in score included), cold users filled from what is trending overall, items
    without a category, the user's last five items left out."""
    rng = random.Random(0)
    checked = filled = 0
    for _ in range(40):
        p = PopularityTracker(half_life_s=1e9, per_category=rng.choice([5, 50]))
        cats = ["", "shoes", "hats", "bags", "toys", "pens", "cups"][:rng.randint(2, 7)]
        for n in range(rng.randint(0, 300)):
            cat = rng.choice(cats) if rng.random() < 0.9 else None
            p.observe(f"i{n}", cat, rng.choice([0.5, 1.0, 1.0, 2.0]), ts=0.0)
        p.refresh(now=0.0)
        for _ in range(5):
            profile = _random_profile(rng, cats, 301)
            for k in (3, 20, 100):
                want = _whole_ranking(profile, p, k)
                assert ranked_by_affinity(profile, p, k) == want
                checked += 1
                filled += len(want) < k or not profile["cats"]
    assert checked == 600 and filled > 0


def test_the_category_source_reads_only_the_best_and_misses_none() -> None:
    """The category source stops reading a category once it holds ``k`` of its items
    (by descending count): the same ids as the whole ranking, also when counts, categories
    and deletions changed since the last refresh (the refresh's order is then not the
    counts' order) and when many scores tie."""
    rng = random.Random(3)
    pruned = 0
    for _ in range(30):
        p = PopularityTracker(half_life_s=1e9, per_category=rng.choice([5, 40]))
        cats = ["shoes", "hats", "bags", "toys", "pens", "cups", "mugs"][:rng.randint(1, 7)]
        for n in range(rng.randint(0, 400)):
            p.observe(f"i{n % 150}", rng.choice(cats), rng.choice([1.0, 1.0, 2.0]), ts=0.0)
        p.refresh(now=0.0)
        for _ in range(30):
            item = f"i{rng.randrange(160)}"
            op = rng.random()
            if op < 0.7:
                p.observe(item, rng.choice(cats), rng.choice([1.0, 3.0]), ts=0.0)
            elif op < 0.85:
                p.set_category(item, rng.choice(cats))
            elif op < 0.95:
                p.forget(item)
            else:
                p.refresh(now=0.0)
            profile = _random_profile(rng, cats, 160)
            for k in (1, 3, 10):
                assert ranked_by_affinity(profile, p, k) == _whole_ranking(profile, p, k)
                pruned += any(len(p.ranked_in(c, 2 * k)[0]) > k + 5 for c in profile["cats"])
    assert pruned > 100  # categories longer than what the source needed to read
