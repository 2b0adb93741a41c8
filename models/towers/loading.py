"""Building the recommender from the base encoder, and moving it in and out of the store.

* The **base** model is the pretrained encoder plus seeded tower/head initialisation:
  every process builds the identical one, so it needs no checkpoint.
* A **checkpoint** holds the non-encoder weights always, and the encoder's weights only
  when a fine-tune changed them (LoRA adapters are merged first), so a head-only run on
  the CPU writes a few hundred KB instead of 90 MB.
* The manifest names the base encoder by the sha256 of its weights: a checkpoint is never
  loaded on top of a different encoder.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tailstream.configs import BASE_VERSION, TowerConfig, base_version_name
from tailstream.models.towers.adapters import encoder_trains, merge_lora
from tailstream.models.towers.encoder import LoadedEncoder, load_encoder
from tailstream.models.towers.store import ModelStore, StoreError
from tailstream.models.towers.two_tower import ADDED_WEIGHTS, TwoTowerRecommender


@dataclass
class ServedModel:
    """A model ready to score: its version and the fingerprint its text vectors key on."""

    version: str
    model: TwoTowerRecommender
    tokenizer: Any
    text_fingerprint: str
    manifest: dict[str, Any]


def build_model(encoder: LoadedEncoder, tower: TowerConfig) -> TwoTowerRecommender:
    return TwoTowerRecommender(encoder.model, encoder.hidden_size, tower)


def tensors_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes, in name order (identifies fine-tuned encoder weights)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def checkpoint_tensors(model: TwoTowerRecommender, parent_included_encoder: bool = False
                       ) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors to save and whether they include the encoder: when it trained, or when
    the parent already carried fine-tuned encoder weights (which the base would lose).
    Works on a copy when adapters must be merged, so the caller's model is unchanged."""
    include_encoder = encoder_trains(model.encoder) or parent_included_encoder
    if not include_encoder:
        return {k: v.detach().cpu() for k, v in model.head_state().items()}, False
    merged = copy.deepcopy(model).cpu()
    merge_lora(merged.encoder)
    return {k: v.detach().cpu() for k, v in merged.state_dict().items()}, True


def load_served(store: ModelStore, version: str, encoder_path: str | Path | None,
                tower_default: TowerConfig, device: torch.device) -> ServedModel:
    """Load ``version`` (or build the base model) on ``device`` in eval mode.

    Raises :class:`~tailstream.models.towers.store.CorruptCheckpoint` on an integrity failure and
    :class:`StoreError` when the checkpoint belongs to another encoder.
    """
    encoder = load_encoder(encoder_path)
    if version == BASE_VERSION:
        model = build_model(encoder, tower_default)
        return ServedModel(base_version_name(encoder.fingerprint), _ready(model, device),
                           encoder.tokenizer, encoder.fingerprint,
                           with_refreshed_decisions(store, BASE_VERSION, {
                               "version": BASE_VERSION,
                               "encoder": {"base_fingerprint": encoder.fingerprint}}))
    ckpt = store.load(version)
    info = ckpt.manifest.get("encoder", {})
    if info.get("base_fingerprint") != encoder.fingerprint:
        raise StoreError(f"{version} was trained on encoder {info.get('base_fingerprint')}, "
                         f"but {encoder.path} is {encoder.fingerprint}")
    tower = TowerConfig.from_dict(ckpt.manifest.get("tower", tower_default.to_dict()))
    model = build_model(encoder, tower)
    state = model.state_dict()
    # Weights added to the model after a checkpoint was written keep their initial
    # values, which reproduce the older model (the wide part starts at zero): a store
    # written by an older release keeps serving and training after an upgrade.
    missing = [k for k in model.head_state()
               if k not in ckpt.tensors and k not in ADDED_WEIGHTS]
    if missing:
        raise StoreError(f"{version} lacks weights {missing[:3]}")
    unknown = [k for k in ckpt.tensors if k not in state]
    if unknown:
        raise StoreError(f"{version} has weights the model does not: {unknown[:3]}")
    model.load_state_dict(ckpt.tensors, strict=False)
    fingerprint = (info.get("fingerprint") or encoder.fingerprint) if info.get("included") \
        else encoder.fingerprint
    return ServedModel(version, _ready(model, device), encoder.tokenizer, str(fingerprint),
                       with_refreshed_decisions(store, version, ckpt.manifest))


def with_refreshed_decisions(store: ModelStore, version: str, manifest: dict[str, Any]
                             ) -> dict[str, Any]:
    """``manifest`` with its decision layer replaced by the store's last refresh of it
    (:meth:`~tailstream.models.towers.store.ModelStore.save_decisions`), if any: a worker
    that starts later serves the thresholds the running ones were sent."""
    refreshed = store.refreshed_decisions(version)
    if refreshed is None:
        return manifest
    return {**manifest, "decisions": refreshed["decisions"],
            "decisions_refreshed_at": refreshed.get("at")}


def _ready(model: TwoTowerRecommender, device: torch.device) -> TwoTowerRecommender:
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pick_device(setting: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("TAILSTREAM_DEVICE=cuda but torch sees no GPU")
    return torch.device(setting)


def resolve_finetune_layers(setting: str, device: torch.device, num_layers: int) -> int:
    """``auto`` → every layer on CUDA, 0 (heads only, cached text vectors) on CPU;
    ``all`` → -1; a number → that many top layers.

    >>> resolve_finetune_layers("auto", torch.device("cpu"), 6)
    0
    >>> resolve_finetune_layers("2", torch.device("cpu"), 6)
    2
    """
    if setting == "auto":
        return -1 if device.type == "cuda" else 0
    if setting == "all":
        return -1
    n = int(setting)
    return -1 if n >= num_layers else n
