"""What the user tower reads: a user's recent searches and items as context texts, each
with the kind of event it came from (search, click, cart, fav, purchase).

Torch-free, so the worker's per-event state (which builds these texts for every training
sample) runs without loading the model. A sample stores its context as one string,
entries joined by :data:`CONTEXT_SEPARATOR`, most recent first, and their kinds as a
second string (``Sample.user_kinds``, space-separated, same order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tailstream.contract import CLASSES, EVENT_KINDS, SEARCH

CONTEXT_SEPARATOR = " ; "

CONTEXT_KINDS: tuple[str, ...] = EVENT_KINDS
"""The kinds a context entry can have; the tower codes them ``1 + index`` (0: unknown,
as for samples written before kinds were kept)."""

_CODE = {k: n + 1 for n, k in enumerate(CONTEXT_KINDS)}


def kind_codes(kinds: str, n: int) -> list[int]:
    """The first ``n`` codes of a space-separated kinds string (0 for a missing or
    unknown kind, so a sample without kinds reads as all-unknown).

    >>> kind_codes("search cart", 3), kind_codes("", 2)
    ([5, 2, 0], [0, 0])
    """
    parts = kinds.split()
    return [_CODE.get(parts[j], 0) if j < len(parts) else 0 for j in range(n)]


def entry_codes(entries: list[ContextEntry], n: int) -> list[int]:
    """The kind codes of the first ``n`` entries, padded with 0 to ``n`` (what
    :func:`kind_codes` reads from the same entries' kinds as a sample stores them).

    >>> entry_codes([ContextEntry("q", "search: mug", "mug", event="search")], 2)
    [5, 0]
    """
    codes = [_CODE.get(e.event, 0) for e in entries[:n]]
    return codes + [0] * (n - len(codes))


def split_context(user_text: str, max_context: int) -> list[str]:
    """The user's context texts from a sample's ``user_text`` (most recent first).

    >>> split_context("search: red mug ; Kettle | home ; Lamp | home", 2)
    ['search: red mug', 'Kettle | home']
    """
    return [t for t in (p.strip() for p in user_text.split(CONTEXT_SEPARATOR)) if t][
        :max_context]


@dataclass
class ContextEntry:
    """One recent thing the user did: a search (``kind="q"``) or an item (``"i"``), and
    the event kind (``"search"``, or the strongest class of the user's events on the
    item; ``""``: unknown)."""

    kind: str
    text: str  # what the encoder reads
    label: str  # the query, or the item's short title, for reasons
    item_id: str | None = None
    event: str = ""


def context_entries(profile: Mapping[str, Any], item_text: Mapping[str, str],
                    max_context: int) -> list[ContextEntry]:
    """A profile's recent searches and items, most recent first, as the user tower reads
    them (profiles written before ``ctx`` existed fall back to queries, then items).

    >>> p = {"ctx": [["q", "red mug"], ["i", "i9", "cart"]]}
    >>> [(e.text, e.event) for e in context_entries(p, {"i9": "Mug | home/mug"}, 4)]
    [('search: red mug', 'search'), ('Mug | home/mug', 'cart')]
    """
    out: list[ContextEntry] = []
    for entry in _raw_entries(profile, max_context):
        value = entry[1]
        text, event = _read(entry, item_text)
        if entry[0] == "q":
            out.append(ContextEntry("q", text, value, event=event))
        else:
            out.append(ContextEntry("i", text, text.split(" | ")[0], value, event))
    return out


def _read(entry: list[str], item_text: Mapping[str, str]) -> tuple[str, str]:
    """What the encoder reads for a profile entry, and the entry's kind (entries of two
    elements, from profiles before kinds, are clicks)."""
    value = entry[1]
    if entry[0] == "q":
        return f"search: {value}", SEARCH
    return item_text.get(value) or f"item {value}", entry[2] if len(entry) > 2 else CLASSES[0]


def _raw_entries(profile: Mapping[str, Any], max_context: int) -> list[list[str]]:
    raw = profile.get("ctx")
    if raw is None:
        raw = ([["q", q] for q in profile.get("queries", [])[:max_context]]
               + [["i", i] for i in profile.get("items", [])[:max_context]])
    return list(raw[:max_context])


def sample_context(profile: Mapping[str, Any], item_text: Mapping[str, str],
                   max_context: int) -> tuple[str, str]:
    """The context as a training sample stores it: ``user_text`` and ``user_kinds``
    (what :func:`context_entries` gives, joined; made without the entries, since the
    worker makes one for every sample the buffer keeps).

    >>> sample_context({"ctx": [["q", "red mug"], ["i", "i9", "cart"]]}, {}, 4)
    ('search: red mug ; item i9', 'search cart')
    """
    read = [_read(entry, item_text) for entry in _raw_entries(profile, max_context)]
    return (CONTEXT_SEPARATOR.join(text for text, _ in read),
            " ".join(kind for _, kind in read))


@dataclass
class UserRequest:
    user_id: str
    context: list[ContextEntry]
    exclude: set[str] = field(default_factory=set)
