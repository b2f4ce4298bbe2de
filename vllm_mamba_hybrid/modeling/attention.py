"""Llama attention with an explicit KV cache (same parameter names as transformers').

Kept separate from transformers' LlamaAttention so the hybrid's cache (KV for
attention layers, conv/SSM state for Mamba layers) is one plain object.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..config import LlamaMambaHybridConfig


class KVCacheEntry:
    """Keys and values of one layer, (batch, kv_heads, seq, head_dim), grown by concatenation."""

    def __init__(self):
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def append(self, key: torch.Tensor, value: torch.Tensor):
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value

    def select(self, index: torch.Tensor) -> "KVCacheEntry":
        out = KVCacheEntry()
        out.key, out.value = self.key[index], self.value[index]
        return out

    @staticmethod
    def stack(entries: list["KVCacheEntry"], width: int) -> "KVCacheEntry":
        """One-row entries as a batch, left-padded with zeros to ``width`` positions."""
        out = KVCacheEntry()
        like = next((e.key for e in entries if e.key is not None), None)
        if like is None:
            return out

        def padded(t):
            length = 0 if t is None else t.shape[2]
            pad = like.new_zeros(1, like.shape[1], width - length, like.shape[3])
            return pad if t is None else torch.cat([pad, t], dim=2)

        out.key = torch.cat([padded(e.key) for e in entries])
        out.value = torch.cat([padded(e.value) for e in entries])
        return out

    def row(self, i: int, pad: int) -> "KVCacheEntry":
        """Row ``i`` without its first ``pad`` (padding) positions, as views."""
        out = KVCacheEntry()
        if self.key is not None:
            out.key, out.value = self.key[i:i + 1, :, pad:], self.value[i:i + 1, :, pad:]
        return out


class HybridAttention(nn.Module):
    def __init__(self, config: LlamaMambaHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attn_mask: torch.Tensor | None, cache: KVCacheEntry | None = None) -> torch.Tensor:
        """attn_mask: boolean (b, 1, q, kv) where True = may attend; None = plain causal."""
        b, l, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and l > 1,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))
