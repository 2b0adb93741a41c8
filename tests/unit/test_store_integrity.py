"""The model store refuses what it cannot trust: altered bytes, manifests without a
checksum, paths out of the store (``..``, absolute, symlinks), and anything but
safetensors; the served version stays what it was."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from tailstream.models.towers.store import (
    BASE_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CorruptCheckpoint,
    ModelStore,
    StoreError,
)


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(4, 8, generator=g), "head.bias": torch.zeros(4)}


def store_with_two(tmp_path: Path) -> ModelStore:
    """v00001 promoted (CURRENT), v00002 a candidate."""
    store = ModelStore(tmp_path / "models")
    assert store.save(tensors(1), {"parent": BASE_VERSION}) == "v00001"
    store.promote("v00001", "first")
    assert store.save(tensors(2), {"parent": "v00001"}) == "v00002"
    return store


def weights_path(store: ModelStore, version: str) -> Path:
    return store.root / "versions" / version / WEIGHTS_FILE


def flip_byte(path: Path, at: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))


class Boom:
    """A pickle that, if ever unpickled, writes a marker file (code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling during the test fails it."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the store unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("where", ["header", "data", "last"])
def test_altered_bytes_are_rejected_and_current_stays(tmp_path: Path, where: str) -> None:
    store = store_with_two(tmp_path)
    path = weights_path(store, "v00002")
    size = path.stat().st_size
    flip_byte(path, {"header": 3, "data": size // 2, "last": size - 1}[where])
    with pytest.raises(CorruptCheckpoint, match=r"v00002: sha256 .* does not match"):
        store.load("v00002")
    history = store.history()
    with pytest.raises(CorruptCheckpoint):
        store.promote("v00002", "would serve a corrupt file")
    assert store.current() == "v00001"
    assert store.history() == history  # nothing logged
    assert store.manifest("v00002")["status"] == "candidate"
    assert torch.equal(store.load("v00001").tensors["head.weight"], tensors(1)["head.weight"])


def test_truncated_or_missing_weights_are_rejected(tmp_path: Path) -> None:
    store = store_with_two(tmp_path)
    path = weights_path(store, "v00002")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpoint, match="does not match"):
        store.load("v00002")
    path.unlink()
    with pytest.raises(CorruptCheckpoint, match="cannot read weights"):
        store.load("v00002")
    assert store.current() == "v00001"


@pytest.mark.parametrize("files", [None, {}, {WEIGHTS_FILE: ""}, {WEIGHTS_FILE: 42}, []])
def test_a_manifest_without_the_checksum_is_rejected(tmp_path: Path, files: Any) -> None:
    store = store_with_two(tmp_path)
    manifest_path = store.root / "versions" / "v00002" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    if files is None:
        del manifest["files"]
    else:
        manifest["files"] = files
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="no sha256"):
        store.load("v00002")
    manifest_path.write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="not JSON"):
        store.load("v00002")


def test_rollback_to_a_corrupt_version_is_refused(tmp_path: Path) -> None:
    store = store_with_two(tmp_path)
    store.promote("v00002", "second")
    flip_byte(weights_path(store, "v00001"), 100)
    with pytest.raises(CorruptCheckpoint):
        store.rollback("back to a corrupt version")
    assert store.current() == "v00002"
    assert store.manifest("v00002")["status"] == "promoted"


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/etc/passwd", "v00001/..",
                                  "v00001/../../x", "v1", "v000001", "latest", "", "v0000a",
                                  "base/../x", "v00001\n", "./v00001"])
def test_version_names_that_could_escape_are_refused(tmp_path: Path, name: str) -> None:
    store = store_with_two(tmp_path)
    for call in (store.manifest, store.load):
        with pytest.raises(StoreError):
            call(name)
    with pytest.raises(StoreError):
        store.promote(name, "escape")
    if name:  # (save with no version name picks the next one)
        with pytest.raises(StoreError):
            store.save(tensors(), {}, version=name)
    assert [m["version"] for m in store.versions()] == ["v00001", "v00002"]
    (store.root / "CURRENT").write_text(name)
    if not re.fullmatch(r"v\d{5}|", name.strip()):  # CURRENT is read stripped
        with pytest.raises(StoreError):
            store.current()


def test_symlinks_out_of_the_store_are_refused(tmp_path: Path) -> None:
    store = store_with_two(tmp_path)
    outside = tmp_path / "outside"
    # A version folder that is a symlink to a folder outside the store, holding a
    # consistent checkpoint (manifest and sha256 match): refused all the same.
    other = ModelStore(outside)
    other.save(tensors(9), {"parent": BASE_VERSION}, version="v00003")
    (store.root / "versions" / "v00003").symlink_to(outside / "versions" / "v00003")
    with pytest.raises(StoreError, match="escapes the store"):
        store.load("v00003")
    with pytest.raises(StoreError):
        store.promote("v00003", "from outside")
    assert "v00003" not in [m["version"] for m in store.versions()]
    # A weight file (or manifest) that is a symlink out of its version folder.
    folder = store.root / "versions" / "v00002"
    (folder / WEIGHTS_FILE).unlink()
    (folder / WEIGHTS_FILE).symlink_to(outside / "versions" / "v00003" / WEIGHTS_FILE)
    with pytest.raises(StoreError, match="outside its version folder"):
        store.load("v00002")
    (folder / MANIFEST_FILE).unlink()
    (folder / MANIFEST_FILE).symlink_to(outside / "versions" / "v00003" / MANIFEST_FILE)
    with pytest.raises(StoreError, match="outside its version folder"):
        store.manifest("v00002")
    # The whole versions folder pointing elsewhere.
    moved = ModelStore(tmp_path / "models2")
    (tmp_path / "models2").mkdir()
    (tmp_path / "models2" / "versions").symlink_to(outside / "versions")
    with pytest.raises(StoreError, match="escapes the store"):
        moved.load("v00003")
    assert store.current() == "v00001"


def test_only_safetensors_are_ever_loaded(tmp_path: Path, no_unpickling: None) -> None:
    store = store_with_two(tmp_path)
    marker = tmp_path / "pwned"
    folder = store.root / "versions" / "v00002"
    payload = pickle.dumps(Boom(marker))
    # Pickles beside the weights, under every name a loader might look for.
    for name in ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.pkl",
                 "optimizer.pt"):
        (folder / name).write_bytes(payload)
    ckpt = store.load("v00002")
    assert set(ckpt.tensors) == {"head.weight", "head.bias"}
    # A pickle *as* the weight file, with a manifest whose sha256 matches it (say, a
    # trainer bug or a hand-made "checkpoint"): its checksum passes, safetensors refuses
    # to parse it, nothing is unpickled.
    (folder / WEIGHTS_FILE).write_bytes(payload)
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][WEIGHTS_FILE] = hashlib.sha256(payload).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="unreadable weights"):
        store.load("v00002")
    # A version folder holding only a pickle (no safetensors, no manifest) is not a version.
    (store.root / "versions" / "v00004").mkdir()
    (store.root / "versions" / "v00004" / "pytorch_model.bin").write_bytes(payload)
    assert [m["version"] for m in store.versions()] == ["v00001", "v00002"]
    with pytest.raises(StoreError):
        store.load("v00004")
    assert not marker.exists()
    assert store.current() == "v00001"


def test_the_weight_file_is_plain_safetensors(tmp_path: Path) -> None:
    """What save writes starts with a safetensors header (8-byte length + JSON), no pickle
    opcodes, and its sha256 is in the manifest."""
    store = store_with_two(tmp_path)
    blob = weights_path(store, "v00001").read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    assert set(header) >= {"head.weight", "head.bias"}
    assert not blob.startswith(b"\x80")  # pickle protocol 2+ magic
    assert len(store.manifest("v00001")["files"][WEIGHTS_FILE]) == 64
    assert os.access(weights_path(store, "v00001"), os.R_OK)
