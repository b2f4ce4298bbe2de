"""Mamba1 mixer of MambaInLlama: separate x/z/B/C/dt projections, d_state 16 by default.

x (from W_V) and B (from W_K) have ``d_xb`` channels and are repeated GQA-style
in groups of ``d_state`` channels to ``d_inner``; x is repeated before the conv
(``repeat_kv_before_conv``). The dt bias is applied twice, once inside
``dt_proj`` and again as the scan's ``delta_bias``: the paper's checkpoints were
trained that way, so it stays.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from ..config import LlamaMambaHybridConfig
from ..layout import MAMBA1_PROJECTIONS, mamba1_projections
from ..ops import selective_state_update
from ..ops.scan_impl import mamba1_scan
from .mamba2_mixer import inverse_softplus_dt
from .mamba_state import MambaLayerState
from .short_conv import apply_short_conv


class Mamba1Mixer(nn.Module):
    def __init__(self, config: LlamaMambaHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d_model = config.hidden_size
        self.d_inner, self.d_xb, self.d_state = config.d_inner, config.d_xb, config.d_state
        self.repeat_group = config.repeat_group
        self.repeat_kv_before_conv = config.repeat_kv_before_conv
        self.conv_dim = config.conv_dim
        # in_proj_x (d_xb), in_proj_z (d_inner), B_proj (d_xb), C_proj (d_inner)
        for name, size in mamba1_projections(config).items():
            setattr(self, name, nn.Linear(d_model, size, bias=False))
        self.dt_proj_down = nn.Linear(d_model, config.dt_rank, bias=False)
        self.dt_proj = nn.Linear(config.dt_rank, self.d_inner, bias=True)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=config.conv_bias)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init: S4D-real A = 1..d_state, dt log-uniform, D = 1.

        The dt bias is applied twice (module docstring), so it starts at half Mamba's:
        the step size starts in [1e-3, 0.1] as in Mamba2. MambaInLlama's full bias gives
        softplus(2b), a median of ~1e-4 at this init: the SSM then adds almost nothing
        to D * x and the attention weights it starts from go unused."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        std = self.dt_proj.in_features ** -0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        init.copy_(self.dt_proj.bias, inverse_softplus_dt(self.d_inner) / 2)

    def repeat_groups(self, t: torch.Tensor) -> torch.Tensor:
        """(..., d_xb) -> (..., d_inner): each d_state-channel group repeated in place."""
        return t.unflatten(-1, (-1, self.d_state)).repeat_interleave(self.repeat_group, -2).flatten(-2)

    def input_projections(self) -> list[nn.Linear]:
        """The Linears applied to the layer input, in layout order, dt's down-projection
        last: one GEMM where a runtime stacks them."""
        return [*(getattr(self, name) for name in MAMBA1_PROJECTIONS),
                self.dt_proj_down]

    def forward(self, hidden_states: torch.Tensor, state: MambaLayerState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, l, _ = hidden_states.shape
        x, z, B, C, dt_low = (proj(hidden_states) for proj in self.input_projections())
        B = self.repeat_groups(B)                                # (b, l, d_inner)
        dt = self.dt_proj(dt_low)                                # includes dt_proj.bias once
        if self.repeat_kv_before_conv:
            x = self.repeat_groups(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        step = state is not None and state.conv is not None and l == 1
        x, new_conv = apply_short_conv(x, self.conv1d, None if state is None else state.conv)
        if not self.repeat_kv_before_conv:
            x = self.repeat_groups(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        A = -torch.exp(self.A_log.float())
        groups = (b, l, -1, self.d_state)
        if step:
            y, new_ssm = selective_state_update(
                state.ssm, x[:, 0], dt[:, 0], A, B.reshape(groups)[:, 0], C.reshape(groups)[:, 0],
                self.D, z[:, 0], dt_bias=self.dt_proj.bias, dt_softplus=True)
            y = y.unsqueeze(1)
        else:
            scan = mamba1_scan(x)                        # Triton on CUDA, else the reference
            y, new_ssm = scan(
                x.transpose(1, 2), dt.transpose(1, 2), A,
                B.reshape(groups).permute(0, 2, 3, 1), C.reshape(groups).permute(0, 2, 3, 1),
                self.D, z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
                initial_state=None if state is None else state.ssm)
            y = y.transpose(1, 2)
        if state is not None:
            state.conv, state.ssm = new_conv, new_ssm
        return self.out_proj(y)
