"""The encoder in a child process: the same vectors as the worker's own encoder, used only
for small encodes while the encoder is the shipped one, and gone with the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tailstream.configs import RankingConfig, TowerConfig
from tailstream.metrics import Metrics
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.serving.scorer import Scorer
from tailstream.models.towers.context import ContextEntry, UserRequest
from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.encoder_process import EncoderProcess
from tailstream.models.towers.loading import ServedModel, build_model
from tailstream.models.towers.text_vectors import REMOTE_MAX, TextVectors
from tailstream.models.towers.two_tower import mean_pool, tokenize
from tailstream.settings import Secret, Settings
from tailstream.streams.worker.scoring import ScoringService

TEXTS = ["search: red shoes", "blue mug | home/mug | acme | price 10-25", "x", ""]


def test_the_child_encodes_what_the_worker_would(tiny_encoder: Path) -> None:
    remote = EncoderProcess(str(tiny_encoder), max_len=32)
    try:
        assert remote.wait_ready(120) and remote.alive
        enc = load_encoder(tiny_encoder)
        assert remote.fingerprint == enc.fingerprint
        with torch.inference_mode():
            t = tokenize(enc.tokenizer, TEXTS, 32)
            out = enc.model.eval()(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
            want = mean_pool(out.last_hidden_state.float(), t["attention_mask"]).numpy()
        got = remote.encode(TEXTS)
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-6)
        assert remote.alive
    finally:
        remote.close()
    assert not remote._proc.is_alive()


def test_the_child_goes_when_its_worker_is_gone(tiny_encoder: Path) -> None:
    """A worker killed with -9 closes its end of the pipe: the child ends by itself."""
    remote = EncoderProcess(str(tiny_encoder), max_len=32)
    assert remote.wait_ready(120)
    remote._conn.close()  # what the worker's death does to the pipe
    deadline = time.monotonic() + 20
    while remote._proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not remote._proc.is_alive()


def test_a_child_that_cannot_load_the_encoder_says_why(tmp_path: Path) -> None:
    remote = EncoderProcess(str(tmp_path / "nothing-here"), max_len=32)
    try:
        assert not remote.wait_ready(120)
        assert remote.failed and not remote.alive
    finally:
        remote.close()


class _Remote:
    def __init__(self, fingerprint: str, fail: bool = False) -> None:
        self.fingerprint, self.fail, self.alive = fingerprint, fail, True
        self.calls: list[int] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        if self.fail:
            raise RuntimeError("gone")
        return np.full((len(texts), 32), 7.0, dtype=np.float32)


@pytest.mark.parametrize("case", ["used", "other encoder", "bulk", "gone"])
def test_text_vectors_send_small_encodes_to_the_child_of_their_encoder(
        tiny_encoder: Path, case: str) -> None:
    enc = load_encoder(tiny_encoder)
    model = build_model(enc, TowerConfig())
    texts = TextVectors(model, enc.tokenizer, device=torch.device("cpu"), max_len=32,
                        fingerprint="base", chunk=8)
    remote = _Remote("base" if case != "other encoder" else "trained", fail=case == "gone")
    texts.remote = remote
    n = REMOTE_MAX + 1 if case == "bulk" else 20
    out = texts.vectors([f"text {k}" for k in range(n)])
    assert out.shape[0] == n and texts.encoded == n
    from_child = bool((out == 7.0).all(dim=1).any())
    if case == "used":
        assert remote.calls == [8, 8, 4] and from_child
    elif case == "gone":
        assert remote.calls and not from_child  # each chunk tried, encoded here instead
    else:
        assert remote.calls == [] and not from_child


def test_a_worker_with_the_encoder_process_serves_the_lists_it_serves_without(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """Same catalogue, same users with contexts nobody has encoded: the same lists either
    way; with the child on, it encoded the turn's texts and the metrics say so."""
    samples = shop_samples(300)
    catalogue = {x.item_id: x.item_text for x in samples}
    users = [UserRequest(f"u{n}", [ContextEntry("i", f"never seen {n} {t}", "click", None)
                                   for t in ("red mug", "wool socks")], set())
             for n in range(6)]

    def item_info(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
        return (["tail"] * len(ids), [None] * len(ids), [0.0] * len(ids))

    async def serve(on: bool) -> tuple[list[list[tuple[str, float]]], Metrics, int]:
        s = Settings().replace(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path / str(on),
                               redis_url=Secret("redis://127.0.0.1:1/0"),
                               encoder_path=str(tiny_encoder), embed_dim=32, text_max_len=32,
                               text_vectors_shared=False, recs_k=10, device="cpu",
                               encoder_process=on)
        metrics = Metrics()
        service = ScoringService(s, metrics)
        try:
            await service.start()
            if on:
                assert service._child_start is not None
                await service._child_start  # the child ready before the first turn
            for item, text in catalogue.items():
                service.queue_item(item, text)
            while await service.embed_pending(64):
                pass
            lists = await service.recommend(users, item_info)
            child = service.encoder_process.texts if service.encoder_process else 0
            return [[(r.item_id, round(r.score, 5)) for r in lst] for lst in lists], \
                metrics, child
        finally:
            service.close()

    without, m_off, _ = asyncio.run(serve(False))
    with_child, m_on, child_texts = asyncio.run(serve(True))
    assert with_child == without and all(without)
    assert child_texts >= len(catalogue) + 12  # the catalogue's chunks and the contexts
    value = m_on.registry.get_sample_value
    assert value("tailstream_encoder_process") == 1
    assert value("tailstream_encoder_process_texts_total") == child_texts
    assert m_off.registry.get_sample_value("tailstream_encoder_process") == 0


def test_the_child_follows_the_serving_scorer_through_swaps_and_canaries(
        tiny_encoder: Path) -> None:
    """A canary, a promotion and a swap to another encoder keep the child attached; only
    a cache whose fingerprint is the child's sends it texts."""
    enc = load_encoder(tiny_encoder)
    base = ServedModel("v1", build_model(enc, TowerConfig(embed_dim=16)).eval(),
                       enc.tokenizer, enc.fingerprint, {})
    scorer = Scorer(base, device=torch.device("cpu"), max_len=16, cache_size=1_000,
                    ranking=RankingConfig(k=5, candidates=20, head_candidates=10))
    remote = _Remote(enc.fingerprint)
    scorer.texts.remote = remote
    items = {f"i{k}": f"item text {k}" for k in range(10)}

    def texts_of(ids: Sequence[str]) -> list[str]:
        return [items[i] for i in ids]

    scorer.add_items(list(items), list(items.values()))
    assert remote.calls == [10]
    retrained = ServedModel("v2", build_model(enc, TowerConfig(embed_dim=16)).eval(),
                            enc.tokenizer, "trained-encoder", {})
    for canary in (scorer.sibling(base), scorer.sibling(retrained, texts_of)):
        assert canary.texts.remote is remote
    assert remote.calls == [10]  # the other encoder's catalogue was encoded here
    scorer.swap_model(retrained, texts_of)
    assert scorer.texts.remote is remote and scorer.texts.fingerprint == "trained-encoder"
    scorer.texts.vectors(["a new query"])
    assert remote.calls == [10]
