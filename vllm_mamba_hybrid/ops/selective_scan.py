"""Mamba1 selective scan with grouped B/C (MambaInLlama's layout).

Channel ``c`` of ``d`` uses group ``c // (d // g)`` of B and C, which is how
MambaInLlama repeats the attention K (-> B) heads GQA-style without
materialising the repeat. Recurrence per channel c and state index n::

    dt_t  = softplus(delta_t + delta_bias)          (if delta_softplus)
    h_t   = exp(dt_t * A[c, n]) * h_{t-1} + dt_t * B_t[n] * u_t
    y_t   = sum_n C_t[n] * h_t[n] + D[c] * u_t,   then  y_t *= silu(z_t)

The full-sequence version works chunk by chunk: inside a chunk of T tokens the
pairwise decays exp(L_t - L_s) (s <= t, never > 1) give every state at once, so
there are L/T Python steps instead of L, memory stays O(L*T), and autograd works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dtype import compute_dtype, no_autocast


def _prepare_delta(delta, delta_bias, delta_softplus):
    cd = compute_dtype(delta)
    delta = delta.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd).unsqueeze(-1)
    return F.softplus(delta) if delta_softplus else delta


def skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None,
                  z: torch.Tensor | None) -> torch.Tensor:
    """The scan's epilogue ``(y + D * u) * silu(z)`` over (b, d, l), in y's dtype."""
    cd = y.dtype
    if D is not None:
        y = y + D.to(cd).unsqueeze(-1) * u.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y


@no_autocast
def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u, delta, z: (b, d, l); A: (d, n); B, C: (b, g, n, l); D, delta_bias: (d,);
    initial_state: (b, d, n). Returns ``(y (b, d, l), final_state (b, d, n) float32 or float64)``."""
    b, d, l = u.shape
    n = A.shape[-1]
    g = B.shape[1]
    if d % g:
        raise ValueError(f"channels ({d}) must be a multiple of B/C groups ({g})")
    r = d // g
    cd = compute_dtype(u)
    dt = _prepare_delta(delta, delta_bias, delta_softplus).view(b, g, r, l)
    uf = u.to(cd).view(b, g, r, l)
    Af = A.to(cd).view(g, r, n)
    Bf, Cf = B.to(cd), C.to(cd)
    h = (torch.zeros(b, g, r, n, device=u.device, dtype=cd) if initial_state is None
         else initial_state.to(cd).reshape(b, g, r, n))

    ys = []
    for start in range(0, l, chunk_size):
        sl = slice(start, min(start + chunk_size, l))
        t = sl.stop - sl.start
        dt_c = dt[..., sl]                                             # (b,g,r,T)
        logdecay = torch.cumsum(dt_c.unsqueeze(-2) * Af.unsqueeze(-1), dim=-1)  # (b,g,r,n,T)
        pair = logdecay.unsqueeze(-1) - logdecay.unsqueeze(-2)         # (...,T_t,T_s)
        causal = torch.ones(t, t, dtype=torch.bool, device=u.device).tril()
        pair = torch.exp(pair.masked_fill(~causal, float("-inf")))
        inp = (dt_c * uf[..., sl]).unsqueeze(-2) * Bf[:, :, None, :, sl]  # (b,g,r,n,T)
        states = torch.einsum("bgrnts,bgrns->bgrnt", pair, inp)
        states = states + torch.exp(logdecay) * h.unsqueeze(-1)
        ys.append(torch.einsum("bgnt,bgrnt->bgrt", Cf[..., sl], states))
        h = states[..., -1]
    y = torch.cat(ys, dim=-1).reshape(b, d, l) if ys else u.new_zeros(b, d, 0).to(cd)
    return skip_and_gate(y, u, D, z).to(u.dtype), h.reshape(b, d, n)


@no_autocast
def per_channel_groups(G: torch.Tensor, d: int) -> torch.Tensor:
    """(.., g, n) groups -> (.., d, n): selective_state_update takes one B/C row per channel."""
    return G.repeat_interleave(d // G.shape[-2], dim=-2)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. state: (b, d, n); x, dt, z: (b, d); A: (d, n); B, C: (b, g, n).

    Returns ``(y (b, d), new_state (b, d, n) float32)``: O(1) work per token.
    """
    b, d = x.shape
    cd = compute_dtype(x)
    g = B.shape[1]
    dt = _prepare_delta(dt.unsqueeze(-1), dt_bias, dt_softplus).squeeze(-1)   # (b,d)
    Bx = B.to(cd).repeat_interleave(d // g, dim=1)                            # (b,d,n)
    Cx = C.to(cd).repeat_interleave(d // g, dim=1)
    new_state = (state.to(cd) * torch.exp(dt.unsqueeze(-1) * A.to(cd))
                 + (dt * x.to(cd)).unsqueeze(-1) * Bx)
    y = (new_state * Cx).sum(-1)
    if D is not None:
        y = y + D.to(cd) * x.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype), new_state
