"""Preallocated decoding state: KV slots for attention layers, conv/SSM state for Mamba layers.

Why static: a CUDA graph replays fixed addresses, so every tensor a decode step
touches must exist before capture and be updated in place. Row b of the batch
owns KV slots ``[start[b], end[b])`` (left padding sits in ``[0, start[b])``); the
next token of row b goes to slot ``end[b]`` and has RoPE position
``end[b] - start[b]``. ``start``/``end`` are device tensors, so rows may advance
by different amounts (speculative decoding) without re-capturing.

For speculation the Mamba states after each of the last few tokens are recorded
in ``*_hist`` ((history, batch, ...)); rolling a row back to its n-th token is a
gather, not a recomputation.
"""
from __future__ import annotations

import torch

from ..config import LlamaMambaHybridConfig
from ..modeling.cache import HybridCache


def mamba_state_shapes(config: LlamaMambaHybridConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sequence (conv, ssm) state shapes of one Mamba layer (as in MambaLayerState)."""
    conv = (config.conv_dim, config.d_conv - 1)
    if config.mamba_variant == "mamba2":
        ssm = (config.mamba_nheads, config.d_state, config.d_state)
    else:
        ssm = (config.d_inner, config.d_state)
    return conv, ssm


def bytes_per_sequence(config: LlamaMambaHybridConfig, context: int, dtype=torch.bfloat16) -> int:
    """Decoding-state bytes one sequence of ``context`` tokens needs (KV + conv + fp32 SSM)."""
    esize = torch.empty((), dtype=dtype).element_size()
    kv = 2 * config.num_key_value_heads * config.head_dim * context * esize
    conv, ssm = mamba_state_shapes(config)
    state = conv[0] * conv[1] * esize + 4 * int(torch.tensor(ssm).prod())
    return len(config.attn_layers) * kv + len(config.mamba_layers) * state


class StaticHybridCache:
    def __init__(self, config: LlamaMambaHybridConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, history: int = 0):
        self.config, self.batch_size, self.max_len, self.history = config, batch_size, max_len, history
        kw = dict(device=device)
        self.start = torch.zeros(batch_size, dtype=torch.long, **kw)
        self.end = torch.zeros(batch_size, dtype=torch.long, **kw)
        self.hist_pos = torch.zeros((), dtype=torch.long, **kw)
        self.key, self.value, self.conv, self.ssm = {}, {}, {}, {}
        self.conv_hist, self.ssm_hist = {}, {}
        kv_shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        conv, ssm = mamba_state_shapes(config)
        for i in range(config.num_hidden_layers):
            if config.is_attention_layer(i):
                # zeros, not empty: masked slots still enter p @ V, and garbage could be NaN
                self.key[i] = torch.zeros(kv_shape, dtype=dtype, **kw)
                self.value[i] = torch.zeros(kv_shape, dtype=dtype, **kw)
            else:
                self.conv[i] = torch.zeros((batch_size, *conv), dtype=dtype, **kw)
                self.ssm[i] = torch.zeros((batch_size, *ssm), dtype=torch.float32, **kw)
                if history:
                    self.conv_hist[i] = torch.zeros((history, batch_size, *conv), dtype=dtype, **kw)
                    self.ssm_hist[i] = torch.zeros((history, batch_size, *ssm), dtype=torch.float32, **kw)
        self._rows = torch.arange(batch_size, **kw)

    def nbytes(self) -> int:
        tensors = [*self.key.values(), *self.value.values(), *self.conv.values(), *self.ssm.values(),
                   *self.conv_hist.values(), *self.ssm_hist.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def load_prefill(self, cache: HybridCache, attention_mask: torch.Tensor) -> None:
        """Take over a reference HybridCache filled by a (left-padded) prompt forward."""
        width = attention_mask.shape[1]
        if width > self.max_len:
            raise ValueError(f"prompt of {width} tokens exceeds the cache ({self.max_len} slots)")
        for i, entry in enumerate(cache.layers):
            if i in self.key:
                self.key[i][:, :, :width].copy_(entry.key)
                self.value[i][:, :, :width].copy_(entry.value)
            else:
                self.conv[i].copy_(entry.conv)
                self.ssm[i].copy_(entry.ssm)
        self.end.fill_(width)
        self.start.copy_(width - attention_mask.long().sum(-1))

    @torch.no_grad()
    def fill_random(self, context: int, generator: torch.Generator | None = None) -> None:
        """Benchmarks: ``context`` tokens of random KV/state (decode cost does not depend on
        the values), instead of a long prefill."""
        for t in (*self.key.values(), *self.value.values()):
            t[:, :, :context].normal_(generator=generator)
        for t in (*self.conv.values(), *self.ssm.values()):
            t.normal_(std=0.1, generator=generator)
        self.start.zero_()
        self.end.fill_(context)

    def record(self, layer: int, t: int = 0) -> None:
        """Save layer's Mamba state as history entry ``hist_pos + t`` (state after that token)."""
        if layer in self.conv_hist:
            idx = (self.hist_pos + t).view(1)
            self.conv_hist[layer].index_copy_(0, idx, self.conv[layer].unsqueeze(0))
            self.ssm_hist[layer].index_copy_(0, idx, self.ssm[layer].unsqueeze(0))

    def rollback(self, keep: torch.Tensor, fed: int) -> None:
        """After feeding ``fed`` tokens with history recorded from entry 0, keep the first
        ``keep[b] + 1`` of them in row b: Mamba state from history, KV by moving ``end``
        (later writes overwrite the rejected slots)."""
        self.end.sub_(fed - 1).add_(keep)
        for i in self.conv_hist:
            self.conv[i].copy_(self.conv_hist[i][keep, self._rows])
            self.ssm[i].copy_(self.ssm_hist[i][keep, self._rows])
