"""The model store: versioned checkpoints (safetensors only) with manifests, a pointer to
the version being served, and the history that rollback walks back.

Layout under the store root (``TAILSTREAM_MODEL_DIR``, default ``{data_dir}/models``)::

    versions/v00001/model.safetensors   trainable weights (heads; the encoder if it trained)
    versions/v00001/manifest.json       version, parent, status, reason, policy, weights,
                                        data window, metrics, files' sha256, encoder
    CURRENT                             the served version ("base" before any promotion)
    history.jsonl                       one line per promotion / rollback
    decisions/v00001.json               the version's decision layer as last refreshed
                                        (``base.json`` for the base model): a trigger
                                        whose candidate was rejected refits the served
                                        version's thresholds; its weights never change

* **Safetensors only**: tensors load without unpickling anything, so a tampered file can
  corrupt numbers but never run code.
* **Integrity**: every load recomputes the sha256 of the weight file and compares it with
  the manifest; a mismatch raises :class:`CorruptCheckpoint` and nothing is loaded.
* **Paths cannot escape the root**: version names must match ``v\\d{5}`` (or ``base``) and
  resolved paths (symlinks followed) are checked to lie inside the root: a version folder
  inside ``versions/``, and its weight file and manifest inside that folder.
* **Atomic writes**: files are written to a temporary name and renamed, so a crash never
  leaves a half-written manifest or pointer behind; a version directory without a
  manifest is ignored.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tailstream.configs import BASE_VERSION
from tailstream.models.towers.encoder import file_sha256

_VERSION = re.compile(r"v\d{5}")  # always fullmatch: "$" would allow a trailing newline
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
STATUSES = ("candidate", "canary", "promoted", "rejected", "failed", "rolled_back")


class StoreError(RuntimeError):
    pass


class CorruptCheckpoint(StoreError):
    """A weight file does not match the sha256 in its manifest, or cannot be read."""


def check_version(version: str) -> str:
    """A version name, validated (no path tricks).

    >>> check_version("v00042")
    'v00042'
    >>> check_version("../etc")
    Traceback (most recent call last):
    ...
    tailstream.models.towers.store.StoreError: invalid model version '../etc'
    """
    if version != BASE_VERSION and not _VERSION.fullmatch(version):
        raise StoreError(f"invalid model version {version!r}")
    return version


@dataclass
class Checkpoint:
    version: str
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.versions_dir = self.root / "versions"

    # ------------------------------------------------------------------ paths
    def _dir(self, version: str) -> Path:
        check_version(version)
        path = (self.versions_dir / version).resolve()
        if not path.is_relative_to(self.versions_dir.resolve()) or \
                not path.is_relative_to(self.root):
            raise StoreError(f"version path escapes the store: {path}")
        return path

    def _file(self, version: str, name: str) -> Path:
        """A file of a version, checked to lie in the version's folder (a symlink to
        anywhere else is refused)."""
        folder = self._dir(version)
        path = (folder / name).resolve()
        if path.parent != folder:
            raise StoreError(f"{version}/{name} points outside its version folder: {path}")
        return path

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ versions
    def next_version(self) -> str:
        taken = [int(p.name[1:]) for p in self.versions_dir.glob("v*")
                 if _VERSION.fullmatch(p.name)]
        return f"v{max(taken, default=0) + 1:05d}"

    def save(self, tensors: Mapping[str, torch.Tensor], manifest: Mapping[str, Any],
             version: str | None = None) -> str:
        """Write a new version (status from the manifest, default ``candidate``)."""
        version = check_version(version or self.next_version())
        folder = self._dir(version)
        if (folder / MANIFEST_FILE).exists():
            raise StoreError(f"version {version} already exists")
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / WEIGHTS_FILE
        tmp = folder / f".{WEIGHTS_FILE}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"version": version})
        os.replace(tmp, weights)
        full = {"status": "candidate", **manifest, "version": version,
                "created_at": manifest.get("created_at", time.time()),
                "files": {WEIGHTS_FILE: file_sha256(weights)}}
        self._write_atomic(folder / MANIFEST_FILE, json.dumps(full, indent=2,
                                                               default=_json_default).encode())
        return version

    def manifest(self, version: str) -> dict[str, Any]:
        path = self._file(version, MANIFEST_FILE)
        try:
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise StoreError(f"no model version {version}") from None
        except ValueError as exc:
            raise CorruptCheckpoint(f"manifest of {version} is not JSON: {exc}") from exc

    def update_manifest(self, version: str, **fields: Any) -> dict[str, Any]:
        manifest = {**self.manifest(version), **fields}
        self._write_atomic(self._dir(version) / MANIFEST_FILE,
                           json.dumps(manifest, indent=2, default=_json_default).encode())
        return manifest

    def load(self, version: str) -> Checkpoint:
        """Weights and manifest of a version, after the sha256 check."""
        manifest = self.manifest(version)
        path = self._file(version, WEIGHTS_FILE)
        files = manifest.get("files")
        expected = files.get(WEIGHTS_FILE) if isinstance(files, dict) else None
        if not isinstance(expected, str) or len(expected) != 64:
            raise CorruptCheckpoint(f"{version}: the manifest holds no sha256 of "
                                    f"{WEIGHTS_FILE}; refusing to load it")
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise CorruptCheckpoint(f"{version}: cannot read weights: {exc}") from exc
        if actual != expected:
            raise CorruptCheckpoint(f"{version}: sha256 {actual[:12]}… does not match the "
                                    f"manifest's {str(expected)[:12]}…")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptCheckpoint(f"{version}: unreadable weights: {exc}") from exc
        return Checkpoint(version, manifest, tensors)

    def versions(self) -> list[dict[str, Any]]:
        """Manifests of every version, oldest first (folders without one are skipped)."""
        out = []
        for p in sorted(self.versions_dir.glob("v*")):
            if _VERSION.fullmatch(p.name) and (p / MANIFEST_FILE).exists():
                try:
                    out.append(self.manifest(p.name))
                except StoreError:
                    continue
        return out

    # ------------------------------------------------------------------ decisions
    def _decisions_file(self, version: str) -> Path:
        return self.root / "decisions" / f"{check_version(version)}.json"

    def save_decisions(self, version: str, layer: Mapping[str, Any],
                       info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record a refreshed decision layer for ``version`` (which keeps its weights and
        manifest): it replaces the manifest's ``decisions`` wherever the version is
        loaded from now on (:func:`~tailstream.models.towers.loading.load_served`)."""
        if version != BASE_VERSION:
            self.manifest(version)  # a refresh is for a version that exists
        entry = {**(info or {}), "version": version, "at": time.time(),
                 "decisions": dict(layer)}
        self._write_atomic(self._decisions_file(version),
                           json.dumps(entry, default=_json_default).encode())
        return entry

    def refreshed_decisions(self, version: str) -> dict[str, Any] | None:
        """The last refresh of ``version``'s decision layer (:meth:`save_decisions`), or
        None; an unreadable file counts as none (the manifest's layer serves)."""
        try:
            entry = json.loads(self._decisions_file(version).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) and isinstance(entry.get("decisions"),
                                                               dict) else None

    # ------------------------------------------------------------------ serving pointer
    def current(self) -> str:
        """The version being served (``base`` before any promotion)."""
        try:
            return check_version((self.root / "CURRENT").read_text().strip() or BASE_VERSION)
        except FileNotFoundError:
            return BASE_VERSION

    def promote(self, version: str, reason: str, metrics: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
        """Point CURRENT at ``version`` (after an integrity check) and log it."""
        if version != BASE_VERSION:
            self.load(version)  # refuse to serve a corrupt checkpoint
            self.update_manifest(version, status="promoted", reason=reason,
                                 promoted_at=time.time())
        previous = self.current()
        self._write_atomic(self.root / "CURRENT", version.encode())
        entry = {"at": time.time(), "action": "promote", "version": version,
                 "previous": previous, "reason": reason, "metrics": dict(metrics or {})}
        self._append_history(entry)
        return entry

    def reject(self, version: str, reason: str, status: str = "rejected") -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.update_manifest(version, status=status, reason=reason)

    def lineage(self) -> list[str]:
        """The promotions still in force, oldest first (``base`` first): what a rollback
        walks back through, and what a worker falls back on when the current version
        cannot be loaded."""
        stack = [BASE_VERSION]
        for entry in self.history():
            if entry["action"] == "promote" and entry["version"] != stack[-1]:
                stack.append(entry["version"])
            elif entry["action"] == "rollback" and len(stack) > 1:
                stack.pop()
        return stack

    def fallbacks(self) -> list[str]:
        """Versions to serve, best first: the current one, then the earlier promotions
        still in force, newest first, then ``base``."""
        out = [self.current()]
        for version in reversed(self.lineage()):
            if version not in out:
                out.append(version)
        return out if BASE_VERSION in out else [*out, BASE_VERSION]

    def rollback(self, reason: str = "manual rollback") -> dict[str, Any]:
        """Serve the version that was current before the current one."""
        current = self.current()
        stack = self.lineage()
        if len(stack) < 2 or stack[-1] != current:
            raise StoreError(f"nothing to roll back to from {current}")
        target = stack[-2]
        if target != BASE_VERSION:
            self.load(target)
        if current != BASE_VERSION:
            self.update_manifest(current, status="rolled_back", reason=reason)
        self._write_atomic(self.root / "CURRENT", target.encode())
        entry = {"at": time.time(), "action": "rollback", "version": target,
                 "previous": current, "reason": reason}
        self._append_history(entry)
        return entry

    def history(self) -> list[dict[str, Any]]:
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _append_history(self, entry: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "history.jsonl", "a") as fh:
            fh.write(json.dumps(entry, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
