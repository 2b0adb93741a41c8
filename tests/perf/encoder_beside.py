"""A turn's encode beside a thread busy in Python: in the worker's interpreter, or in the
encoder process (``models/towers/encoder_process.py``).

A serve worker's torch thread encodes a turn's new texts while its event loop runs Python
(ingest, sources, publishing). Each of the encoder's small operations gives the
interpreter up and waits to take it back (every switch interval, 1 ms in the worker).
This script encodes ``--texts`` short texts with the real MiniLM, ``--calls`` times each
way, alone and beside a thread that keeps the interpreter busy, alternating the two ways
``--rounds`` times; it reports the median wall time per encode and how many loops the busy
thread made per second meanwhile (what the event loop gets done)::

    .venv/bin/python tests/perf/encoder_beside.py --texts 12

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.encoder_process import EncoderProcess
from tailstream.models.towers.two_tower import pooled_text, tokenize
from tailstream.streams.worker.app import SWITCH_INTERVAL_S

WORDS = "red blue shoe mug lamp cotton shirt acme phone case steel bottle kids toy".split()


def texts(n: int, rng: random.Random) -> list[str]:
    """``n`` texts no cache has seen (a number each)."""
    return [" ".join(rng.choice(WORDS) for _ in range(6)) + f" {rng.random():.6f}"
            for _ in range(n)]


class Busy:
    """A thread that runs Python until stopped, counting its loops."""

    def __init__(self) -> None:
        self.loops, self.stop = 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        d: dict[int, int] = {}
        while not self.stop:
            for i in range(1000):
                d[i % 97] = i
            self.loops += 1


def timed(encode: Callable[[Sequence[str]], Any], n: int, calls: int, rng: random.Random,
          busy: Busy | None) -> tuple[float, float]:
    """Median ms per encode, and the busy thread's loops per second meanwhile."""
    walls = []
    loops0, t0 = (busy.loops if busy else 0), time.perf_counter()
    for _ in range(calls):
        batch = texts(n, rng)
        start = time.perf_counter()
        encode(batch)
        walls.append((time.perf_counter() - start) * 1000)
    elapsed = time.perf_counter() - t0
    return statistics.median(walls), ((busy.loops - loops0) / elapsed if busy else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=12)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    enc = load_encoder(None)
    model = enc.model.eval()
    child = EncoderProcess(None, 64)
    if not child.wait_ready(300):
        raise SystemExit(f"the encoder process did not start: {child.failed}")

    def here(batch: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            t = tokenize(enc.tokenizer, batch, 64)
            vecs: np.ndarray = pooled_text(model, t["input_ids"], t["attention_mask"]).numpy()
            return vecs

    ways: dict[str, Callable[[Sequence[str]], Any]] = {"worker": here, "child": child.encode}
    rng = random.Random(0)
    for way in ways.values():  # warm both
        way(texts(args.texts, rng))
    result: dict[str, Any] = {"texts": args.texts, "calls": args.calls}
    for beside in (False, True):
        busy = Busy() if beside else None
        if busy:
            busy.thread.start()
        for _ in range(args.rounds):
            for name, way in ways.items():
                ms, loops = timed(way, args.texts, args.calls, rng, busy)
                tag = ("beside_busy_" if beside else "alone_") + name
                result.setdefault(f"{tag}_ms", []).append(round(ms, 1))
                if busy:
                    result.setdefault(f"{tag}_busy_loops_per_s", []).append(round(loops))
        if busy:
            busy.stop = True
            busy.thread.join()
    child.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
