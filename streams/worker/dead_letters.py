"""Dead-letter records: what a refused message (or a refused element of an envelope)
becomes on the ``events.dlq`` topic. A record always fits, so dead-lettering never fails
for the record's sake and never costs a neighbour anything.

* The **value** is the refused message's bytes — or, for one refused element of a batched
  envelope, that element alone (re-encoded as JSON; the envelope's other elements were
  applied). A value over ``TAILSTREAM_DLQ_MAX_VALUE_BYTES`` (64 KiB) is cut to that size;
  the headers then say it was cut and carry the whole value's size and sha256, so the
  original can still be found and checked in the source topic.
* The **key** is the message's key, cut to 1 KiB the same way.
* The **headers** give the reason code, its detail (≤ 500 bytes of UTF-8), and the source
  topic, partition and offset (``tailstream-source-*``); for an element, its index and the
  envelope's size (``tailstream-envelope-index``, ``tailstream-envelope-events``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tailstream.contract import Rejection

MAX_KEY_BYTES = 1024
HEADER_PREFIX = "tailstream-"


@dataclass(frozen=True)
class DeadLetter:
    """One record for the dead-letter topic, and what it is about."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    source: Any
    """The refused message (a ``RawMessage``)."""
    why: Rejection

    @property
    def size(self) -> int:
        return (len(self.key or b"") + len(self.value)
                + sum(len(k) + len(v) for k, v in self.headers))


def cut(text: str, limit: int = 500) -> bytes:
    """``text`` as UTF-8, cut to ``limit`` bytes on a character boundary.

    >>> cut("€" * 200, 10).decode()
    '€€€'
    """
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore").encode()


def dlq_headers(msg: Any, why: Rejection) -> list[tuple[str, bytes]]:
    """The reason and the source of a dead-lettered message."""
    return [
        ("tailstream-reason", why.reason.encode()),
        ("tailstream-detail", cut(why.detail)),
        ("tailstream-source-topic", msg.topic.encode()),
        ("tailstream-source-partition", str(msg.partition).encode()),
        ("tailstream-source-offset", str(msg.offset).encode()),
    ]


def _bounded(name: str, data: bytes, limit: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """``data`` cut to ``limit`` bytes, with headers describing the whole when it was cut.

    >>> _bounded("value", b"abcdef", 4)[0], [k for k, _ in _bounded("value", b"abcdef", 4)[1]]
    (b'abcd', ['tailstream-value-truncated', 'tailstream-value-bytes', 'tailstream-value-sha256'])
    """
    if len(data) <= limit:
        return data, []
    return data[:limit], [(f"{HEADER_PREFIX}{name}-truncated", b"1"),
                          (f"{HEADER_PREFIX}{name}-bytes", str(len(data)).encode()),
                          (f"{HEADER_PREFIX}{name}-sha256",
                           hashlib.sha256(data).hexdigest().encode())]


def element_bytes(element: Any) -> bytes | None:
    """An envelope's element as compact JSON (ASCII-escaped, so always encodable); None if
    it cannot be written back (nested too deep)."""
    try:
        return json.dumps(element, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        return None


def dead_letter(msg: Any, why: Rejection, *, max_value_bytes: int,
                element: Any = None, index: int | None = None,
                events: int | None = None) -> DeadLetter:
    """The record for ``msg`` (refused whole), or for element ``index`` of its envelope of
    ``events``.

    >>> from types import SimpleNamespace as M
    >>> m = M(topic="clicks", partition=1, offset=7, key=b"u1", value=b"[{},{}]")
    >>> r = dead_letter(m, Rejection("missing_field", "user_id"), max_value_bytes=100,
    ...                 element={"a": 1}, index=1, events=2)
    >>> r.value, dict(r.headers)["tailstream-envelope-index"]
    (b'{"a":1}', b'1')
    """
    headers = dlq_headers(msg, why)
    raw: bytes | None = None
    if index is not None:
        raw = element_bytes(element)
        headers += [("tailstream-envelope-index", str(index).encode()),
                    ("tailstream-envelope-events", str(events or 0).encode())]
    if raw is None:
        raw = msg.value if msg.value is not None else b""
    value, value_headers = _bounded("value", raw, max_value_bytes)
    key, key_headers = (None, []) if msg.key is None else _bounded("key", msg.key,
                                                                   MAX_KEY_BYTES)
    return DeadLetter(key, value, headers + value_headers + key_headers, msg, why)


def bare(letter: DeadLetter) -> DeadLetter:
    """The last resort when a record could not be written: no value, no key, the headers
    (with the value's size and sha256, so the source offset can still be checked)."""
    value = letter.source.value or b""
    described = [h for h in letter.headers if not h[0].startswith(f"{HEADER_PREFIX}value-")]
    described += [(f"{HEADER_PREFIX}value-truncated", b"1"),
                  (f"{HEADER_PREFIX}value-bytes", str(len(value)).encode()),
                  (f"{HEADER_PREFIX}value-sha256", hashlib.sha256(value).hexdigest().encode())]
    return DeadLetter(None, b"", described, letter.source, letter.why)
