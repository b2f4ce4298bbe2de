"""Depthwise causal conv1d (the short convolution in front of every SSM).

The state of a sequence is its last ``width - 1`` inputs (channel-major,
``(batch, dim, width - 1)``), so a prefill, a chunk continuation and a decode
step are the same function with a different initial state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dtype import compute_dtype


def activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation in ("silu", "swish"):
        return F.silu(x)
    raise ValueError(f"unsupported activation {activation!r} (expected 'silu' or None)")


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (batch, dim, seqlen); weight: (dim, width); initial_state: (batch, dim, width-1).

    Returns ``(out (batch, dim, seqlen), final_state (batch, dim, width-1))``.
    """
    batch, dim, _ = x.shape
    cd = compute_dtype(x)
    width = weight.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, width - 1)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=-1).to(cd)
    out = F.conv1d(padded, weight.to(cd).unsqueeze(1),
                   None if bias is None else bias.to(cd), groups=dim)
    final_state = padded[..., padded.shape[-1] - (width - 1):]
    return activate(out, activation).to(x.dtype), final_state.to(x.dtype)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. x: (batch, dim); conv_state: (batch, dim, width-1).

    Returns ``(out (batch, dim), new_state (batch, dim, width-1))``.
    """
    cd = compute_dtype(x)
    window = torch.cat([conv_state.to(cd), x.to(cd).unsqueeze(-1)], dim=-1)
    out = (window * weight.to(cd)).sum(-1)
    if bias is not None:
        out = out + bias.to(cd)
    return activate(out, activation).to(x.dtype), window[..., 1:].to(conv_state.dtype)
