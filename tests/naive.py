"""Token-by-token float64 recurrences: the ground truth the reference ops are checked against.

Written from the equations, not from the ops, so that a shared bug cannot hide.
"""
import torch
import torch.nn.functional as F


def conv1d(x, weight, bias, state, activation=True):
    """x: (b, dim, l); state: (b, dim, w-1). Returns out, final state."""
    x, weight = x.double(), weight.double()
    window = state.double().clone()
    outs = []
    for t in range(x.shape[-1]):
        full = torch.cat([window, x[..., t:t + 1]], dim=-1)
        o = (full * weight).sum(-1) + (0 if bias is None else bias.double())
        outs.append(F.silu(o) if activation else o)
        window = full[..., 1:]
    return torch.stack(outs, -1), window


def mamba1_scan(u, delta, A, B, C, D, z, delta_bias, state):
    """Mamba1 with grouped B/C: channel c reads group c // (d // g)."""
    b, d, l = u.shape
    g = B.shape[1]
    grp = torch.arange(d) // (d // g)
    h = state.double().clone()
    ys = []
    for t in range(l):
        dt = F.softplus(delta[..., t].double() + delta_bias.double())          # (b,d)
        Bt, Ct = B[:, grp, :, t].double(), C[:, grp, :, t].double()           # (b,d,n)
        h = torch.exp(dt[..., None] * A.double()) * h + dt[..., None] * Bt * u[..., t, None].double()
        y = (h * Ct).sum(-1) + D.double() * u[..., t].double()
        ys.append(y * F.silu(z[..., t].double()))
    return torch.stack(ys, -1), h


def ssd_scan(x, dt, A, B, C, D, dt_bias, state):
    """Mamba2: x (b,l,h,p), dt (b,l,h), B/C (b,l,g,n); head h reads group h // (H // g)."""
    b, l, H, p = x.shape
    g = B.shape[2]
    grp = torch.arange(H) // (H // g)
    S = state.double().clone()
    ys = []
    for t in range(l):
        d = F.softplus(dt[:, t].double() + dt_bias.double())                  # (b,h)
        Bt, Ct = B[:, t, grp].double(), C[:, t, grp].double()                 # (b,h,n)
        S = (torch.exp(d * A.double())[..., None, None] * S
             + (d[..., None] * x[:, t].double())[..., None] * Bt[:, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ct) + D.double()[:, None] * x[:, t].double())
    return torch.stack(ys, 1), S


def gated_rms_norm(x, z, weight, eps, group):
    h = x.double() * F.silu(z.double())
    out = torch.empty_like(h)
    for s in range(0, h.shape[-1], group):
        blk = h[..., s:s + group]
        out[..., s:s + group] = blk / torch.sqrt((blk ** 2).mean(-1, keepdim=True) + eps)
    return out * weight.double()
