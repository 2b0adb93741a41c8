"""``tailstream bench finetune``: trainer throughput beside a bare encoder training loop.

Both loops run in the same process, on the same device, with the real all-MiniLM-L6-v2
weights, fully fine-tuned (every layer trains: the GPU default), at a fixed sequence
length (texts are padded to exactly ``seq_len`` tokens, so the numbers mean what they say):

* **trainer**: the trainer's own code path, unpatched — the one fine-tune routine
  (:func:`~tailstream.models.training.routine.fine_tune`), whose ``FineTuner`` steps on
  batches of ``batch`` (user text, item text) pairs, all distinct — two sequences per pair — through
  the two towers, the outcome head, the class-weighted loss and the in-batch sampled
  softmax with logQ correction. ``pairs_per_s`` counts pairs.
* **bare encoder**: a plain loop over the same number of sequences per step: encoder
  forward, mean pooling, a trivial loss, backward, AdamW. ``bare_encoder_seq_per_s``
  counts sequences; the trainer's overhead is ``1 − 2·pairs_per_s / bare_encoder_seq_per_s``.

``frozen_encoder`` times the CPU default beside them: the same routine with the encoder
frozen (towers and head training on cached text vectors, ``layers=0``), batches of 256
samples shaped as the stream's (a Zipf catalogue, 1–20 typed context entries, count
features): ``step_ms_median`` and ``run_of_200_steps_s``, one candidate's run at the
default ``TAILSTREAM_FINETUNE_MAX_STEPS`` with the machine to itself.

``mfu`` is the model-FLOPs utilisation of the trainer: ``6·N + 12·L·H·T`` FLOPs per token
for training (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B; N = non-embedding
parameters, L layers, H hidden size, T tokens) over the device's peak: the datasheet bf16
dense peak for known GPUs, or on a CPU the fp32 matrix-multiply rate measured in the same
run (so a CPU "MFU" is against what this machine can actually do).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import torch

from tailstream.configs import FineTuneConfig, TowerConfig
from tailstream.contract import CLASSES
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.encoder import encoder_config, load_encoder
from tailstream.models.towers.loading import ServedModel, build_model, pick_device
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.towers.two_tower import tokenize
from tailstream.models.training.finetune import prepare_data
from tailstream.models.training.routine import fine_tune

GPU_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12,
                 "L40S": 362e12, "A10": 125e12}
"""Dense bf16 peak FLOP/s by device-name substring (NVIDIA datasheets, SXM parts)."""
WORDS = ("aurora wireless earbuds kettle mug lamp deluxe retro compact black white red "
         "blue green sneakers jeans jacket scarf backpack perfume shampoo lipstick puzzle "
         "kite yoga mat dumbbell bottle charger speaker smartwatch blanket pillow").split()


def flops_per_token(encoder: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: ``6·N + 12·L·H·T`` (N: non-embedding parameters)."""
    n = sum(p.numel() for name, p in encoder.named_parameters()
            if not name.startswith("embeddings."))
    layers = encoder_config(encoder, "num_hidden_layers")
    hidden = encoder_config(encoder, "hidden_size")
    return 6.0 * n + 12.0 * layers * hidden * seq_len


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"datasheet bf16 dense ({name})"
        return float("nan"), f"unknown GPU {name}"
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    reps = 10
    for _ in range(reps):
        a @ b
    rate = reps * 2 * n**3 / (time.perf_counter() - started)
    return rate, f"measured fp32 matmul {n}x{n} on {torch.get_num_threads()} threads"


def _texts(rng: random.Random, n: int, seq_len: int, tag: str) -> list[str]:
    # Enough words to overflow seq_len tokens: truncation then pads nothing, every text
    # is exactly seq_len tokens.
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS) for _ in range(seq_len)) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_trainer(device: torch.device, seq_len: int, batch: int, steps: int, warmup: int,
                  bf16: bool, compile_: bool, encoder_path: str | None) -> float:
    """Pairs/s of the trainer's own code path: the one fine-tune routine
    (:func:`~tailstream.models.training.routine.fine_tune`, nothing patched) with every
    encoder layer training and every text padded to exactly ``seq_len`` tokens
    (``FineTuneConfig.pad_to_max_len``); the steps after ``warmup`` are timed."""
    enc = load_encoder(encoder_path)
    model = build_model(enc, TowerConfig(max_len=seq_len, max_context=1)).to(device)
    served = ServedModel("base", model, enc.tokenizer, enc.fingerprint, {"version": "base"})
    vectors = TextVectors(model, enc.tokenizer, device=device, max_len=seq_len,
                          fingerprint=enc.fingerprint)
    cfg = FineTuneConfig(policy="class_balanced", batch_size=batch, max_steps=steps + warmup,
                         max_seconds=math.inf, replay_share=0.0, holdout_share=0.0, bf16=bf16,
                         compile=compile_, layers="all", pad_to_max_len=True)
    rng = random.Random(0)
    n = batch * (steps + warmup)
    users = _texts(rng, n, seq_len, "user")
    items = _texts(rng, n, seq_len, "item")
    labels = rng.choices(CLASSES, weights=[0.85, 0.07, 0.03, 0.05], k=n)
    samples = [Sample(f"e{i}", f"u{i}", f"i{i}", labels[i], float(i), user_text=users[i],
                      item_text=items[i]) for i in range(n)]
    data = prepare_data(samples, {"click": 85, "cart": 7, "fav": 3, "purchase": 5}, 0.0)
    ends: list[float] = []  # on_step gets loss.item(): a step's work is done by then
    fine_tune(served, vectors, data, cfg=cfg, device=device, gate=None,
              class_weight={"click": 0.5, "cart": 2.0, "fav": 3.0, "purchase": 4.0},
              on_step=lambda step, loss: ends.append(time.perf_counter()))
    return steps * batch / (ends[-1] - ends[warmup - 1])


def frozen_samples(n: int, items: int, max_context: int, rng: random.Random
                   ) -> tuple[list[Sample], list[str]]:
    """``n`` training samples shaped as the stream's: item texts of an ``items``-item
    catalogue drawn by a Zipf popularity (``∝ 1/rank``), each with a context of 1 to
    ``max_context`` entries (items drawn the same way, with their event kinds) and the
    count features; the catalogue's texts come back too (to encode them first)."""
    from tailstream.models.towers.context import CONTEXT_SEPARATOR

    texts = [f"item{i} " + " ".join(rng.choice(WORDS) for _ in range(8)) + " | home"
             for i in range(items)]
    popularity = [1.0 / (rank + 1) for rank in range(items)]
    labels = rng.choices(CLASSES, weights=[0.85, 0.07, 0.03, 0.05], k=n)
    samples = []
    for k in range(n):
        context = rng.choices(range(items), weights=popularity, k=rng.randint(1, max_context))
        item = rng.choices(range(items), weights=popularity)[0]
        samples.append(Sample(
            f"e{k}", f"u{k % (n // 4 + 1)}", f"i{item}", labels[k], float(k),
            user_text=CONTEXT_SEPARATOR.join(texts[i] for i in context),
            item_text=texts[item],
            user_kinds=" ".join(rng.choice(CLASSES) for _ in context),
            features=tuple(rng.random() for _ in range(TowerConfig().wide_features))))
    return samples, texts


def bench_frozen(device: torch.device, batch: int, steps: int, warmup: int,
                 encoder_path: str | None, items: int = 2000) -> dict[str, Any]:
    """The CPU default's path (``TAILSTREAM_FINETUNE_LAYERS=auto`` freezes the encoder
    there): the same routine training the towers and the head on cached text vectors,
    with the stream's typed contexts (1–20 entries) and count features. The catalogue is
    encoded first (a running system has its text vectors), so only steps are timed."""
    enc = load_encoder(encoder_path)
    tower = TowerConfig()
    model = build_model(enc, tower).to(device)
    served = ServedModel("base", model, enc.tokenizer, enc.fingerprint, {"version": "base"})
    vectors = TextVectors(model, enc.tokenizer, device=device, max_len=tower.max_len,
                          fingerprint=enc.fingerprint)
    samples, texts = frozen_samples(batch * 4, items, tower.max_context, random.Random(2))
    vectors.vectors(texts)
    cfg = FineTuneConfig(policy="class_balanced", batch_size=batch, max_steps=steps + warmup,
                         max_seconds=math.inf, holdout_share=0.0, layers="0")
    data = prepare_data(samples, {"click": 85, "cart": 7, "fav": 3, "purchase": 5}, 0.0)
    ends: list[float] = []
    fine_tune(served, vectors, data, cfg=cfg, device=device, gate=None,
              class_weight={"click": 0.5, "cart": 2.0, "fav": 3.0, "purchase": 4.0},
              on_step=lambda step, loss: ends.append(time.perf_counter()))
    gaps = sorted(b - a for a, b in zip(ends[warmup - 1:], ends[warmup:], strict=False))
    seconds = ends[-1] - ends[warmup - 1]
    return {"batch_pairs": batch, "max_context": tower.max_context, "steps": steps,
            "catalogue_items": items, "steps_per_s": round(steps / seconds, 2),
            "pairs_per_s": round(steps * batch / seconds, 1),
            "step_ms_median": round(1000 * gaps[len(gaps) // 2], 1),
            "run_of_200_steps_s": round(200 * seconds / steps, 1)}


def bench_bare(device: torch.device, seq_len: int, sequences: int, steps: int, warmup: int,
               bf16: bool, encoder_path: str | None) -> float:
    from tailstream.models.towers.text_vectors import autocast_for
    from tailstream.models.towers.two_tower import mean_pool

    enc = load_encoder(encoder_path)
    model = enc.model.to(device).train()
    fused = device.type == "cuda"
    opt = (torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True) if fused
           else torch.optim.AdamW(model.parameters(), lr=3e-5))
    rng = random.Random(1)
    batches = []
    for _ in range(steps + warmup):
        t = tokenize(enc.tokenizer, _texts(rng, sequences, seq_len, "s"), seq_len,
                     fixed_length=True)
        batches.append((t["input_ids"].to(device), t["attention_mask"].to(device)))

    def step(ids: torch.Tensor, mask: torch.Tensor) -> None:
        with autocast_for(device, bf16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = mean_pool(out.float(), mask).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for ids, mask in batches[:warmup]:
        step(ids, mask)
    _sync(device)
    started = time.perf_counter()
    for ids, mask in batches[warmup:]:
        step(ids, mask)
    _sync(device)
    return steps * sequences / (time.perf_counter() - started)


def run(device_setting: str = "auto", seq_lens: tuple[int, ...] = (64, 128),
        batch: int | None = None, steps: int | None = None, warmup: int | None = None,
        compile_: bool = False, encoder_path: str | None = None) -> dict[str, Any]:
    device = pick_device(device_setting)
    gpu = device.type == "cuda"
    batch = batch or (1024 if gpu else 16)
    steps = steps or (30 if gpu else 3)
    warmup = max(1, warmup if warmup is not None else (5 if gpu else 1))  # ≥ 1: timed from its end
    bf16 = gpu
    peak, peak_source = peak_flops(device)
    enc = load_encoder(encoder_path)
    results = []
    for seq_len in seq_lens:
        pairs = bench_trainer(device, seq_len, batch, steps, warmup, bf16, compile_,
                              encoder_path)
        bare = bench_bare(device, seq_len, 2 * batch, steps, warmup, bf16, encoder_path)
        flops = flops_per_token(enc.model, seq_len) * seq_len * 2  # two sequences per pair
        results.append({
            "seq_len": seq_len, "pairs_per_s": round(pairs, 1),
            "bare_encoder_seq_per_s": round(bare, 1),
            "trainer_seq_per_s": round(2 * pairs, 1),
            "trainer_over_bare": round(2 * pairs / bare, 3) if bare else None,
            "mfu": round(pairs * flops / peak, 4) if math.isfinite(peak) else None,
        })
        if gpu:
            torch.cuda.empty_cache()
    frozen = bench_frozen(device, 256, 40 if not gpu else 100, 3, encoder_path)
    first = results[0]
    name = (torch.cuda.get_device_name(device) if gpu
            else f"cpu ({torch.get_num_threads()} threads)")
    return {
        "device": name,
        "torch": torch.__version__, "dtype": "bf16 autocast" if bf16 else "fp32",
        "batch_pairs": batch, "steps": steps, "warmup": warmup, "compile": compile_,
        "peak_flops": peak, "peak_source": peak_source,
        # The first sequence length at top level, all of them under "by_seq_len".
        "seq_len": first["seq_len"], "pairs_per_s": first["pairs_per_s"],
        "bare_encoder_seq_per_s": first["bare_encoder_seq_per_s"], "mfu": first["mfu"],
        "by_seq_len": results,
        "frozen_encoder": frozen,
    }
