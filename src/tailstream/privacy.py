"""Pseudonymisation of user ids: a keyed hash applied before anything is stored or published.

With ``TAILSTREAM_PSEUDONYMIZE_KEY`` set, the worker replaces every event's ``user_id`` by
``HMAC-SHA256(key, user_id)`` (first 128 bits, hex) right after validation, so profiles,
counts, the minority buffer, training samples, Redis keys and the recommendations topic
only ever hold the pseudonym. The mapping is stable (the same user keeps one profile) and
cannot be reversed or recomputed without the key (RFC 2104; a plain hash of an id could be
reversed by hashing every candidate id). The dead-letter topic keeps the original bytes of
the rejected message, like the input topics it came from.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "p-"


def pseudonymize(user_id: str, key: str) -> str:
    """The pseudonym of ``user_id`` under ``key`` (empty key: the id unchanged).

    >>> pseudonymize("u42", "k1") == pseudonymize("u42", "k1")
    True
    >>> pseudonymize("u42", "k1") != pseudonymize("u42", "k2")
    True
    >>> pseudonymize("u42", "k1")[:2], len(pseudonymize("u42", "k1"))
    ('p-', 34)
    >>> pseudonymize("u42", "")
    'u42'
    """
    if not key:
        return user_id
    digest = hmac.new(key.encode(), user_id.encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest[:32]
