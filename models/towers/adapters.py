"""Which encoder weights a fine-tune trains: none, the top N layers, or LoRA adapters.

* ``layers = 0``: the encoder is frozen; only the towers and the outcome head train. Text
  vectors can then be cached (the trainer and the scorer reuse them across versions).
* ``layers = N`` (``-1``: all): the top N transformer layers train, the rest stay frozen;
  autograd records nothing below the first trainable layer, so the cost falls with N.
* ``lora_rank = r > 0``: instead of updating those layers' weights, low-rank adapters
  ``W x + (α / r) · B A x`` are added to their attention query and value projections
  (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; the paper
  adapts W_q and W_v). ``B`` starts at zero, so a fresh adapter changes nothing.
  :func:`merge_lora` folds adapters back into plain ``Linear`` weights before a
  checkpoint is written, so serving never needs adapter code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · x Aᵀ Bᵀ`` with ``base`` frozen.

    >>> lin = nn.Linear(4, 3)
    >>> lora = LoRALinear(lin, rank=2)
    >>> x = torch.randn(5, 4)
    >>> bool(torch.allclose(lora(x), lin(x)))   # B = 0 at the start
    True
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be >= 1")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
        return self.base(x) + delta * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear equal to this module."""
        out = nn.Linear(self.base.in_features, self.base.out_features,
                        bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scaling * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


def transformer_layers(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's transformer blocks, bottom first (BERT-style ``encoder.layer``)."""
    stack = getattr(getattr(encoder, "encoder", None), "layer", None)
    if stack is None:
        raise ValueError(f"{type(encoder).__name__} has no encoder.layer stack")
    return list(stack)


def configure_trainable(encoder: nn.Module, layers: int, lora_rank: int = 0,
                        lora_alpha: float = 16.0) -> int:
    """Freeze the encoder except the top ``layers`` blocks (``-1``: all; embeddings train
    only then), optionally through LoRA adapters; returns the number of trainable
    encoder parameters.

    >>> from transformers import BertConfig, BertModel
    >>> enc = BertModel(BertConfig(hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
    ...                            intermediate_size=16, vocab_size=50), add_pooling_layer=False)
    >>> configure_trainable(enc, layers=0)
    0
    >>> configure_trainable(enc, layers=1, lora_rank=2)   # q and v of the top block
    64
    """
    blocks = transformer_layers(encoder)
    n = len(blocks) if layers < 0 else min(layers, len(blocks))
    for p in encoder.parameters():
        p.requires_grad_(False)
    chosen = blocks[len(blocks) - n:] if n else []
    for block in chosen:
        if lora_rank > 0:
            attn: Any = block.get_submodule("attention.self")
            attn.query = LoRALinear(attn.query, lora_rank, lora_alpha)
            attn.value = LoRALinear(attn.value, lora_rank, lora_alpha)
        else:
            for p in block.parameters():
                p.requires_grad_(True)
    if layers < 0 and lora_rank <= 0:
        for p in encoder.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def merge_lora(module: nn.Module) -> int:
    """Replace every :class:`LoRALinear` inside ``module`` by its merged Linear; returns
    how many were merged."""
    merged = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
            merged += 1
        else:
            merged += merge_lora(child)
    return merged


def encoder_trains(encoder: nn.Module) -> bool:
    """Whether any encoder weight (or adapter) is trainable."""
    return any(p.requires_grad for p in encoder.parameters())
