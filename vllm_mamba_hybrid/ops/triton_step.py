"""Triton kernels for one decode step (CUDA; also run under TRITON_INTERPRET=1 in tests).

Why: a decode step at batch 1 is a few hundred tiny ops; each torch op is one
kernel launch, and for small models the launches, not the bytes, set the speed.
These kernels fuse what the reference does in many ops into one launch each:
residual add + RMSNorm, SiLU-gate, RoPE + KV-cache write, split-K decode
attention, the causal-conv update and the SSM update (Mamba1; Mamba2 with its
gated per-head RMSNorm). States are updated in place, so a CUDA graph can replay
them on static buffers. Rounding mimics the reference (bf16 where it rounds), and
the decode step is tested against the reference model on a GPU (tests/runtime/test_runtime_gpu.py).
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU-only installs
    HAVE_TRITON = False


def available(device: torch.device) -> bool:
    """Kernels run on CUDA tensors (or anywhere under the Triton interpreter)."""
    import os
    return HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


if HAVE_TRITON:
    @triton.jit
    def _rnd(x, like_ptr):
        """Round through the storage dtype of ``like_ptr`` (where the reference rounds)."""
        return x.to(like_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, h_ptr, res_ptr, out_ptr, w_ptr, N, eps,
                            HAS_H: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_H:
            h = tl.load(h_ptr + row * N + offs, mask=m, other=0.0).to(tl.float32)
            x = _rnd(x + h, res_ptr)
            tl.store(res_ptr + row * N + offs, x.to(res_ptr.dtype.element_ty), mask=m)
        var = tl.sum(x * x, 0) / N
        y = _rnd(x * tl.rsqrt(var + eps), out_ptr)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs, (y * w).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < I
        g = tl.load(gu_ptr + row * 2 * I + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * I + I + offs, mask=m, other=0.0).to(tl.float32)
        s = _rnd(g * tl.sigmoid(g), out_ptr)
        tl.store(out_ptr + row * I + offs, (s * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_write_kernel(qkv_ptr, s_qkv_b, s_qkv_t, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, end_ptr,
                           T, H, KVH, L, D: tl.constexpr, HALF: tl.constexpr):
        bt = tl.program_id(0)
        hh = tl.program_id(1)
        b = bt // T
        t = bt % T
        base = qkv_ptr + b.to(tl.int64) * s_qkv_b + t * s_qkv_t
        i = tl.arange(0, HALF)
        c1 = tl.load(cos_ptr + bt * D + i).to(tl.float32)
        c2 = tl.load(cos_ptr + bt * D + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + bt * D + i).to(tl.float32)
        s2 = tl.load(sin_ptr + bt * D + HALF + i).to(tl.float32)
        if hh < H:
            src = base + hh * D
            x1 = tl.load(src + i).to(tl.float32)
            x2 = tl.load(src + HALF + i).to(tl.float32)
            o1 = _rnd(x1 * c1, q_ptr) + _rnd(-x2 * s1, q_ptr)
            o2 = _rnd(x2 * c2, q_ptr) + _rnd(x1 * s2, q_ptr)
            dst = q_ptr + (bt.to(tl.int64) * H + hh) * D
            tl.store(dst + i, o1.to(q_ptr.dtype.element_ty))
            tl.store(dst + HALF + i, o2.to(q_ptr.dtype.element_ty))
        else:  # names differ from the then-branch: Triton unifies same-named values
            kv = hh - H
            slot = tl.load(end_ptr + b) + t
            kdst = ((b.to(tl.int64) * KVH + kv) * L + slot) * D
            ksrc = base + (H + kv) * D
            k1 = tl.load(ksrc + i).to(tl.float32)
            k2 = tl.load(ksrc + HALF + i).to(tl.float32)
            ko1 = _rnd(k1 * c1, k_ptr) + _rnd(-k2 * s1, k_ptr)
            ko2 = _rnd(k2 * c2, k_ptr) + _rnd(k1 * s2, k_ptr)
            tl.store(k_ptr + kdst + i, ko1.to(k_ptr.dtype.element_ty))
            tl.store(k_ptr + kdst + HALF + i, ko2.to(k_ptr.dtype.element_ty))
            vsrc = base + (H + KVH + kv) * D
            tl.store(v_ptr + kdst + i, tl.load(vsrc + i))
            tl.store(v_ptr + kdst + HALF + i, tl.load(vsrc + HALF + i))

    @triton.jit
    def _attn_split_kernel(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, o_ptr, m_ptr, l_ptr,
                           T, H, KVH, L, G, CHUNK, S, scale,
                           D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           IEEE: tl.constexpr):
        """One (row, kv head, key split): online softmax over the split's keys for all
        G*T queries that share the kv head (GQA rows stacked into one tile)."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        b = pid // KVH
        kv = pid % KVH
        r = tl.arange(0, BM)
        g = r // T
        t = r % T
        rvalid = r < G * T
        d = tl.arange(0, D)
        head = kv * G + g
        q = tl.load(q_ptr + ((b * T + t).to(tl.int64) * H + head)[:, None] * D + d[None, :],
                    mask=rvalid[:, None], other=0.0)
        st = tl.load(start_ptr + b).to(tl.int32)
        en = tl.load(end_ptr + b).to(tl.int32)
        lo = s * CHUNK
        hi = tl.minimum(lo + CHUNK, en + T)
        m_i = tl.full([BM], -1.0e30, tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        kbase = (b.to(tl.int64) * KVH + kv) * L
        for n0 in range(lo, hi, BN):
            j = n0 + tl.arange(0, BN)
            kmask = j < hi
            k = tl.load(k_ptr + (kbase + j)[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = sc * scale
            ok = (j[None, :] >= st) & (j[None, :] <= en + t[:, None]) & kmask[None, :]
            sc = tl.where(ok, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            p = tl.exp(sc - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + (kbase + j)[:, None] * D + d[None, :], mask=kmask[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row = (pid.to(tl.int64) * S + s) * BM + r
        tl.store(o_ptr + row[:, None] * D + d[None, :], acc)
        tl.store(m_ptr + row, m_i)
        tl.store(l_ptr + row, l_i)

    @triton.jit
    def _attn_combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, T, H, KVH, G, S,
                             D: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.program_id(1)
        b = pid // KVH
        kv = pid % KVH
        ss = tl.arange(0, BS)
        smask = ss < S
        rows = (pid.to(tl.int64) * S + ss) * BM + r
        m = tl.load(m_ptr + rows, mask=smask, other=-1.0e30)
        l = tl.load(l_ptr + rows, mask=smask, other=0.0)
        mx = tl.max(m, 0)
        w = tl.where(smask, tl.exp(m - mx), 0.0)
        den = tl.sum(w * l, 0)
        d = tl.arange(0, D)
        o = tl.load(o_ptr + rows[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        out = tl.sum(w[:, None] * o, 0) / den
        g = r // T
        t = r % T
        dst = out_ptr + ((b * T + t).to(tl.int64) * H + kv * G + g) * D + d
        tl.store(dst, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _conv_step_kernel(x_ptr, s_x_b, state_ptr, w_ptr, bias_ptr, out_ptr, DIM, SRC_GROUP, SRC_REP,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """Width-4 causal conv, one token: out = silu(w . [state, x] + bias), state shifted
        in place. Channel c reads input channel src(c) (the GQA repeat, not materialised)."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < DIM
        src = (c // SRC_GROUP // SRC_REP) * SRC_GROUP + c % SRC_GROUP
        x = tl.load(x_ptr + b * s_x_b + src, mask=m, other=0.0).to(tl.float32)
        sp = state_ptr + (b * DIM + c) * 3
        s0 = tl.load(sp, mask=m, other=0.0)
        s1 = tl.load(sp + 1, mask=m, other=0.0)
        s2 = tl.load(sp + 2, mask=m, other=0.0)
        wp = w_ptr + c * 4
        acc = (s0.to(tl.float32) * tl.load(wp, mask=m, other=0.0).to(tl.float32)
               + s1.to(tl.float32) * tl.load(wp + 1, mask=m, other=0.0).to(tl.float32)
               + s2.to(tl.float32) * tl.load(wp + 2, mask=m, other=0.0).to(tl.float32)
               + x * tl.load(wp + 3, mask=m, other=0.0).to(tl.float32))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=m, other=0.0).to(tl.float32)
        acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + b * DIM + c, acc.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(sp, s1, mask=m)
        tl.store(sp + 1, s2, mask=m)
        tl.store(sp + 2, x.to(state_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _softplus(x):
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))

    @triton.jit
    def _ssd_step_kernel(state_ptr, xbc_ptr, dt_ptr, s_dt_b, z_ptr, s_z_b, A_log_ptr, D_ptr,
                         dt_bias_ptr, nw_ptr, y32_ptr, y_ptr, H, REP, D_XB, CONV_DIM, eps,
                         P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr):
        """Mamba2 head (b, h): S = exp(dt A) S + dt x B^T; y = S C + D x; then the gated
        per-head RMSNorm rmsnorm(y * silu(z)) * w, all in one program."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        g = h // REP
        n = tl.arange(0, N)
        xbc = xbc_ptr + b * CONV_DIM
        dt = _softplus(tl.load(dt_ptr + b * s_dt_b + h).to(tl.float32)
                       + tl.load(dt_bias_ptr + h).to(tl.float32))
        dA = tl.exp(dt * -tl.exp(tl.load(A_log_ptr + h).to(tl.float32)))
        Bv = tl.load(xbc + D_XB + g * N + n).to(tl.float32)
        Cv = tl.load(xbc + 2 * D_XB + h * N + n).to(tl.float32)
        Dh = tl.load(D_ptr + h).to(tl.float32)
        sq = tl.zeros([BP], tl.float32)
        for p0 in tl.static_range(0, P, BP):
            p = p0 + tl.arange(0, BP)
            x = tl.load(xbc + g * P + p).to(tl.float32)
            sp = state_ptr + ((b * H + h) * P + p)[:, None] * N + n[None, :]
            s = tl.load(sp) * dA + (dt * x)[:, None] * Bv[None, :]
            tl.store(sp, s)
            y = _rnd(tl.sum(s * Cv[None, :], 1) + Dh * x, y_ptr)
            z = tl.load(z_ptr + b * s_z_b + h * P + p).to(tl.float32)
            gz = y * (z * tl.sigmoid(z))
            sq += gz * gz
            tl.store(y32_ptr + (b * H + h) * P + p, gz)
        tl.debug_barrier()  # the second pass reads what other threads of this program wrote
        r = tl.rsqrt(tl.sum(sq, 0) / P + eps)
        for p0 in tl.static_range(0, P, BP):
            p = p0 + tl.arange(0, BP)
            gz = tl.load(y32_ptr + (b * H + h) * P + p)
            w = tl.load(nw_ptr + h * P + p).to(tl.float32)
            tl.store(y_ptr + (b * H + h) * P + p, (gz * r * w).to(y_ptr.dtype.element_ty))

    @triton.jit
    def _selective_step_kernel(state_ptr, x_ptr, dt_ptr, s_dt_b, dt_bias_ptr, A_log_ptr, B_ptr, s_B_b,
                               C_ptr, s_C_b, D_ptr, z_ptr, s_z_b, y_ptr, DIM, REP,
                               N: tl.constexpr, BLOCK: tl.constexpr):
        """Mamba1 channels: h = exp(dt A) h + dt x B; y = (h . C + D x) * silu(z).
        Channel c reads B group (c // N) // REP (GQA repeat of B_proj) and C group c // N."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < DIM
        n = tl.arange(0, N)
        m2 = m[:, None]
        x = tl.load(x_ptr + b * DIM + c, mask=m, other=0.0).to(tl.float32)
        dt = _softplus(tl.load(dt_ptr + b * s_dt_b + c, mask=m, other=0.0).to(tl.float32)
                       + tl.load(dt_bias_ptr + c, mask=m, other=0.0).to(tl.float32))
        A = -tl.exp(tl.load(A_log_ptr + c[:, None] * N + n[None, :], mask=m2, other=0.0).to(tl.float32))
        gi = c // N
        Bm = tl.load(B_ptr + b * s_B_b + ((gi // REP) * N)[:, None] + n[None, :], mask=m2,
                     other=0.0).to(tl.float32)
        Cm = tl.load(C_ptr + b * s_C_b + (gi * N)[:, None] + n[None, :], mask=m2, other=0.0).to(tl.float32)
        sp = state_ptr + (b * DIM + c)[:, None] * N + n[None, :]
        s = tl.load(sp, mask=m2, other=0.0) * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bm
        tl.store(sp, s, mask=m2)
        y = tl.sum(s * Cm, 1) + tl.load(D_ptr + c, mask=m, other=0.0).to(tl.float32) * x
        z = tl.load(z_ptr + b * s_z_b + c, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + b * DIM + c, (y * z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=m)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def add_rmsnorm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(x + h, rmsnorm(x + h) * weight) for rows of x (LlamaRMSNorm's rounding); h=None: no add."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    res = torch.empty_like(x2) if h is not None else x2
    out = torch.empty_like(x2)
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, h.reshape(-1, n) if h is not None else x2, res, out, weight,
                                        n, eps, HAS_H=h is not None, BLOCK=_pow2(n))
    return res.view(x.shape), out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [gate | up] projection output."""
    two_i = gate_up.shape[-1]
    rows = gate_up.reshape(-1, two_i)
    out = torch.empty(rows.shape[0], two_i // 2, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(two_i // 2))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(two_i // 2, block))](rows, out, two_i // 2, BLOCK=block)
    return out.view(*gate_up.shape[:-1], two_i // 2)


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
               value_cache: torch.Tensor, end: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate q and k of a fused qkv (b, t, (H + 2 KVH) * D) projection; k and v go to
    cache slots end[b] + t. Returns q (b, t, H, D)."""
    b, t, _ = qkv.shape
    _, kvh, L, d = key_cache.shape
    assert qkv.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    q = torch.empty(b, t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    _rope_write_kernel[(b * t, num_heads + kvh)](qkv, qkv.stride(0), qkv.stride(1), cos, sin, q,
                                                 key_cache, value_cache, end, t, num_heads, kvh, L,
                                                 D=d, HALF=d // 2)
    return q


def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     start: torch.Tensor, end: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """Attention of t new queries (b, t, H, D) over cache slots [start[b], end[b] + t]
    (query t sees slots up to its own). Split-K: each program reads one slice of the
    keys once for every query head of its kv head, then a small kernel merges."""
    b, t, H, d = q.shape
    _, kvh, L, _ = key_cache.shape
    G = H // kvh
    BN = 64
    BM = max(16, _pow2(G * t))
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = max(1, min(triton.cdiv(L, BN), triton.cdiv(2 * sms, b * kvh)))
    chunk = triton.cdiv(triton.cdiv(L, splits), BN) * BN
    splits = triton.cdiv(L, chunk)
    o = torch.empty(b * kvh, splits, BM, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b * kvh, splits, BM, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _attn_split_kernel[(b * kvh, splits)](q, key_cache, value_cache, start, end, o, m, l,
                                          t, H, kvh, L, G, chunk, splits, 1.0 / math.sqrt(d),
                                          D=d, BM=BM, BN=BN, IEEE=q.dtype == torch.float32)
    out = torch.empty_like(q)
    _attn_combine_kernel[(b * kvh, G * t)](o, m, l, out, t, H, kvh, G, splits, D=d, BM=BM,
                                           BS=max(2, _pow2(splits)))
    return out


def conv_step(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              src_group: int = 1, src_rep: int = 1) -> torch.Tensor:
    """causal_conv1d_update (width 4, silu) with the state (b, dim, 3) shifted in place.
    x: (b, dim_in) with unit channel stride; channel c reads x[src(c)] (GQA repeat)."""
    b, dim, w1 = state.shape
    assert w1 == 3 and x.stride(-1) == 1 and state.is_contiguous()
    out = torch.empty(b, dim, dtype=x.dtype, device=x.device)
    block = 256
    _conv_step_kernel[(b, triton.cdiv(dim, block))](x, x.stride(0), state, weight, bias, out, dim,
                                                    src_group, src_rep, HAS_BIAS=bias is not None,
                                                    BLOCK=block)
    return out


def ssd_step(state: torch.Tensor, xbc: torch.Tensor, dt: torch.Tensor, z: torch.Tensor, A_log, D,
             dt_bias, norm_weight, eps: float, d_xb: int) -> torch.Tensor:
    """Mamba2 SSM step + gated per-head RMSNorm; state (b, H, P, N) fp32 updated in place.
    xbc: conv output (b, 2 d_xb + H P); dt, z: (b, H), (b, H P). Returns (b, H P)."""
    b, H, P, N = state.shape
    assert state.is_contiguous() and xbc.is_contiguous() and dt.stride(-1) == 1 and z.stride(-1) == 1
    y = torch.empty(b, H * P, dtype=xbc.dtype, device=xbc.device)
    y32 = torch.empty(b, H * P, dtype=torch.float32, device=xbc.device)
    bp = max(1, min(P, 4096 // N))
    _ssd_step_kernel[(b, H)](state, xbc, dt, dt.stride(0), z, z.stride(0), A_log, D, dt_bias,
                             norm_weight, y32, y, H, H // (d_xb // P), d_xb, xbc.shape[-1], eps,
                             P=P, N=N, BP=bp)
    return y


def selective_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, dt_bias, A_log,
                   B: torch.Tensor, C: torch.Tensor, D, z: torch.Tensor, rep: int) -> torch.Tensor:
    """Mamba1 SSM step (softplus(dt + dt_bias), gate silu(z)); state (b, d, N) fp32 in place.
    B: (b, d_xb) un-repeated B_proj output; C: (b, d). Returns y (b, d)."""
    b, dim, N = state.shape
    assert state.is_contiguous() and x.is_contiguous()
    for t in (dt, B, C, z):
        assert t.stride(-1) == 1
    y = torch.empty(b, dim, dtype=x.dtype, device=x.device)
    block = max(1, min(128, 2048 // N))
    _selective_step_kernel[(b, triton.cdiv(dim, block))](state, x, dt, dt.stride(0), dt_bias, A_log,
                                                         B, B.stride(0), C, C.stride(0), D, z, z.stride(0),
                                                         y, dim, rep, N=N, BLOCK=block)
    return y
