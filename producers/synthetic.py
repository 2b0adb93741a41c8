"""A simulated shop: realistic enough to exercise imbalance and the long tail.

* Catalogue: items with generated titles, categories, brands and log-normal prices.
* Popularity: Zipf (exponent ``zipf_s``) over items within each category and over
  categories, so a few head items take most interactions and most items are tail.
* Users: 1-3 interest categories each; sessions of search → clicks → (cart → purchase).
* Funnel: per viewed item a fav (2.5 %) or cart (5.5 %), a third of carts bought, on
  average. As in a real shop, the odds depend on the item and the visit: trusted brands
  and prices below the category's usual are carted up to ~3× more often, some styles
  ("deluxe", "retro", …) are favourited ~3× more, and visits that start with a search
  buy 1.6× more often (``propensity``); averages are normalised so the overall funnel
  shares stay as measured below. This gives the outcome head a learnable signal in the
  item text, which uniform funnel rates would not.
  Measured with the defaults over 200 k events (seeds 0-2): among interactions
  click 91.1 %, cart 5.0 %, fav 2.2 %, purchase 1.6 % (Taobao: 89 / 5.5 / 3 / 2.2 %);
  searches come on top, 6.6 % of all records (then click 85.1 %, cart 4.7 %, fav 2.1 %,
  purchase 1.5 %). ``tests/unit/test_synthetic.py`` pins these within tolerances.
* Searches: a third of sessions start with one; the query comes from an item title, with
  typos (a dropped or swapped character); results are popular items of the category, and
  when the user clicks the searched item the first click has ``source="search"``.
* Drift: every ``drift_every`` records the popularity ranks within each category rotate by
  one, so the trending items change slowly.
* Malformed: exactly every ``malformed_every``-th record (if > 0) is deliberately broken,
  cycling through: not JSON, no ``user_id``, a string ``ts``, an oversize ``user_id``,
  ``v=99``. The decoder rejects each (``not_json``, ``missing_field``, ``wrong_type``,
  ``oversize``, ``unknown_version``).
* Cold start: :meth:`ShopSimulator.new_items` adds items at the tail of their category.
* A sale: from record ``sale_at`` on (if set), carts are bought ``sale_factor`` times as
  often (capped at certain), so the purchase share about doubles mid-stream with the
  default factor 2 — the prior shift the decisions must follow without a fine-tune.
* Reacting to lists (``uptake`` > 0 and a ``lists`` reader: the demo reads each user's
  current list from Redis): at the start of a visit the user looks at the list they were
  shown with probability ``uptake``, reads it top down (position p is examined with
  probability ``1/√p``) and takes an item with probability equal to its true
  :meth:`ShopSimulator.appeal` to them — high for their interest categories and for the
  items shoppers like (trusted brands, fair prices), low for the rest. A taken item is the
  visit's first view (``source: "rec"``) and goes down the funnel as any view. So better
  lists are taken more often, and the online attribution and the canary see it. A
  replayed log cannot do this: its events happened whatever was shown.
* Speed: ≈ 60 k events/s on one core (one ``random.Random``, cumulative weights + bisect,
  a reused JSON encoder).

Deterministic for a seed and a clock.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from tailstream.contract import Item
from tailstream.producers.records import ProducedRecord, wire_bytes

DEPARTMENTS: dict[str, list[str]] = {
    "electronics": ["earbuds", "headphones", "phone case", "charger", "smartwatch", "speaker"],
    "home": ["kettle", "mug", "blanket", "lamp", "pillow", "frying pan"],
    "fashion": ["sneakers", "t-shirt", "jeans", "jacket", "scarf", "backpack"],
    "beauty": ["lipstick", "face cream", "shampoo", "perfume", "nail polish"],
    "sports": ["yoga mat", "dumbbell", "water bottle", "running shorts", "tennis racket"],
    "toys": ["puzzle", "building blocks", "plush bear", "board game", "kite"],
}
ADJECTIVES = ["aurora", "classic", "compact", "deluxe", "eco", "nova", "pro", "retro",
              "silky", "smart", "sturdy", "ultra", "vivid", "wireless", "cozy", "matte"]
COLOURS = ["black", "white", "red", "blue", "green", "pink", "grey", "gold"]
BRANDS = ["acme", "borealis", "corvid", "dune", "elara", "fjord", "gala", "helix", "ionic",
          "juno", "kestrel", "lumen"]

# Funnel: per viewed item, the chance of going deeper.
P_FAV = 0.025
P_CART = 0.055
P_PURCHASE_GIVEN_CART = 0.33
P_SEARCH = 0.35  # sessions that start with a search
QUANTITIES = (1, 1, 1, 2, 3)
TRUSTED_BRANDS = {"acme": 2.0, "fjord": 1.8, "lumen": 1.6, "juno": 0.5, "dune": 0.4}
"""Cart propensity by brand (others 1)."""
FAV_STYLES = {"deluxe", "retro", "vivid", "aurora"}
"""Adjectives of items favourited ~3× more often."""
SEARCH_BUY_LIFT = 1.6
OFF_INTEREST_APPEAL = 0.1
"""An item outside the user's interest categories appeals this much less."""
BASE_PRICE: dict[str, float] = {"electronics": 60, "home": 25, "fashion": 40, "beauty": 18,
                                "sports": 30, "toys": 20}


class ShopSimulator:
    """An endless, deterministic stream of shop events over a generated catalogue.

    Everything random comes from one :class:`random.Random` seeded with ``seed`` and the
    event ids are ``s{seed}-{n}``, so a seed and a fixed clock give byte-identical streams
    (tests compare them exactly). Catalogue arrays and cumulative weights are built once;
    an event costs a few ``random()`` calls, a bisect and one JSON encode (≈ 60-70 k/s).
    """

    def __init__(self, n_users: int = 2000, n_items: int = 5000, seed: int = 0,
                 malformed_every: int = 0, drift_every: int = 20_000, zipf_s: float = 1.1,
                 clock: Callable[[], float] = time.time, sale_at: int | None = None,
                 sale_factor: float = 2.0, uptake: float = 0.0,
                 lists: Callable[[str], list[str] | None] | None = None) -> None:
        if n_users < 1 or n_items < 1:
            raise ValueError("the shop needs at least one user and one item")
        if malformed_every < 0 or malformed_every == 1:
            raise ValueError("malformed_every is 0 (none) or at least 2")
        self.n_users = n_users
        self.n_items = n_items
        self.seed = seed
        self.malformed_every = malformed_every
        self.drift_every = drift_every
        self.zipf_s = zipf_s
        self.clock = clock
        self.sale_at = sale_at
        self.sale_factor = sale_factor
        self.uptake = uptake
        """Chance that a visit starts by looking at the user's current list."""
        self.lists = lists
        """``user_id → the item ids of their current list`` (None: the shop ignores lists)."""
        self.taken = 0
        """Items users took from their lists so far."""
        self._rng = random.Random(seed)
        self.items: list[Item] = []
        self.categories: list[str] = [f"{d}/{c.replace(' ', '-')}"
                                      for d, cs in DEPARTMENTS.items() for c in cs]
        self._by_cat: dict[str, list[int]] = {c: [] for c in self.categories}
        self._cat_cum: dict[str, list[float]] = {}
        self._cart_odds: list[float] = []
        self._fav_odds: list[float] = []
        self._index: dict[str, int] = {}
        self._make_catalogue()
        self._users = [self._rng.sample(self.categories, self._rng.randint(1, 3))
                       for _ in range(n_users)]
        # Some users are far more active than others (but less skewed than items).
        self._user_weights = _cumulative([1.0 / (r + 1) ** 0.6 for r in range(n_users)])
        self._rank_offset = 0  # drift rotates popularity ranks within each category
        self._emitted = 0  # records so far, malformed included (drives drift and injection)
        self._counter = itertools.count()
        self._new_items = 0
        self._malformed_n = 0

    # -- catalogue ----------------------------------------------------------------
    def _make_catalogue(self) -> None:
        rng = self._rng
        # Categories are Zipf-ish too: earbuds sell more than tennis rackets.
        cat_weights = _cumulative([1.0 / (r + 1) ** 0.8 for r in range(len(self.categories))])
        for i in range(self.n_items):
            # The first items cover every category once, so none is empty.
            cat = self.categories[_draw(rng, cat_weights)] if i >= len(self.categories) \
                else self.categories[i]
            self.items.append(self._new_item(f"i{i}", cat))
            self._by_cat[cat].append(i)
            self._index[f"i{i}"] = i
        for cat in self.categories:
            self._reweigh(cat)
        self._cat_weights = cat_weights
        # Scale the propensities to mean 1 over the catalogue, so the funnel's overall
        # shares stay those of the constants above (new items reuse the same scale).
        self._cart_scale = sum(self._cart_odds) / len(self._cart_odds)
        self._fav_scale = sum(self._fav_odds) / len(self._fav_odds)

    def _reweigh(self, cat: str) -> None:
        ids = self._by_cat[cat]
        self._cat_cum[cat] = _cumulative([1.0 / (r + 1) ** self.zipf_s for r in range(len(ids))])

    def _new_item(self, item_id: str, cat: str) -> Item:
        rng = self._rng
        noun = cat.split("/")[1].replace("-", " ")
        title = f"{rng.choice(ADJECTIVES).capitalize()} {rng.choice(COLOURS)} {noun}"
        base = BASE_PRICE[cat.split("/")[0]]
        price = round(base * rng.lognormvariate(0, 0.6), 2)
        item = Item(item_id, title, cat, rng.choice(BRANDS), price)
        cart, fav = propensity(item, base)
        self._cart_odds.append(cart)
        self._fav_odds.append(fav)
        return item

    def catalogue(self) -> Iterator[ProducedRecord]:
        """One ``item`` record per catalogue item (send before the events)."""
        for item in self.items:
            yield ProducedRecord("item", item.item_id, wire_bytes(item.to_dict()))

    def new_items(self, n: int, category: str | None = None) -> list[ProducedRecord]:
        """Brand-new items (cold start), announced on the items topic.

        They join the *end* of their category's popularity ranking, so later events touch
        them only rarely: the case where content features must carry the recommender.
        """
        out = []
        touched: set[str] = set()
        for _ in range(n):
            self._new_items += 1
            cat = category or self._rng.choice(self.categories)
            if cat not in self._by_cat:
                raise ValueError(f"unknown category {cat!r}")
            item = self._new_item(f"new{self.seed}-{self._new_items}", cat)
            self._by_cat[cat].append(len(self.items))
            self._index[item.item_id] = len(self.items)
            self.items.append(item)
            touched.add(cat)
            out.append(ProducedRecord("item", item.item_id, wire_bytes(item.to_dict())))
        for cat in sorted(touched):
            self._reweigh(cat)
        return out

    # -- events -------------------------------------------------------------------
    def events(self) -> Iterator[ProducedRecord]:
        """An endless stream of sessions (never ends; slice it with ``itertools.islice``)."""
        while True:
            yield from self._session()

    def _session(self) -> list[ProducedRecord]:
        """One visit: maybe a search, then 1-8 item views, each maybe going down the funnel."""
        rng = self._rng
        out: list[ProducedRecord] = []
        u = _draw(rng, self._user_weights)
        user = f"u{u}"
        cat = rng.choice(self._users[u]) if rng.random() < 0.85 else \
            self.categories[_draw(rng, self._cat_weights)]
        target: int | None = None
        searched = False
        taken = self._from_list(u, user)
        if taken is not None:
            target, cat = taken, self.items[taken].category or cat
        elif rng.random() < P_SEARCH:
            searched = True
            target = self._pick(cat)
            results = list(dict.fromkeys([target, *(self._pick(cat) for _ in range(7))]))
            clicked = rng.random() < 0.7
            fields: dict[str, Any] = {
                "query": _typo(rng, self.items[target].title.lower()), "category": cat,
                "result_item_ids": [self.items[i].item_id for i in results]}
            if clicked:
                fields["clicked_item_id"] = self.items[target].item_id
            else:
                target = None
            self._emit(out, "search", user, fields)
        for n in range(rng.randint(1, 8)):
            idx = target if n == 0 and target is not None else self._pick(cat)
            item = self.items[idx]
            source = ("rec" if taken is not None else "search") \
                if n == 0 and target is not None else "browse"
            self._emit(out, "click", user, {"item_id": item.item_id, "category": cat,
                                            "source": source})
            if rng.random() < P_FAV * self._fav_odds[idx] / self._fav_scale:
                self._emit(out, "fav", user, {"item_id": item.item_id, "category": cat})
            if rng.random() < P_CART * self._cart_odds[idx] / self._cart_scale:
                self._emit(out, "cart", user, {"item_id": item.item_id, "category": cat,
                                               "price": item.price})
                buy = P_PURCHASE_GIVEN_CART * (SEARCH_BUY_LIFT if searched else 1.0)
                if self.sale_at is not None and self._emitted >= self.sale_at:
                    buy *= self.sale_factor
                if rng.random() < buy:
                    self._emit(out, "purchase", user, {
                        "item_id": item.item_id, "category": cat, "price": item.price,
                        "quantity": rng.choice(QUANTITIES)})
        return out

    def appeal(self, u: int, idx: int) -> float:
        """The true appeal of item ``idx`` to user ``u``, in (0, 1]: how shoppers like it
        (its cart propensity: brand trust, a fair price; half on average) times whether
        it is in one of the user's interest categories (else :data:`OFF_INTEREST_APPEAL`).

        >>> sim = ShopSimulator(n_users=5, n_items=50, seed=1)
        >>> mine = sim._by_cat[sim._users[0][0]][0]
        >>> 0.0 < sim.appeal(0, mine) <= 1.0
        True
        """
        quality = min(1.0, 0.5 * self._cart_odds[idx] / self._cart_scale)
        interest = 1.0 if self.items[idx].category in self._users[u] else OFF_INTEREST_APPEAL
        return quality * interest

    def _from_list(self, u: int, user: str) -> int | None:
        """The item user ``u`` takes from the list they were shown at the start of a visit,
        or None (they do not look at it this visit, have none, or like nothing on it)."""
        if self.lists is None or self.uptake <= 0.0:
            return None
        rng = self._rng
        if rng.random() >= self.uptake:
            return None
        shown = self.lists(user) or []
        for position, item_id in enumerate(shown, 1):
            idx = self._index.get(item_id)
            if idx is not None and rng.random() < self.appeal(u, idx) / math.sqrt(position):
                self.taken += 1
                return idx
        return None

    def _pick(self, cat: str) -> int:
        ids = self._by_cat[cat]
        rank = _draw(self._rng, self._cat_cum[cat])
        return ids[(rank + self._rank_offset) % len(ids)]

    def _tick(self) -> None:
        self._emitted += 1
        if self.drift_every and self._emitted % self.drift_every == 0:
            self._rank_offset += 1  # yesterday's second-best is today's best seller

    def _emit(self, out: list[ProducedRecord], kind: str, user: str,
              fields: dict[str, Any]) -> None:
        self._tick()
        if self.malformed_every and self._emitted % self.malformed_every == 0:
            out.append(self._malformed(kind, user))
            self._tick()
        ts = self.clock()
        value = {"event_id": f"s{self.seed}-{next(self._counter)}", "user_id": user, "ts": ts,
                 **fields}
        out.append(ProducedRecord(kind, user, wire_bytes(value), ts=ts))

    def _malformed(self, kind: str, user: str) -> ProducedRecord:
        """A record the decoder must refuse; the variants cycle so each reason shows up."""
        n = next(self._counter)
        ts = self.clock()
        eid = f"bad-{self.seed}-{n}"
        variants: list[bytes] = [
            b"{not json",
            wire_bytes({"event_id": eid, "ts": ts, "item_id": "i1", "query": "x"}),  # no user
            wire_bytes({"event_id": eid, "user_id": user, "ts": "yesterday", "item_id": "i1",
                     "query": "x"}),
            wire_bytes({"event_id": eid, "user_id": "u" * 5000, "ts": ts, "item_id": "i1",
                     "query": "x"}),
            wire_bytes({"v": 99, "event_id": eid, "user_id": user, "ts": ts, "item_id": "i1",
                     "query": "x"}),
        ]
        self._malformed_n += 1
        return ProducedRecord(kind, user, variants[self._malformed_n % len(variants)],
                              malformed=True, ts=ts)


def propensity(item: Item, base_price: float) -> tuple[float, float]:
    """Un-normalised (cart, fav) odds of an item: brand trust and price against the
    category's usual price drive carts; style adjectives drive favourites.

    >>> propensity(Item("i", "Deluxe red mug", "home/mug", "acme", 10.0), 25.0)
    (2.8, 3.0)
    """
    price = item.price or base_price
    cheap = min(max((base_price / price) ** 0.7, 0.5), 1.4)
    cart = round(TRUSTED_BRANDS.get(item.brand, 1.0) * cheap, 6)
    fav = 3.0 if item.title.split(" ")[0].lower() in FAV_STYLES else 0.6
    return cart, fav


def _cumulative(weights: list[float]) -> list[float]:
    return list(itertools.accumulate(weights))


def _draw(rng: random.Random, cum: list[float]) -> int:
    return bisect.bisect_right(cum, rng.random() * cum[-1])


def _typo(rng: random.Random, text: str) -> str:
    """Most queries are typed right; some drop or swap a character."""
    words = text.split()
    query = " ".join(words[-2:]) if rng.random() < 0.7 else text
    r = rng.random()
    if r < 0.15 and len(query) > 4:
        i = rng.randrange(1, len(query) - 1)
        return query[:i] + query[i + 1:]
    if r < 0.25 and len(query) > 4:
        i = rng.randrange(1, len(query) - 2)
        return query[:i] + query[i + 1] + query[i] + query[i + 2:]
    return query
