"""What producers emit: a record bound for the topic of its kind."""

from __future__ import annotations

from typing import NamedTuple


class ProducedRecord(NamedTuple):
    kind: str  # click | cart | fav | purchase | search | item
    key: str  # user_id (item_id for kind "item")
    value: bytes  # wire bytes (contract.encode of the event or item dict)
    malformed: bool = False  # deliberately broken (synthetic producer), must end in the DLQ
    ts: float | None = None  # event time, for paced replay
