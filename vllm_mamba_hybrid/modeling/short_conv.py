"""The mixers' short causal convolution over (batch, length, channels) activations."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import causal_conv1d_fn, causal_conv1d_update


def apply_short_conv(x: torch.Tensor, conv1d: nn.Conv1d,
                     conv_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(conv1d(x)) continuing from ``conv_state`` (the last d_conv-1 inputs, or None for
    a fresh sequence). A single token with a state takes the O(1) update path.
    Returns (out (b, l, c), new_state (b, c, d_conv-1))."""
    weight = conv1d.weight.squeeze(1)
    if conv_state is not None and x.shape[1] == 1:
        out, new_state = causal_conv1d_update(x[:, 0], conv_state, weight, conv1d.bias)
        return out.unsqueeze(1), new_state
    out, new_state = causal_conv1d_fn(x.transpose(1, 2), weight, conv1d.bias, conv_state)
    return out.transpose(1, 2), new_state
