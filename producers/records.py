"""What producers emit: a record bound for the topic of its kind."""

from __future__ import annotations

import json
from typing import Any, NamedTuple


class ProducedRecord(NamedTuple):
    """One message for the topic of ``kind``; ``ts`` (event time) lets replay pace itself."""

    kind: str  # click | cart | fav | purchase | search | item
    key: str  # user_id (item_id for kind "item")
    value: bytes  # wire bytes (contract.encode of the event or item dict)
    malformed: bool = False  # deliberately broken (synthetic producer), must end in the DLQ
    ts: float | None = None  # event time, for paced replay


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def wire_bytes(value: dict[str, Any]) -> bytes:
    """The bytes of :func:`tailstream.contract.encode`, reusing one encoder.

    ``json.dumps`` with ``separators`` builds a new encoder per call, which is a third of
    a producer's time per event; the output is identical (a unit test checks it).
    """
    return _ENCODER.encode(value).encode()
