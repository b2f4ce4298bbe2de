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
