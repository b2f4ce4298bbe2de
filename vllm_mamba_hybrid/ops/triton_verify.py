"""Triton kernels of the verify ops (semantics: :mod:`.verify`).

One program per (sequence, head / channel block). Its fp32 state tile is loaded
once, advanced over the replayed tokens, stored once (the new checkpoint), then
advanced over the new tokens in registers while their outputs are written: the
state crosses device memory exactly twice per call, whatever k is. Inputs may
be bf16/fp16/fp32 with any strides; arithmetic is fp32.

Runs on CPU under ``TRITON_INTERPRET=1`` (set before triton is imported); that
is how the tests check these kernels on a machine without a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _dt_eff(dt, dt_bias, DT_SOFTPLUS: tl.constexpr, FAST: tl.constexpr = False):
    """dt + bias, then softplus (threshold 20, as torch's); FAST: through `_sfu` (one
    special-function instruction each for exp and log, no range fix-ups)."""
    v = dt.to(tl.float32) + dt_bias
    if DT_SOFTPLUS:
        if FAST:
            e = _sfu(v * 1.4426950408889634, "ex2", True)
            sp = 0.6931471805599453 * _sfu(1.0 + e, "lg2", True)
        else:
            sp = tl.log(1.0 + tl.exp(v))
        v = tl.where(v <= 20.0, sp, v)
    return v


@triton.jit
def _sfu(x, OP: tl.constexpr, FAST: tl.constexpr):
    """2**x (OP "ex2") or log2(x) (OP "lg2"). FAST (NVIDIA, inline PTX): the one
    ``OP.approx.ftz`` instruction; ``tl.exp2`` / ``tl.log2`` add a range check and two
    scalings per value to keep denormals exact, which a decaying state and a softplus
    have no use for (FTZ flushes them to 0)."""
    if FAST:
        out = tl.inline_asm_elementwise(OP + ".approx.ftz.f32 $0, $1;", "=f,f", [x],
                                        dtype=tl.float32, is_pure=True, pack=1)
    elif OP == "ex2":
        out = tl.exp2(x)
    else:
        out = tl.log2(x)
    return out


@triton.jit
def _rows(v, SLICES_FIRST: tl.constexpr):
    """A [BLOCK_P] vector broadcast over the sliced state tile (see `_mamba2_state_tile`)."""
    if SLICES_FIRST:
        out = v[None, :, None]
    else:
        out = v[:, None, None]
    return out


@triton.jit
def _slices(v, SLICES_FIRST: tl.constexpr):
    """A [BLOCK_N // SUB_N, SUB_N] (sliced n) vector broadcast over the sliced state tile."""
    if SLICES_FIRST:
        out = v[:, None, :]
    else:
        out = v[None, :, :]
    return out


@triton.jit
def _sum_n(tile, SLICES_FIRST: tl.constexpr):
    """Sum of the sliced state tile over n: over the slices (in-thread) first."""
    if SLICES_FIRST:
        out = tl.sum(tl.sum(tile, axis=0), axis=1)
    else:
        out = tl.sum(tl.sum(tile, axis=1), axis=1)
    return out


@triton.jit
def _mamba2_state_tile(state_ptr, idx_ptr, A_ptr, dtb_ptr, h, b, P, N,
                       s_st, s_st_h, s_st_p, s_st_n,
                       HAS_DT_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       SUB_N: tl.constexpr, SLICES_FIRST: tl.constexpr):
    """Both Mamba2 kernels' prologue: this program's fp32 state tile (rows of p of head h,
    of sequence b's slot; a padded row, slot < 0, reads zeros and must not store), its
    pointers and masks, and the head's A and dt bias.

    SUB_N = 0: the tile is [BLOCK_P, BLOCK_N]. Else n is cut into SUB_N-wide slices,
    the tile [BLOCK_P, BLOCK_N // SUB_N, SUB_N], or with SLICES_FIRST [BLOCK_N // SUB_N,
    BLOCK_P, SUB_N]: the order in which the Triton version at hand puts its lanes on rows
    and SUB_N, not on slices, so a thread holds every slice of its rows and a sum over n
    is in-thread adds and a few shuffles over SUB_N / 4 lanes, not a 32-lane shuffle tree
    per row and token (`benchmarks/kernel_sass.py` shows the layouts' instruction counts)."""
    slot = tl.load(idx_ptr + b).to(tl.int64)
    active = slot >= 0
    slot = tl.maximum(slot, 0)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = offs_p < P
    rows = offs_p < tl.where(active, P, 0)      # masks as bounds: the interpreter rejects
    base = state_ptr + slot * s_st + h * s_st_h   # block & scalar masks
    if SUB_N == 0:
        offs_n = tl.arange(0, BLOCK_N)
        mn = offs_n < N
        ms = rows[:, None] & mn[None, :]
        st_ptrs = base + offs_p[:, None] * s_st_p + offs_n[None, :] * s_st_n
    else:
        offs_n = tl.arange(0, BLOCK_N // SUB_N)[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]
        mn = offs_n < N
        ms = _rows(rows, SLICES_FIRST) & _slices(mn, SLICES_FIRST)
        st_ptrs = (base + _rows(offs_p, SLICES_FIRST) * s_st_p
                   + _slices(offs_n, SLICES_FIRST) * s_st_n)
    S = tl.load(st_ptrs, mask=ms, other=0.0)
    A = tl.load(A_ptr + h).to(tl.float32)
    dtb = 0.0
    if HAS_DT_BIAS:
        dtb = tl.load(dtb_ptr + h).to(tl.float32)
    return S, st_ptrs, ms, active, offs_p, offs_n, mp, mn, A, dtb


@triton.jit
def _mamba2_token(dt_row, x_row, B_row, s_dt_t, s_x_t, s_B_t, t, n, P, N, offs_p, offs_n):
    """Token t's dt, x row and B (fp32) of a run of n tokens; zeros for t >= n (the
    look-ahead past the last token)."""
    ok = t < n
    d = tl.load(dt_row + t * s_dt_t, mask=ok, other=0.0)
    xv = tl.load(x_row + t * s_x_t, mask=offs_p < tl.where(ok, P, 0), other=0.0)
    Bv = tl.load(B_row + t * s_B_t, mask=offs_n < tl.where(ok, N, 0), other=0.0).to(tl.float32)
    return d, xv, Bv


@triton.jit
def _mamba2_verify_kernel(
    state_ptr, idx_ptr, nrep_ptr, rx_ptr, rdt_ptr, rB_ptr,
    x_ptr, dt_ptr, B_ptr, C_ptr, y_ptr, A_ptr, D_ptr, dtb_ptr,
    T, P, N, heads_per_gB, heads_per_gC,
    s_st, s_st_h, s_st_p, s_st_n,
    s_rx_b, s_rx_t, s_rx_h, s_rx_p,
    s_rdt_b, s_rdt_t, s_rdt_h,
    s_rB_b, s_rB_t, s_rB_g, s_rB_n,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dt_b, s_dt_t, s_dt_h,
    s_B_b, s_B_t, s_B_g, s_B_n,
    s_C_b, s_C_t, s_C_g, s_C_n,
    s_y_b, s_y_t, s_y_h, s_y_p,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
    SLICES_FIRST: tl.constexpr,
):
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    S, st_ptrs, ms, active, offs_p, offs_n, mp, mn, A, dtb = _mamba2_state_tile(
        state_ptr, idx_ptr, A_ptr, dtb_ptr, h, b, P, N, s_st, s_st_h, s_st_p, s_st_n,
        HAS_DT_BIAS, BLOCK_P, BLOCK_N, SUB_N, SLICES_FIRST)
    gB = h // heads_per_gB
    gC = h // heads_per_gC

    # Token t+1's inputs are loaded while token t is computed (look-ahead rows, zeros
    # past the end): their latency overlaps the sequential update instead of stalling it.
    # B and C become fp32 as loaded, one element a thread, before Triton broadcasts them
    # to the tile's rows (converted after the broadcast, every thread unpacks all of its
    # slices' bf16 values: ~25 more instructions a token).
    n_rep = tl.load(nrep_ptr + b)
    rdt_row = rdt_ptr + b * s_rdt_b + h * s_rdt_h
    rx_row = rx_ptr + b * s_rx_b + h * s_rx_h + offs_p * s_rx_p
    rB_row = rB_ptr + b * s_rB_b + gB * s_rB_g + offs_n * s_rB_n
    d, xv, Bv = _mamba2_token(rdt_row, rx_row, rB_row, s_rdt_t, s_rx_t, s_rB_t, 0, n_rep, P, N,
                              offs_p, offs_n)
    for t in range(0, n_rep):
        d_n, x_n, B_n = _mamba2_token(rdt_row, rx_row, rB_row, s_rdt_t, s_rx_t, s_rB_t, t + 1,
                                      n_rep, P, N, offs_p, offs_n)
        de = _dt_eff(d, dtb, DT_SOFTPLUS)
        S = (S * tl.exp(de * A)
             + _rows(de * xv.to(tl.float32), SLICES_FIRST) * _slices(Bv, SLICES_FIRST))
        d, xv, Bv = d_n, x_n, B_n
    tl.store(st_ptrs, S, mask=ms)

    Dh = 0.0
    if HAS_D:
        Dh = tl.load(D_ptr + h).to(tl.float32)
    dt_row = dt_ptr + b * s_dt_b + h * s_dt_h
    x_row = x_ptr + b * s_x_b + h * s_x_h + offs_p * s_x_p
    B_row = B_ptr + b * s_B_b + gB * s_B_g + offs_n * s_B_n
    C_row = C_ptr + b * s_C_b + gC * s_C_g + offs_n * s_C_n
    d, xv, Bv = _mamba2_token(dt_row, x_row, B_row, s_dt_t, s_x_t, s_B_t, 0, T, P, N,
                              offs_p, offs_n)
    Cv = tl.load(C_row, mask=offs_n < tl.where(T > 0, N, 0), other=0.0).to(tl.float32)
    for t in range(0, T):
        more = t + 1 < T
        d_n, x_n, B_n = _mamba2_token(dt_row, x_row, B_row, s_dt_t, s_x_t, s_B_t, t + 1, T, P, N,
                                      offs_p, offs_n)
        C_n = tl.load(C_row + (t + 1) * s_C_t, mask=offs_n < tl.where(more, N, 0),
                      other=0.0).to(tl.float32)
        de = _dt_eff(d, dtb, DT_SOFTPLUS)
        xf = xv.to(tl.float32)
        S = S * tl.exp(de * A) + _rows(de * xf, SLICES_FIRST) * _slices(Bv, SLICES_FIRST)
        yv = _sum_n(S * _slices(Cv, SLICES_FIRST), SLICES_FIRST) + Dh * xf
        yv = tl.where(active, yv, 0.0)
        tl.store(y_ptr + b * s_y_b + t * s_y_t + h * s_y_h + offs_p * s_y_p,
                 yv.to(y_ptr.dtype.element_ty), mask=mp)
        d, xv, Bv, Cv = d_n, x_n, B_n, C_n


@triton.jit
def _mamba2_verify_dot_kernel(
    state_ptr, idx_ptr, nrep_ptr, rx_ptr, rdt_ptr, rB_ptr,
    x_ptr, dt_ptr, B_ptr, C_ptr, y_ptr, A_ptr, D_ptr, dtb_ptr,
    T, P, N, heads_per_gB, heads_per_gC,
    s_st, s_st_h, s_st_p, s_st_n,
    s_rx_b, s_rx_t, s_rx_h, s_rx_p,
    s_rdt_b, s_rdt_t, s_rdt_h,
    s_rB_b, s_rB_t, s_rB_g, s_rB_n,
    s_x_b, s_x_t, s_x_h, s_x_p,
    s_dt_b, s_dt_t, s_dt_h,
    s_B_b, s_B_t, s_B_g, s_B_n,
    s_C_b, s_C_t, s_C_g, s_C_n,
    s_y_b, s_y_t, s_y_h, s_y_p,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, T_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The same function in SSD block form: the scalar decay per head makes the replay
    one rank-R update ``S = e^{sum dA} S0 + (w x)^T B`` and the outputs
    ``Y = e^{cum} C S^T + (L o C B^T) x``: matrix products instead of a token loop,
    so the per-element work no longer grows with k."""
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    S, st_ptrs, ms, active, offs_p, offs_n, mp, mn, A, dtb = _mamba2_state_tile(
        state_ptr, idx_ptr, A_ptr, dtb_ptr, h, b, P, N, s_st, s_st_h, s_st_p, s_st_n,
        HAS_DT_BIAS, BLOCK_P, BLOCK_N, 0, False)
    gB = h // heads_per_gB
    gC = h // heads_per_gC

    # replay: S <- exp(sum dA) S + sum_s dt_s exp(sum_{s'>s} dA) x_s (outer) B_s
    offs_r = tl.arange(0, R_PAD)
    mr = offs_r < tl.load(nrep_ptr + b)
    d_r = _dt_eff(tl.load(rdt_ptr + b * s_rdt_b + offs_r * s_rdt_t + h * s_rdt_h, mask=mr,
                          other=0.0), dtb, DT_SOFTPLUS)
    dA_r = tl.where(mr, d_r * A, 0.0)
    total = tl.sum(dA_r, axis=0)
    w_r = tl.where(mr, d_r * tl.exp(total - tl.cumsum(dA_r, axis=0)), 0.0)
    Xr = tl.load(rx_ptr + b * s_rx_b + offs_r[:, None] * s_rx_t + h * s_rx_h
                 + offs_p[None, :] * s_rx_p, mask=mr[:, None] & mp[None, :], other=0.0)
    Br = tl.load(rB_ptr + b * s_rB_b + offs_r[:, None] * s_rB_t + gB * s_rB_g
                 + offs_n[None, :] * s_rB_n, mask=mr[:, None] & mn[None, :], other=0.0)
    Xw = tl.where(mr[:, None], Xr.to(tl.float32) * w_r[:, None], 0.0)
    S = S * tl.exp(total) + tl.dot(tl.trans(Xw), tl.where(mr[:, None], Br.to(tl.float32), 0.0),
                                   input_precision=DOT_PRECISION)
    tl.store(st_ptrs, S, mask=ms)

    # new tokens: y_t = e^{cum_t} C_t.S + sum_{s<=t} e^{cum_t - cum_s} dt_s (C_t.B_s) x_s + D x_t
    offs_t = tl.arange(0, T_PAD)
    mt = offs_t < T
    d_t = tl.where(mt, _dt_eff(tl.load(dt_ptr + b * s_dt_b + offs_t * s_dt_t + h * s_dt_h,
                                       mask=mt, other=0.0), dtb, DT_SOFTPLUS), 0.0)
    cum = tl.cumsum(d_t * A, axis=0)
    Xt = tl.load(x_ptr + b * s_x_b + offs_t[:, None] * s_x_t + h * s_x_h + offs_p[None, :] * s_x_p,
                 mask=mt[:, None] & mp[None, :], other=0.0).to(tl.float32)
    Xt = tl.where(mt[:, None], Xt, 0.0)
    Bt = tl.load(B_ptr + b * s_B_b + offs_t[:, None] * s_B_t + gB * s_B_g + offs_n[None, :] * s_B_n,
                 mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * s_C_b + offs_t[:, None] * s_C_t + gC * s_C_g + offs_n[None, :] * s_C_n,
                 mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
    Bt = tl.where(mt[:, None], Bt, 0.0)
    Ct = tl.where(mt[:, None], Ct, 0.0)
    Y = tl.dot(Ct, tl.trans(S), input_precision=DOT_PRECISION) * tl.exp(cum)[:, None]
    causal = offs_t[:, None] >= offs_t[None, :]
    L = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))) * d_t[None, :]
    L = L * tl.dot(Ct, tl.trans(Bt), input_precision=DOT_PRECISION)
    Y += tl.dot(L, Xt, input_precision=DOT_PRECISION)
    if HAS_D:
        Y += tl.load(D_ptr + h).to(tl.float32) * Xt
    Y = tl.where(active, Y, 0.0)
    tl.store(y_ptr + b * s_y_b + offs_t[:, None] * s_y_t + h * s_y_h + offs_p[None, :] * s_y_p,
             Y.to(y_ptr.dtype.element_ty), mask=mt[:, None] & mp[None, :])


@triton.jit
def _mamba1_verify_kernel(
    state_ptr, idx_ptr, nrep_ptr, rx_ptr, rdt_ptr, rB_ptr,
    x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, y_ptr, A_ptr, D_ptr, dtb_ptr,
    T, DIM, N, ch_per_gB, ch_per_gC,
    s_st, s_st_d, s_st_n,
    s_rx_b, s_rx_t, s_rx_d,
    s_rdt_b, s_rdt_t, s_rdt_d,
    s_rB_b, s_rB_t, s_rB_g, s_rB_n,
    s_x_b, s_x_t, s_x_d,
    s_dt_b, s_dt_t, s_dt_d,
    s_B_b, s_B_t, s_B_g, s_B_n,
    s_C_b, s_C_t, s_C_g, s_C_n,
    s_z_b, s_z_t, s_z_d,
    s_y_b, s_y_t, s_y_d,
    s_A_d, s_A_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SUB_N: tl.constexpr, SLICES_FIRST: tl.constexpr, FAST_SFU: tl.constexpr,
):
    """BLOCK_D channels of sequence b. The state tile is sliced along n as the Mamba2
    tile is (`_mamba2_state_tile`): one 16-wide slice at d_state 16 puts a channel on 2
    lanes with Triton 3.6 (y: in-thread adds, then 1 shuffle); 4-wide slices would put
    it in one thread (fewer instructions, but 94 registers: slower on an H100,
    NOTES_kernels.md run 6). Each channel loads its own group's B and C row (lanes of
    one group read one address: broadcast loads)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slot = tl.load(idx_ptr + b).to(tl.int64)
    active = slot >= 0
    slot = tl.maximum(slot, 0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N // SUB_N)[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]
    md = offs_d < DIM
    mn = _slices(offs_n < N, SLICES_FIRST)
    ms = _rows(offs_d < tl.where(active, DIM, 0), SLICES_FIRST) & mn
    n_at = _slices(offs_n, SLICES_FIRST)
    st_ptrs = state_ptr + slot * s_st + _rows(offs_d, SLICES_FIRST) * s_st_d + n_at * s_st_n
    S = tl.load(st_ptrs, mask=ms, other=0.0)
    A = tl.load(A_ptr + _rows(offs_d, SLICES_FIRST) * s_A_d + n_at * s_A_n,
                mask=_rows(md, SLICES_FIRST) & mn, other=0.0).to(tl.float32) * 1.4426950408889634
    dtb = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_DT_BIAS:
        dtb = tl.load(dtb_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    gB = _rows(offs_d // ch_per_gB, SLICES_FIRST)
    gC = _rows(offs_d // ch_per_gC, SLICES_FIRST)

    # look-ahead loads as in the Mamba2 kernel (z too: loaded where used, its latency
    # stalled every new token); past the last token the last one is loaded again
    n_rep = tl.load(nrep_ptr + b)
    rdt_row = rdt_ptr + b * s_rdt_b + offs_d * s_rdt_d
    rx_row = rx_ptr + b * s_rx_b + offs_d * s_rx_d
    rB_row = rB_ptr + b * s_rB_b + gB * s_rB_g + n_at * s_rB_n
    lim = tl.where(n_rep > 0, DIM, 0)
    d = tl.load(rdt_row, mask=offs_d < lim, other=0.0)
    xv = tl.load(rx_row, mask=offs_d < lim, other=0.0)
    Bv = tl.load(rB_row, mask=_rows(offs_d < lim, SLICES_FIRST) & mn, other=0.0)
    mB = _rows(md, SLICES_FIRST) & mn
    for t in range(0, n_rep):
        tn = tl.minimum(t + 1, n_rep - 1)     # the last token again: no per-token masks
        d_n = tl.load(rdt_row + tn * s_rdt_t, mask=md, other=0.0)
        x_n = tl.load(rx_row + tn * s_rx_t, mask=md, other=0.0)
        B_n = tl.load(rB_row + tn * s_rB_t, mask=mB, other=0.0)
        de = _dt_eff(d, dtb, DT_SOFTPLUS, FAST_SFU)
        S = (S * _sfu(_rows(de, SLICES_FIRST) * A, "ex2", FAST_SFU)
             + _rows(de * xv.to(tl.float32), SLICES_FIRST) * Bv.to(tl.float32))
        d, xv, Bv = d_n, x_n, B_n
    tl.store(st_ptrs, S, mask=ms)

    Dc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dc = tl.load(D_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
    dt_row = dt_ptr + b * s_dt_b + offs_d * s_dt_d
    x_row = x_ptr + b * s_x_b + offs_d * s_x_d
    z_row = z_ptr + b * s_z_b + offs_d * s_z_d
    B_row = B_ptr + b * s_B_b + gB * s_B_g + n_at * s_B_n
    C_row = C_ptr + b * s_C_b + gC * s_C_g + n_at * s_C_n
    lim = tl.where(T > 0, DIM, 0)
    d = tl.load(dt_row, mask=offs_d < lim, other=0.0)
    xv = tl.load(x_row, mask=offs_d < lim, other=0.0)
    Bv = tl.load(B_row, mask=_rows(offs_d < lim, SLICES_FIRST) & mn, other=0.0)
    Cv = tl.load(C_row, mask=_rows(offs_d < lim, SLICES_FIRST) & mn, other=0.0)
    zv = tl.load(z_row, mask=(offs_d < lim) & HAS_Z, other=0.0)
    for t in range(0, T):
        tn = tl.minimum(t + 1, T - 1)
        d_n = tl.load(dt_row + tn * s_dt_t, mask=md, other=0.0)
        x_n = tl.load(x_row + tn * s_x_t, mask=md, other=0.0)
        B_n = tl.load(B_row + tn * s_B_t, mask=mB, other=0.0)
        C_n = tl.load(C_row + tn * s_C_t, mask=mB, other=0.0)
        z_n = tl.load(z_row + tn * s_z_t, mask=md & HAS_Z, other=0.0)
        de = _dt_eff(d, dtb, DT_SOFTPLUS, FAST_SFU)
        xf = xv.to(tl.float32)
        S = (S * _sfu(_rows(de, SLICES_FIRST) * A, "ex2", FAST_SFU)
             + _rows(de * xf, SLICES_FIRST) * Bv.to(tl.float32))
        yv = _sum_n(S * Cv.to(tl.float32), SLICES_FIRST) + Dc * xf
        if HAS_Z:
            zf = zv.to(tl.float32)
            yv = tl.fdiv(yv * zf, 1.0 + _sfu(zf * -1.4426950408889634, "ex2", FAST_SFU),
                         ieee_rounding=not FAST_SFU)
        yv = tl.where(active, yv, 0.0)
        tl.store(y_ptr + b * s_y_b + t * s_y_t + offs_d * s_y_d,
                 yv.to(y_ptr.dtype.element_ty), mask=md)
        d, xv, Bv, Cv, zv = d_n, x_n, B_n, C_n, z_n


@triton.jit
def _conv_verify_kernel(
    x_ptr, buf_ptr, w_ptr, bias_ptr, idx_ptr, nacc_ptr, out_ptr,
    T, DIM,
    s_x_b, s_x_t, s_x_d, s_buf, s_buf_d, s_buf_l, s_w_d, s_w_k, s_o_b, s_o_t, s_o_d,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    slot = tl.load(idx_ptr + b).to(tl.int64)
    active = slot >= 0
    slot = tl.maximum(slot, 0)
    start = tl.maximum(tl.load(nacc_ptr + b).to(tl.int64) - 1, 0)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs < DIM
    lim = tl.where(active, DIM, 0)                 # channels this row may touch in its buffer
    buf_row = buf_ptr + slot * s_buf + offs * s_buf_d
    x_row = x_ptr + b * s_x_b + offs * s_x_d
    # seq[i] = window column start+i for i < W-1, else new input i-(W-1)
    for t in range(0, T):
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs, mask=md, other=0.0).to(tl.float32)
        for j in tl.static_range(W):
            i = t + j
            v = (tl.load(buf_row + (start + i) * s_buf_l, mask=offs < tl.where(i < W - 1, lim, 0),
                         other=0.0).to(tl.float32)
                 + tl.load(x_row + (i - (W - 1)) * s_x_t, mask=offs < tl.where(i >= W - 1, DIM, 0),
                           other=0.0).to(tl.float32))
            acc += tl.load(w_ptr + offs * s_w_d + j * s_w_k, mask=md, other=0.0).to(tl.float32) * v
        if SILU:
            acc = acc * tl.sigmoid(acc)
        acc = tl.where(active, acc, 0.0)
        tl.store(out_ptr + b * s_o_b + t * s_o_t + offs * s_o_d,
                 acc.to(out_ptr.dtype.element_ty), mask=md)
    tl.debug_barrier()
    # keep the last W-2+T inputs: column c <- seq[c+1]. Column c is written after
    # window column start+c+1 > c was read, by the thread that owns the channel.
    for c in range(0, W - 2 + T):
        i = c + 1
        v = (tl.load(buf_row + (start + i) * s_buf_l, mask=offs < tl.where(i < W - 1, lim, 0),
                     other=0.0)
             + tl.load(x_row + (i - (W - 1)) * s_x_t, mask=offs < tl.where(i >= W - 1, DIM, 0),
                       other=0.0).to(buf_ptr.dtype.element_ty))
        tl.store(buf_row + c * s_buf_l, v, mask=offs < lim)


# Triton >= 3.7 puts the lanes of a [rows, slices, SUB_N] tile on the slices, <= 3.6 on
# the rows (compiled for sm_90 with 3.4-3.9: benchmarks/kernel_sass.py); the Mamba2 loop
# kernel orders its tile so that the rows get them.
_SLICES_FIRST = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)


def _replay_or_new(replay, new):
    """With no replay tokens (R = 0) num_replay is all 0 and nothing is read: pass a real tensor."""
    return new if replay.shape[1] == 0 else replay


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(n), cap)


def _fast_sfu(x: torch.Tensor) -> bool:
    """Whether `_sfu` may use its inline PTX: NVIDIA GPUs (not the
    interpreter's CPU tensors, not ROCm)."""
    return x.is_cuda and torch.version.hip is None


def _check_powers_of_two(fn: str, **tiles) -> None:
    for name, v in tiles.items():
        if v is not None and (v < 1 or v & (v - 1)):
            raise ValueError(f"{fn}: {name} must be a power of two, got {v}")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# A one-warp program of 4096 state values takes 255 registers: 8 fit on an SM.
_ONE_WARP_PROGRAMS_PER_SM = 8


def _loop_tile(P: int, BLOCK_N: int, programs_per_block: int,
               sm_count: int | None) -> tuple[int, int]:
    """(rows of p, warps) of a loop-kernel program. 4096 state values (32 rows at d_state
    128) on one warp where the grid fits on the SMs in one wave (batch 8 at the 8B
    shape: 1.01 / 1.03 / 1.06 / 1.10x against two warps at k = 1 / 2 / 4 / 8); 2048 on one
    warp where it would not (batch 64: 1.01-1.03x; H100,
    benchmarks/results/kernels_ssm_h100_run8_one_warp_tiles_ab.json). Where 32-row
    programs would not give each SM 4, the rows halve, down to 8, on two warps (batch 1:
    8 rows, 1.13-1.16x; batch 4: 16; run 4). ``programs_per_block``: sequences x heads;
    ``sm_count`` None (no GPU): 32 rows, two warps."""
    def programs(r: int) -> int:
        return programs_per_block * triton.cdiv(P, r)

    rows = _block(P, max(1, 4096 // BLOCK_N))
    if not sm_count:
        return rows, 2
    if programs(rows) < 4 * sm_count:
        while rows > 8 and programs(rows) < 4 * sm_count:
            rows //= 2
        return rows, 2
    if rows > 8 and programs(rows) > _ONE_WARP_PROGRAMS_PER_SM * sm_count:
        rows //= 2
    return rows, 1


def mamba2_verify_triton(state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B,
                         C, D, dt_bias, dt_softplus, out=None, block_p: int | None = None,
                         num_warps: int | None = None, algo: str = "auto",
                         dot_precision: str = "tf32x3", sub_n: int = 32):
    """algo "loop": token loop on the register state; "dot": SSD block form (matrix
    products; R and T padded to powers of two >= 16, BLOCK_P >= 16); "auto": "dot"
    only where it measured faster on an H100 (batch 1, T = 9; batch <= 2 with T >= 9 here:
    its cost does not grow with k, but its fixed cost is ~2x the loop's). Loop tile: n in
    32-wide slices, rows and warps by `_loop_tile` (the fastest tiles of the H100 sweeps
    at batch 1 / 8 / 64, benchmarks/results/kernels_ssm_h100_run4_sweep.json and run 8)."""
    batch, T, H, P = x.shape
    _check_powers_of_two("mamba2_verify_triton", block_p=block_p, sub_n=sub_n)
    if algo == "auto":
        algo = "dot" if batch <= 2 and T >= 9 else "loop"
    N = B.shape[-1]
    assert state.dtype == torch.float32, "the verify kernels keep an fp32 state"
    rx, rdt, rB = (_replay_or_new(r, n) for r, n in ((replay_x, x), (replay_dt, dt), (replay_B, B)))
    y = torch.empty_like(x) if out is None else out
    BLOCK_N = triton.next_power_of_2(N)
    sms = _sm_count(x.device) if x.is_cuda and algo == "loop" else None
    # a caller's block_p keeps two warps: the rule's one warp holds only the rule's rows
    BLOCK_P, warps = (block_p, 2) if block_p else _loop_tile(P, BLOCK_N, batch * H, sms)
    extra = dict(SUB_N=min(sub_n, BLOCK_N), SLICES_FIRST=_SLICES_FIRST)
    kernel = _mamba2_verify_kernel
    num_warps = num_warps or (4 if algo == "dot" else warps)
    if algo == "dot":
        BLOCK_P = max(BLOCK_P, 16)
        kernel = _mamba2_verify_dot_kernel
        extra = dict(R_PAD=max(16, triton.next_power_of_2(replay_x.shape[1])),
                     T_PAD=max(16, triton.next_power_of_2(T)), DOT_PRECISION=dot_precision)
    grid = (triton.cdiv(P, BLOCK_P), H, batch)
    kernel[grid](
        state, state_idx, num_replay, rx, rdt, rB, x, dt, B, C, y, A,
        D if D is not None else A, dt_bias if dt_bias is not None else A,
        T, P, N, H // B.shape[2], H // C.shape[2],
        *state.stride(), *rx.stride(), *rdt.stride(), *rB.stride(), *x.stride(), *dt.stride(),
        *B.stride(), *C.stride(), *y.stride(),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, num_warps=num_warps, **extra)
    return y


def _mamba1_warps(programs: int, sm_count: int | None) -> int:
    """4 warps a program (64 channels, 8 state values a thread), 8 where the grid gives
    the SMs fewer than 2 programs each (batch 1 at d_inner 4096: 4.2 against 4.6 us)."""
    return 8 if sm_count and programs < 2 * sm_count else 4


def mamba1_verify_triton(state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B,
                         C, D, z, dt_bias, dt_softplus, out=None, block_d: int = 64,
                         num_warps: int | None = None, sub_n: int = 16):
    """Tile: ``block_d`` channels x d_state, d_state cut into ``sub_n``-wide slices (one
    at d_state 16: a channel on 2 lanes, 8 values each at 4 warps). Within 4% of the
    best of 36 tiles (channels x warps x slice width) at batch 8 and 64, k = 4, on an
    H100 (benchmarks/results/kernels_ssm_h100_run6_mamba1_sweep.json)."""
    batch, T, DIM = x.shape
    _check_powers_of_two("mamba1_verify_triton", block_d=block_d, sub_n=sub_n)
    N = A.shape[-1]
    assert state.dtype == torch.float32, "the verify kernels keep an fp32 state"
    rx, rdt, rB = (_replay_or_new(r, n) for r, n in ((replay_x, x), (replay_dt, dt), (replay_B, B)))
    y = torch.empty_like(x) if out is None else out
    BLOCK_N = triton.next_power_of_2(N)
    SUB_N = min(BLOCK_N, sub_n)
    BLOCK_D = min(block_d, triton.next_power_of_2(DIM))
    programs = batch * triton.cdiv(DIM, BLOCK_D)
    num_warps = num_warps or _mamba1_warps(programs, _sm_count(x.device) if x.is_cuda else None)
    zz = z if z is not None else x
    grid = (triton.cdiv(DIM, BLOCK_D), batch)
    _mamba1_verify_kernel[grid](
        state, state_idx, num_replay, rx, rdt, rB, x, dt, B, C, zz, y, A,
        D if D is not None else A, dt_bias if dt_bias is not None else A,
        T, DIM, N, DIM // B.shape[2], DIM // C.shape[2],
        *state.stride(), *rx.stride(), *rdt.stride(), *rB.stride(), *x.stride(), *dt.stride(),
        *B.stride(), *C.stride(), *zz.stride(), *y.stride(), *A.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=dt_softplus, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, SUB_N=SUB_N,
        SLICES_FIRST=_SLICES_FIRST, FAST_SFU=_fast_sfu(x), num_warps=num_warps)
    return y


def conv_verify_triton(x, conv_state, state_idx, num_accepted, weight, bias, activation, out=None,
                       block_d: int = 256):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unsupported activation {activation!r}")
    batch, T, DIM = x.shape
    out = torch.empty_like(x) if out is None else out
    BLOCK_D = _block(DIM, block_d)
    grid = (triton.cdiv(DIM, BLOCK_D), batch)
    _conv_verify_kernel[grid](
        x, conv_state, weight, bias if bias is not None else weight, state_idx, num_accepted, out,
        T, DIM, *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=activation is not None,
        BLOCK_D=BLOCK_D, num_warps=4)
    return out
