"""The frozen encoder in a process of its own, for a worker's turn-time encodes.

A scoring turn encodes the texts its scorer has no vector for (new queries, context items
not embedded yet). In the worker the encoder runs on the torch thread, beside the event
loop: each of the encoder's few hundred operations gives the interpreter up and waits to
take it back while the loop runs Python, so a forward of a dozen short texts took several
times its CPU time. Here the encoder runs in a child process (its own interpreter): the
torch thread sends the texts and waits once, the child tokenizes and encodes on the other
core. Only for the encoder as shipped (the base weights' fingerprint): a version that
trains encoder layers encodes in the worker, as before.

The child exits when the worker goes (its end of the pipe closes), a kill -9 included.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class EncoderProcess:
    """``encode(texts)`` → ``[N, hidden]`` float32, computed in a child process."""

    def __init__(self, encoder_path: str | None, max_len: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, encoder_path, max_len),
                                 daemon=True, name="tailstream-encoder")
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self.fingerprint: str | None = None
        self.failed: str | None = None
        self.texts = 0
        """Texts this child has encoded (for the worker's metrics)."""

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Until the child has loaded the encoder (its fingerprint in :attr:`fingerprint`);
        False if it failed or did not answer in time (why in :attr:`failed`)."""
        if self.fingerprint is not None:
            return True
        try:
            if not self._conn.poll(timeout_s):
                self.failed = "the encoder process did not start in time"
                return False
            kind, value = self._conn.recv()
        except (EOFError, OSError) as exc:  # the child died, or the worker closed it
            self.failed = repr(exc)
            return False
        if kind != "ready":
            self.failed = str(value)
            return False
        self.fingerprint = str(value)
        return True

    @property
    def alive(self) -> bool:
        return self.failed is None and self.fingerprint is not None and self._proc.is_alive()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """The pooled vectors of ``texts``; raises ``RuntimeError`` if the child is gone
        (the caller encodes in-process instead)."""
        with self._lock:
            try:
                self._conn.send(list(texts))
                kind, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                if self.failed is None:
                    log.warning("the encoder process is gone (%r): the worker encodes its "
                                "texts itself from now on", exc)
                self.failed = repr(exc)
                raise RuntimeError(f"the encoder process is gone: {exc!r}") from exc
        if kind != "vectors":
            raise RuntimeError(f"the encoder process failed: {value}")
        out: np.ndarray = value
        self.texts += len(out)
        return out

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()


def _serve(conn: Connection, encoder_path: str | None, max_len: int) -> None:
    import torch

    from tailstream.models.towers.encoder import load_encoder
    from tailstream.models.towers.two_tower import pooled_text, tokenize

    torch.set_num_threads(1)  # small batches, one core beside the worker
    try:
        enc = load_encoder(encoder_path)
    except Exception as exc:  # reported to the worker, which encodes in-process
        conn.send(("failed", repr(exc)))
        return
    model = enc.model.eval()
    conn.send(("ready", enc.fingerprint))
    while True:
        try:
            texts: Any = conn.recv()
        except (EOFError, OSError):
            return  # the worker is gone
        try:
            with torch.inference_mode():
                t = tokenize(enc.tokenizer, texts, max_len)
                vecs = pooled_text(model, t["input_ids"], t["attention_mask"])
            conn.send(("vectors", vecs.numpy()))
        except Exception as exc:
            conn.send(("failed", repr(exc)))
