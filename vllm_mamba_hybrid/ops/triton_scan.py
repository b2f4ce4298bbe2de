"""Mamba1 selective scan for training on the GPU: a sequential Triton scan with its backward.

Why: the reference :func:`.selective_scan.selective_scan_fn` materialises pairwise
decays per channel and state, (b, d, n, T, T) per chunk, so a 50% Mamba1 student of
SmolLM2 trains 9x slower than its Mamba2 twin and needs ~35 GB at 8 x 512 tokens.
Here one program owns a block of channels of one B/C group of one sequence and walks
the tokens in order with its (channels x d_state) fp32 state in registers: O(b*d*n)
live state, inputs read once. The backward walks the tokens in reverse with the
adjoint ``g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}`` and needs every state, but the
forward keeps only the state entering each chunk of ``CHUNK`` tokens; the backward
recomputes a chunk's states from it into a scratch of ``CHUNK`` tokens before
walking that chunk back. Storing every token's state instead cost (b, l, d, n) fp32
per layer: 2.4 GB for one SmolLM2 layer at d_state 64 and 32 x 512 tokens, 36 GB for
a 50% student; the checkpoints are 1/CHUNK of that, for one more pass over the inputs.
Channels of one program share their group, so dB/dC are summed in registers and
added with one atomic per state index and token.

Semantics are exactly the reference's (softplus, bias, D and the z gate are applied
in PyTorch around the kernel, so autograd handles them). Runs on CPU under
``TRITON_INTERPRET=1`` (set before triton is imported), which is how CI checks it.
"""
from __future__ import annotations

import torch

from ._dtype import no_autocast
from .selective_scan import _prepare_delta, skip_and_gate
from .triton_step import HAVE_TRITON, available

CHUNK = 16  # tokens between saved states; the scratch holds one chunk of states

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_token(u_ptr, dt_ptr, B_ptr, C_ptr, b, g, c, n, t, mc, mn,
                    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                    s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l):
        """Token t's inputs in fp32: u and dt of the program's channels, B and C of its group."""
        u = tl.load(u_ptr + b * s_u_b + c * s_u_d + t * s_u_l, mask=mc, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * s_dt_b + c * s_dt_d + t * s_dt_l, mask=mc, other=0.0)
        Bt = tl.load(B_ptr + b * s_B_b + g * s_B_g + n * s_B_n + t * s_B_l, mask=mn,
                     other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b * s_C_b + g * s_C_g + n * s_C_n + t * s_C_l, mask=mn,
                     other=0.0).to(tl.float32)
        return u, dt, Bt, Ct

    @triton.jit
    def _advance(h, A, u, dt, Bt):
        """One token of the recurrence: exp(dt A) h + dt u B, for the program's channels."""
        return tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]

    @triton.jit
    def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, h0_ptr, y_ptr, cp_ptr, hT_ptr,
                         L, D, N, R, NC,
                         s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                         s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l,
                         HAS_H0: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        j = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        c = g * R + j                                   # channels of group g
        mc = j < R
        n = tl.arange(0, BLOCK_N)
        mn = n < N
        m2 = mc[:, None] & mn[None, :]
        A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
        st = b * D * N + c[:, None] * N + n[None, :]      # (b, d, n) contiguous states
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        if HAS_H0:
            h = tl.load(h0_ptr + st, mask=m2, other=0.0)
        for k in range(0, NC):
            if SAVE:  # the state entering chunk k: (b, NC, d, n)
                tl.store(cp_ptr + ((b * NC + k) * D + c[:, None]) * N + n[None, :], h, mask=m2)
            for t in range(k * CHUNK, tl.minimum(k * CHUNK + CHUNK, L)):
                u, dt, Bt, Ct = _load_token(u_ptr, dt_ptr, B_ptr, C_ptr, b, g, c, n, t, mc, mn,
                                            s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                                            s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l)
                h = _advance(h, A, u, dt, Bt)
                y = tl.sum(h * Ct[None, :], axis=1)
                tl.store(y_ptr + (b * L + t) * D + c, y, mask=mc)      # (b, l, d) fp32
        tl.store(hT_ptr + st, h, mask=m2)

    @triton.jit
    def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, cp_ptr, hw_ptr, dy_ptr, dhT_ptr,
                         du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr,
                         L, D, N, R, G, NC,
                         s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                         s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l,
                         s_dy_b, s_dy_d, s_dy_l,
                         HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        j = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        c = g * R + j
        mc = j < R
        n = tl.arange(0, BLOCK_N)
        mn = n < N
        m2 = mc[:, None] & mn[None, :]
        A = tl.load(A_ptr + c[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32)
        st = b * D * N + c[:, None] * N + n[None, :]
        gh = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)   # dLoss/dh_t, from later tokens
        if HAS_DHT:
            gh = tl.load(dhT_ptr + st, mask=m2, other=0.0)
        dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        for kk in range(0, NC):
            k = NC - 1 - kk
            t0 = k * CHUNK
            nt = tl.minimum(t0 + CHUNK, L) - t0
            h_in = tl.load(cp_ptr + ((b * NC + k) * D + c[:, None]) * N + n[None, :], mask=m2,
                           other=0.0)
            # the chunk's states again, into this sequence's window of the scratch (b, CHUNK, d, n)
            h = h_in
            for q in range(0, nt):
                u, dt, Bt, Ct = _load_token(u_ptr, dt_ptr, B_ptr, C_ptr, b, g, c, n, t0 + q, mc, mn,
                                            s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                                            s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l)
                h = _advance(h, A, u, dt, Bt)
                tl.store(hw_ptr + ((b * CHUNK + q) * D + c[:, None]) * N + n[None, :], h, mask=m2)
            tl.debug_barrier()  # the scratch is read below by whichever thread holds the element
            for ii in range(0, nt):
                i = nt - 1 - ii
                t = t0 + i
                u, dt, Bt, Ct = _load_token(u_ptr, dt_ptr, B_ptr, C_ptr, b, g, c, n, t, mc, mn,
                                            s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l,
                                            s_B_b, s_B_g, s_B_n, s_B_l, s_C_b, s_C_g, s_C_n, s_C_l)
                dy = tl.load(dy_ptr + b * s_dy_b + c * s_dy_d + t * s_dy_l, mask=mc,
                             other=0.0).to(tl.float32)
                # the state before token t: the scratch inside the chunk, the chunk's entering
                # state at its first token; masks as bounds: the interpreter rejects block &
                # scalar masks
                before = (j < tl.where(i > 0, R, 0))[:, None] & mn[None, :]
                hp = tl.load(hw_ptr + ((b * CHUNK + i - 1) * D + c[:, None]) * N + n[None, :],
                             mask=before, other=0.0)
                hp = tl.where(i > 0, hp, h_in)
                a = tl.exp(dt[:, None] * A)
                gh += dy[:, None] * Ct[None, :]
                tl.atomic_add(dC_ptr + ((b * L + t) * G + g) * N + n,
                              tl.sum(dy[:, None] * h, axis=0), mask=mn)
                gB = tl.sum(gh * Bt[None, :], axis=1)
                tl.store(du_ptr + (b * L + t) * D + c, dt * gB, mask=mc)
                gAh = gh * a * hp
                tl.store(ddt_ptr + (b * L + t) * D + c, u * gB + tl.sum(gAh * A, axis=1), mask=mc)
                tl.atomic_add(dB_ptr + ((b * L + t) * G + g) * N + n,
                              tl.sum(gh * (dt * u)[:, None], axis=0), mask=mn)
                dA += gAh * dt[:, None]
                gh = gh * a
                h = hp
            tl.debug_barrier()  # every read of this chunk's scratch before the next overwrites it
        tl.atomic_add(dA_ptr + c[:, None] * N + n[None, :], dA, mask=m2)
        if HAS_H0:
            tl.store(dh0_ptr + st, gh, mask=m2)


def supports(u: torch.Tensor) -> bool:
    """Whether a model should take this scan for ``u``: CUDA tensors, float32 or lower."""
    return HAVE_TRITON and u.is_cuda and u.dtype != torch.float64


def _launch_shape(b: int, g: int, r: int, n: int, block_d: int):
    """(grid, channels a program, padded d_state) for at most ``block_d`` channels a program."""
    block_d = max(2, min(triton.next_power_of_2(r), block_d))
    return (b, g, triton.cdiv(r, block_d)), block_d, max(2, triton.next_power_of_2(n))


# Channels (at most) and warps a program, for both kernels: the fastest of
# benchmarks/training_scan.py's sweep on the H200 at SmolLM2's layer, 32 x 512 (2.6 / 7.0
# ms forward + backward at d_state 16 / 64, against 4.2 / 8.7 at 32 channels, 4 warps).
LAUNCH = {"block_d": 16, "num_warps": 2}


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t; dt already prepared."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0):
        b, d, l = u.shape
        g, n = B.shape[1], A.shape[1]
        r = d // g
        dev = u.device
        save = any(ctx.needs_input_grad)
        nc = triton.cdiv(l, CHUNK)
        y = torch.empty(b, l, d, device=dev, dtype=torch.float32)
        cp = torch.empty(b, nc, d, n, device=dev, dtype=torch.float32) if save else y
        hT = torch.empty(b, d, n, device=dev, dtype=torch.float32)
        h0c = h0.float().contiguous() if h0 is not None else hT
        Af = A.float().contiguous()
        grid, bd, bn = _launch_shape(b, g, r, n, LAUNCH["block_d"])
        _scan_fwd_kernel[grid](u, dt, Af, B, C, h0c, y, cp, hT, l, d, n, r, nc,
                               *u.stride(), *dt.stride(), *B.stride(), *C.stride(),
                               HAS_H0=h0 is not None, SAVE=save, CHUNK=CHUNK,
                               BLOCK_D=bd, BLOCK_N=bn, num_warps=LAUNCH["num_warps"])
        if save:
            ctx.save_for_backward(u, dt, Af, B, C, cp)
            ctx.a_dtype, ctx.has_h0 = A.dtype, h0 is not None
        return y.transpose(1, 2), hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, dt, A, B, C, cp = ctx.saved_tensors
        b, d, l = u.shape
        g, n = B.shape[1], A.shape[1]
        r = d // g
        nc = cp.shape[1]
        dev = u.device
        dy = torch.zeros_like(u, dtype=torch.float32) if dy is None else dy
        du = torch.empty(b, l, d, device=dev, dtype=torch.float32)
        ddt = torch.empty(b, l, d, device=dev, dtype=torch.float32)
        dA = torch.zeros(d, n, device=dev, dtype=torch.float32)
        dB = torch.zeros(b, l, g, n, device=dev, dtype=torch.float32)
        dC = torch.zeros(b, l, g, n, device=dev, dtype=torch.float32)
        dh0 = torch.empty(b, d, n, device=dev, dtype=torch.float32) if ctx.has_h0 else dA
        dhT = dhT.float().contiguous() if dhT is not None else dA
        scratch = torch.empty(b, CHUNK, d, n, device=dev, dtype=torch.float32)
        grid, bd, bn = _launch_shape(b, g, r, n, LAUNCH["block_d"])
        _scan_bwd_kernel[grid](u, dt, A, B, C, cp, scratch, dy, dhT,
                               du, ddt, dA, dB, dC, dh0, l, d, n, r, g, nc,
                               *u.stride(), *dt.stride(), *B.stride(), *C.stride(), *dy.stride(),
                               HAS_H0=ctx.has_h0, HAS_DHT=dhT is not dA, CHUNK=CHUNK,
                               BLOCK_D=bd, BLOCK_N=bn, num_warps=LAUNCH["num_warps"])
        return (du.transpose(1, 2).to(u.dtype), ddt.transpose(1, 2).to(dt.dtype),
                dA.to(ctx.a_dtype), dB.permute(0, 2, 3, 1).to(B.dtype),
                dC.permute(0, 2, 3, 1).to(C.dtype), dh0 if ctx.has_h0 else None)


@torch.compiler.disable  # a compiled layer calls the kernels as they are (graph break)
@no_autocast
def selective_scan_triton(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as :func:`.selective_scan.selective_scan_fn` (float32 math, float32
    state), differentiable in every tensor input; float64 inputs are not supported."""
    b, d, l = u.shape
    g, n = B.shape[1], B.shape[2]
    if d % g:
        raise ValueError(f"channels ({d}) must be a multiple of B/C groups ({g})")
    # The kernels trust these shapes (they index by them), so every tensor is checked.
    want = {"delta": (delta, (b, d, l)), "A": (A, (d, n)), "B": (B, (b, g, n, l)),
            "C": (C, (b, g, n, l)), "D": (D, (d,)), "z": (z, (b, d, l)),
            "delta_bias": (delta_bias, (d,)), "initial_state": (initial_state, (b, d, n))}
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan_triton: {name} is {tuple(t.shape)}, expected {shape} "
                             f"for u {tuple(u.shape)} (b, d, l) with {g} B/C groups of d_state {n}")
    if u.dtype == torch.float64:
        raise TypeError("selective_scan_triton computes in float32; use selective_scan_fn for float64")
    if not available(u.device):
        raise RuntimeError(f"selective_scan_triton needs a CUDA tensor (got {u.device}) or "
                           f"TRITON_INTERPRET=1")
    dt = _prepare_delta(delta, delta_bias, delta_softplus)
    y, h = _SelectiveScanCore.apply(u, dt, A, B, C, initial_state)
    return skip_and_gate(y, u, D, z).to(u.dtype), h
