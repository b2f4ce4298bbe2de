"""Gated RMSNorm of Mamba2 (mamba_ssm's ``RMSNormGated``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dtype import compute_dtype, no_autocast


@no_autocast
def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """RMSNorm over groups of ``group_size`` channels, gated by ``silu(z)``.

    ``norm_before_gate=False`` (the paper's setting) gates first:
    ``rmsnorm(x * silu(z)) * weight``; each group is normalised on its own, so a
    Mamba2InLlama layer normalises every head separately.
    """
    dtype = x.dtype
    cd = compute_dtype(x)
    h = x.to(cd)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(cd))
    group_size = group_size or h.shape[-1]
    if h.shape[-1] % group_size:
        raise ValueError(f"width {h.shape[-1]} is not a multiple of group_size {group_size}")
    grouped = h.unflatten(-1, (-1, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    h = grouped.flatten(-2) * weight.to(cd)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(cd))
    return h.to(dtype)
