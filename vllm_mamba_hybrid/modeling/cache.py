"""Decoding state of a hybrid: KV cache for attention layers, conv/SSM state for Mamba layers."""
from __future__ import annotations

import torch

from ..config import LlamaMambaHybridConfig
from .attention import KVCacheEntry
from .mamba_state import MambaLayerState


class HybridCache:
    """One entry per layer, created empty and filled by the first forward."""

    def __init__(self, config: LlamaMambaHybridConfig):
        self.layers: list[KVCacheEntry | MambaLayerState] = [
            KVCacheEntry() if config.is_attention_layer(i) else MambaLayerState()
            for i in range(config.num_hidden_layers)]
        self.seen_tokens = 0

    def select(self, index: torch.Tensor) -> "HybridCache":
        """Keep only the batch rows in ``index``."""
        out = HybridCache.__new__(HybridCache)
        out.layers = [entry.select(index) for entry in self.layers]
        out.seen_tokens = self.seen_tokens
        return out

    @staticmethod
    def stack(caches: list["HybridCache"]) -> tuple["HybridCache", torch.Tensor]:
        """Rows' caches of different lengths as one left-padded batch.

        Returns the batched cache and its attention mask (batch, longest length), 0 on
        padding; a forward with ``attention_mask = cat([mask, ones])`` then decodes
        every row at its own position. Mamba states stack as they are (a row never fed
        gets the zero state a fresh sequence starts from)."""
        lengths = [c.seen_tokens for c in caches]
        width = max(lengths)
        out = HybridCache.__new__(HybridCache)
        out.seen_tokens = width
        out.layers = [type(entries[0]).stack(entries, width)
                      for entries in zip(*(c.layers for c in caches))]
        mask = torch.zeros(len(caches), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, width - n:] = 1
        return out, mask

    def row(self, i: int, pad: int) -> "HybridCache":
        """Row ``i`` of a batched cache without its ``pad`` left-padding columns
        (views: forwards replace cache tensors, never write them)."""
        out = HybridCache.__new__(HybridCache)
        out.layers = [entry.row(i, pad) for entry in self.layers]
        out.seen_tokens = self.seen_tokens - pad
        return out
