"""Item-id memory for the item tower: a hashed table of id embeddings with a frequency
filter, so items the stream has seen often enough are told apart beyond their texts.

Frozen text vectors cannot separate items whose texts coincide (on one real log 6,492
items had 2,658 distinct texts), nor learn what a text does not say (that this very item
sells). Production recommenders give frequent ids their own embedding and let new and rare
ids fall back to shared features:

* **Frequency filter** (Monolith, Liu et al., "Monolith: Real Time Recommendation System
  With Collisionless Embedding Table", 2022, §2.2): an id gets a slot only after it has
  been seen ``min_count`` times; until then (new and tail items) it reads its text alone.
* **Collisionless within a bounded table**: each id has two candidate buckets (two-choice
  hashing, Azar et al., "Balanced Allocations", STOC 1994); a bucket stores the 63-bit
  fingerprint of the id that owns it, so an id only ever reads its own row — a tail item
  that hashes onto a frequent item's bucket is not given that item's embedding. When
  both buckets are taken, the id stays on its text (counted as ``denied``).

The owners are a ``[buckets]`` int64 tensor (0: free) kept in the checkpoint beside the
embeddings, so a worker serving a promoted model reads the same rows the trainer trained.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

MASK63 = (1 << 63) - 1


@lru_cache(maxsize=1 << 20)
def fingerprint(item_id: str) -> int:
    """A stable non-zero 63-bit fingerprint of an id (BLAKE2b, the same in every process,
    unlike Python's salted ``hash``). Cached: a promotion re-reads the whole catalogue's.

    >>> fingerprint("sku-1") == fingerprint("sku-1"), fingerprint("sku-1") > 0
    (True, True)
    """
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & MASK63) | 1


def fingerprints(item_ids: Sequence[str]) -> torch.Tensor:
    """``[N]`` int64 fingerprints."""
    return torch.tensor([fingerprint(i) for i in item_ids], dtype=torch.long)


def buckets_of(fps: torch.Tensor, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two candidate buckets of each fingerprint: its low and its high 31 bits, modulo
    the table size.

    >>> a, b = buckets_of(torch.tensor([(5 << 32) | 3]), 4)
    >>> a.tolist(), b.tolist()
    ([3], [1])
    """
    return fps % buckets, (fps >> 32) % buckets


def lookup(owner: torch.Tensor, fps: torch.Tensor) -> torch.Tensor:
    """Each fingerprint's row: the candidate bucket it owns, or ``len(owner)`` (the
    padding row: no id memory) when it owns neither.

    >>> owner = torch.zeros(8, dtype=torch.long)
    >>> fps = fingerprints(["a", "b"])
    >>> admit(owner, fps, torch.tensor([True, False]))
    1
    >>> lookup(owner, fps).tolist()[1]
    8
    """
    n = owner.shape[0]
    if n == 0 or fps.numel() == 0:
        return torch.full(fps.shape, n, dtype=torch.long)
    first, second = buckets_of(fps, n)
    fps = fps.to(owner.device)
    first, second = first.to(owner.device), second.to(owner.device)
    rows = torch.full(fps.shape, n, dtype=torch.long, device=owner.device)
    rows = torch.where(owner[second] == fps, second, rows)
    return torch.where(owner[first] == fps, first, rows)


def admit(owner: torch.Tensor, fps: torch.Tensor, eligible: torch.Tensor) -> int:
    """Give every eligible fingerprint that owns no bucket yet a free one of its two (in
    place); returns how many were admitted. Ids already in keep their row.

    >>> owner = torch.zeros(16, dtype=torch.long)
    >>> admit(owner, fingerprints(["a", "b", "c"]), torch.tensor([True, True, False]))
    2
    >>> int((owner != 0).sum())
    2
    """
    n = owner.shape[0]
    if n == 0:
        return 0
    have = lookup(owner, fps) < n
    admitted = 0
    first, second = buckets_of(fps, n)
    for k in torch.nonzero(eligible & ~have).flatten().tolist():
        for bucket in (int(first[k]), int(second[k])):
            if int(owner[bucket]) == 0:
                owner[bucket] = fps[k]
                admitted += 1
                break
    return admitted


def frequent(counts: Mapping[str, int], min_count: int) -> list[str]:
    """Ids seen at least ``min_count`` times (the frequency filter).

    >>> frequent({"a": 3, "b": 1}, 2)
    ['a']
    """
    return [i for i, n in counts.items() if n >= min_count]
