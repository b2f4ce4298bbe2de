"""Mamba2 state-space duality (SSD) scan: chunked full sequence and one-step update.

Per head h (scalar decay) with state (headdim p, d_state n)::

    dt_t = softplus(dt_t + dt_bias[h])              (if dt_softplus)
    S_t  = exp(dt_t * A[h]) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t  = S_t @ C_t + D[h] * x_t

Head h reads B/C group ``h // (nheads // ngroups)``. The chunked form is the
standard SSD split: quadratic attention-like term inside each chunk, a linear
recurrence over chunk states between chunks; memory O(L * chunk), autograd works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dtype import compute_dtype, no_autocast


def _prepare_dt(dt, dt_bias, dt_softplus):
    cd = compute_dtype(dt)
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    return F.softplus(dt) if dt_softplus else dt


def _heads(t: torch.Tensor, nheads: int, dim: int) -> torch.Tensor:
    """Expand a (.., g, n) group tensor to (.., nheads, n) along ``dim``."""
    g = t.shape[dim]
    if nheads % g:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({g})")
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=dim)


def check_scan_shapes(caller: str, x, dt, A, B, C, D=None, dt_bias=None,
                      initial_state=None) -> None:
    """The scan contract's shapes (:func:`ssd_chunk_scan`), checked before a fused kernel
    indexes memory by them; the error names the tensor."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    gc = C.shape[2] if C.dim() == 4 else h   # C may be grouped like B
    want = {"dt": (dt, (b, l, h)), "A": (A, (h,)), "B": (B, (b, l, g, n)),
            "C": (C, (b, l, gc, n)), "D": (D, (h,)), "dt_bias": (dt_bias, (h,)),
            "initial_state": (initial_state, (b, h, p, n))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{caller}: {name} is {tuple(t.shape)}, expected {shape} for x "
                             f"{tuple(x.shape)} (b, l, h, p) with {g} B groups of d_state {n}")
    if x.dtype == torch.float64:
        raise TypeError(f"{caller} computes in float32 or lower; use ssd_chunk_scan for float64")


@no_autocast
def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 128,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (b, l, h, p); dt: (b, l, h); A, D, dt_bias: (h,); B, C: (b, l, g, n);
    initial_state: (b, h, p, n). Returns ``(y (b, l, h, p), final_state (b, h, p, n) float32)``."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    T = chunk_size
    cd = compute_dtype(x)
    nchunks = max(1, -(-l // T))
    pad = nchunks * T - l
    dtf = _prepare_dt(dt, dt_bias, dt_softplus)
    xf, Bf, Cf = x.to(cd), _heads(B.to(cd), h, 2), _heads(C.to(cd), h, 2)
    if pad:  # dt = 0 and x = 0 on padding: no decay, no input, final state unchanged
        xf, dtf, Bf, Cf = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, dtf, Bf, Cf))
    xf = xf.view(b, nchunks, T, h, p)
    dtf = dtf.view(b, nchunks, T, h)
    Bf = Bf.view(b, nchunks, T, h, n)
    Cf = Cf.view(b, nchunks, T, h, n)

    logdecay = torch.cumsum(dtf * A.to(cd), dim=2)                       # (b,c,T,h)
    pair = logdecay.unsqueeze(3) - logdecay.unsqueeze(2)                   # (b,c,T_t,T_s,h)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    pair = torch.exp(pair.masked_fill(~causal[:, :, None], float("-inf")))
    dtx = xf * dtf.unsqueeze(-1)                                           # (b,c,T,h,p)

    scores = torch.einsum("bcthn,bcshn->bctsh", Cf, Bf) * pair
    y = torch.einsum("bctsh,bcshp->bcthp", scores, dtx)

    to_end = torch.exp(logdecay[:, :, -1:] - logdecay)                    # (b,c,T,h)
    chunk_states = torch.einsum("bcshn,bcsh,bcshp->bchpn", Bf, to_end, dtx)
    chunk_decay = torch.exp(logdecay[:, :, -1])                           # (b,c,h)
    state = (torch.zeros(b, h, p, n, device=x.device, dtype=cd) if initial_state is None
             else initial_state.to(cd))
    entering = []
    for c in range(nchunks):
        entering.append(state)
        state = state * chunk_decay[:, c, :, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                               # (b,c,h,p,n)
    y = y + torch.einsum("bcthn,bchpn,bcth->bcthp", Cf, entering, torch.exp(logdecay))

    y = y.reshape(b, nchunks * T, h, p)[:, :l]
    if D is not None:
        y = y + D.to(cd)[:, None] * x.to(cd)
    return y.to(x.dtype), state


@no_autocast
def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. state: (b, h, p, n); x: (b, h, p); dt: (b, h); B, C: (b, g, n).

    Returns ``(y (b, h, p), new_state (b, h, p, n) float32)``.
    """
    h = x.shape[1]
    cd = compute_dtype(x)
    dtf = _prepare_dt(dt, dt_bias, dt_softplus)                            # (b,h)
    Bh, Ch = _heads(B.to(cd), h, 1), _heads(C.to(cd), h, 1)              # (b,h,n)
    decay = torch.exp(dtf * A.to(cd))[..., None, None]
    new_state = state.to(cd) * decay + (dtf.unsqueeze(-1) * x.to(cd)).unsqueeze(-1) * Bh.unsqueeze(2)
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.to(cd)[:, None] * x.to(cd)
    return y.to(x.dtype), new_state
