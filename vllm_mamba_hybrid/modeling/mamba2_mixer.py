"""Mamba2 mixer of Mamba2InLlama: one SSM head per attention head.

Layout (``layout.mamba2_in_proj``): ``in_proj`` rows ``[z | x | B | C | dt]``; the causal
conv runs over ``x||B||C`` before x and B are repeated to all heads (GQA-style); the SSM
state of each head is ``d_state x d_state`` (head_dim squared); ``norm`` is a gated RMSNorm
applied per head.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from ..config import LlamaMambaHybridConfig
from ..layout import mamba2_conv_channels, mamba2_in_proj_parts
from ..ops import gated_rms_norm, ssd_state_update
from ..ops.scan_impl import mamba2_scan
from .mamba_state import MambaLayerState
from .short_conv import apply_short_conv


def inverse_softplus_dt(n: int, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4) -> torch.Tensor:
    """dt bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z)) * weight`` per group of ``group_size`` channels."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(y, z, self.weight, self.eps, self.group_size, norm_before_gate=False)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: LlamaMambaHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner, self.d_xb, self.d_state = config.d_inner, config.d_xb, config.d_state
        self.nheads = config.mamba_nheads
        self.headdim = config.d_state
        self.repeat_group = config.repeat_group
        self.chunk_size = config.ssm_chunk_size
        self.conv_dim = config.conv_dim
        self.in_proj_parts = list(mamba2_in_proj_parts(config).values())
        self.conv_channels = list(mamba2_conv_channels(config).values())
        self.in_proj = nn.Linear(config.hidden_size, sum(self.in_proj_parts), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_state, eps=config.mamba_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba2's init: A ~ U[1, 16] (stored as log), dt log-uniform, D = 1."""
        init.copy_(self.A_log, torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        init.copy_(self.dt_bias, inverse_softplus_dt(self.nheads))
        init.ones_(self.D)

    def project(self, hidden_states: torch.Tensor):
        """in_proj, split into (z, xBC, dt): xBC is the conv's input."""
        return self.in_proj(hidden_states).split(self.in_proj_parts, dim=-1)

    def split_xbc(self, xBC: torch.Tensor):
        """The conv's output, split into (x, B, C)."""
        return xBC.split(self.conv_channels, dim=-1)

    def forward(self, hidden_states: torch.Tensor, state: MambaLayerState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: (b, l, hidden); mask: (b, l), 0 on padding (left padding of a
        fresh sequence or right padding). ``state`` is read and replaced in place."""
        b, l, _ = hidden_states.shape
        z, xBC, dt = self.project(hidden_states)
        if mask is not None:
            xBC = xBC * mask.unsqueeze(-1).to(xBC.dtype)
        step = state is not None and state.conv is not None and l == 1
        xBC, new_conv = apply_short_conv(xBC, self.conv1d, None if state is None else state.conv)
        x, B, C = self.split_xbc(xBC)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        x = x.reshape(b, l, -1, self.headdim).repeat_interleave(self.repeat_group, dim=2)
        B = B.reshape(b, l, -1, self.d_state)        # kv groups; head h reads h // repeat_group
        C = C.reshape(b, l, self.nheads, self.d_state)
        A = -torch.exp(self.A_log.float())
        if step:
            y, new_ssm = ssd_state_update(state.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                                          self.D, self.dt_bias)
            y = y.unsqueeze(1)
        else:
            scan = mamba2_scan(x)                        # a fused kernel on CUDA, else the reference
            y, new_ssm = scan(x, dt, A, B, C, self.chunk_size, self.D, self.dt_bias,
                              initial_state=None if state is None else state.ssm)
        if state is not None:
            state.conv, state.ssm = new_conv, new_ssm
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y)
