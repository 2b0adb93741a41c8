"""Texts → pooled encoder vectors, in chunks, cached while the encoder is frozen.

Encoding is the expensive part of both training and serving (all-MiniLM-L6-v2 encodes
≈ 100 short texts/s per CPU core). Catalogue titles and queries repeat endlessly, so a
frozen encoder's output for a text is computed once and kept in a bounded LRU. The cache
is tied to an encoder *fingerprint*: when a promoted version ships new encoder weights the
fingerprint changes and the cache starts over.

A second level, shared between processes (:class:`VectorStore`, Redis in production),
lets the trainer reuse what the workers already encoded for the catalogue and queries,
so a fine-tune on a CPU does not pay for the encoder twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol

import torch

from tailstream.models.towers.two_tower import TwoTowerRecommender, tokenize

if TYPE_CHECKING:  # the child process is started by the worker, not imported here
    from tailstream.models.towers.encoder_process import EncoderProcess


def autocast_for(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast on CUDA when asked; nothing on CPU (CPU bf16 is slower on most x86)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


REMOTE_MAX = 256
"""The most texts one call sends to the encoder process (a turn's new queries and
context items, a chunk of new catalogue items); re-encoding a whole catalogue for a
version that changed the encoder stays in the worker's own torch threads."""


class VectorStore(Protocol):
    """A shared text → vector map for one encoder fingerprint (a cache: may forget)."""

    def get_many(self, fingerprint: str, texts: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def put_many(self, fingerprint: str, vectors: dict[str, torch.Tensor]) -> None: ...


class TextVectors:
    """``vectors(texts)`` → ``[N, hidden]`` float32 on the model's device."""

    def __init__(self, model: TwoTowerRecommender, tokenizer: Any, *, device: torch.device,
                 max_len: int, fingerprint: str, cache_size: int = 200_000, chunk: int = 64,
                 bf16: bool = False, shared: VectorStore | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_len = max_len
        self.fingerprint = fingerprint
        self.cache_size = cache_size
        self.chunk = chunk
        self.bf16 = bf16
        self.shared = shared
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # texts run through the encoder (cache misses)
        self.remote: EncoderProcess | None = None
        """An :class:`~tailstream.models.towers.encoder_process.EncoderProcess` for small
        encodes while this cache's fingerprint is the child's (None: none)."""

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, text: str) -> bool:
        return text in self._cache

    def preload(self, vectors: dict[str, torch.Tensor]) -> None:
        """Put known vectors in the cache (benchmarks that time scoring, not encoding)."""
        for text, vec in vectors.items():
            self._cache[text] = vec.to(self.device, torch.float32)

    def reset(self, fingerprint: str) -> None:
        """New encoder weights: forget every cached vector."""
        if fingerprint != self.fingerprint:
            self._cache.clear()
            self.fingerprint = fingerprint

    @torch.inference_mode()
    def vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """Cached where possible; the rest encoded in chunks (no gradients)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing and self.shared is not None:
            found = self.shared.get_many(self.fingerprint, missing)
            for t, v in found.items():
                self._cache[t] = v.to(self.device, torch.float32)
            missing = [t for t in missing if t not in found]
        remote = self.remote if (missing and self.remote is not None
                                 and len(missing) <= REMOTE_MAX and self.remote.alive
                                 and self.remote.fingerprint == self.fingerprint) else None
        for start in range(0, len(missing), self.chunk):
            part = missing[start:start + self.chunk]
            out = self._encode_remote(remote, part) if remote is not None else self.encode(part)
            for t, v in zip(part, out, strict=True):
                self._cache[t] = v
            if self.shared is not None:
                self.shared.put_many(self.fingerprint, dict(zip(part, out, strict=True)))
        rows = []
        for t in texts:
            self._cache.move_to_end(t)
            rows.append(self._cache[t])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        if not rows:
            return torch.empty(0, self.model.item_proj.in_features, device=self.device)
        return torch.stack(rows)

    def _encode_remote(self, remote: EncoderProcess, texts: Sequence[str]) -> torch.Tensor:
        try:
            out = torch.from_numpy(remote.encode(texts)).to(self.device, torch.float32)
        except RuntimeError:
            return self.encode(texts)
        self.encoded += len(texts)
        return out

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Run the encoder on ``texts`` (gradients flow if the caller enables them)."""
        enc = tokenize(self.tokenizer, texts, self.max_len)
        ids = enc["input_ids"].to(self.device, non_blocking=True)
        mask = enc["attention_mask"].to(self.device, non_blocking=True)
        with autocast_for(self.device, self.bf16):
            out = self.model.encode_tokens(ids, mask)
        self.encoded += len(texts)
        return out.float()
