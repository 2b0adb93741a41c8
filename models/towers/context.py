"""What the user tower reads: a user's recent searches and items as context texts.

Torch-free, so the worker's per-event state (which builds these texts for every training
sample) runs without loading the model. A sample stores its context as one string,
entries joined by :data:`CONTEXT_SEPARATOR`, most recent first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CONTEXT_SEPARATOR = " ; "


def split_context(user_text: str, max_context: int) -> list[str]:
    """The user's context texts from a sample's ``user_text`` (most recent first).

    >>> split_context("search: red mug ; Kettle | home ; Lamp | home", 2)
    ['search: red mug', 'Kettle | home']
    """
    return [t for t in (p.strip() for p in user_text.split(CONTEXT_SEPARATOR)) if t][
        :max_context]


@dataclass
class ContextEntry:
    """One recent thing the user did: a search (``kind="q"``) or an item (``"i"``)."""

    kind: str
    text: str  # what the encoder reads
    label: str  # the query, or the item's short title, for reasons
    item_id: str | None = None


def context_entries(profile: Mapping[str, Any], item_text: Mapping[str, str],
                    max_context: int) -> list[ContextEntry]:
    """A profile's recent searches and items, most recent first, as the user tower reads
    them (profiles written before ``ctx`` existed fall back to queries, then items).

    >>> p = {"ctx": [["q", "red mug"], ["i", "i9"]]}
    >>> [e.text for e in context_entries(p, {"i9": "Mug | home/mug"}, 4)]
    ['search: red mug', 'Mug | home/mug']
    """
    raw = profile.get("ctx")
    if raw is None:
        raw = ([["q", q] for q in profile.get("queries", [])[:max_context]]
               + [["i", i] for i in profile.get("items", [])[:max_context]])
    out: list[ContextEntry] = []
    for kind, value in raw[:max_context]:
        if kind == "q":
            out.append(ContextEntry("q", f"search: {value}", value))
        else:
            text = item_text.get(value) or f"item {value}"
            out.append(ContextEntry("i", text, text.split(" | ")[0], value))
    return out


@dataclass
class UserRequest:
    user_id: str
    context: list[ContextEntry]
    exclude: set[str] = field(default_factory=set)
