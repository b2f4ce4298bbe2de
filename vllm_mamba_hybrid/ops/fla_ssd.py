"""Mamba2's SSD scan for training on the GPU, on flash-linear-attention's fused kernels.

Why: the reference :func:`.ssd.ssd_chunk_scan` is an unfused chunked scan (a dozen
einsums and a Python loop over chunks, every intermediate kept for autograd), which
holds the distillation step to a few % MFU on an H100. ``fla-core`` (pure Python +
Triton, no build step; an optional dependency, extra ``[train-gpu]``) ships the same
recurrence with forward and backward kernels: ``chunk_simple_gla`` is gated linear
attention with one scalar log decay per head and token,

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,      o_t = scale * q_t S_t     (S: (K, V) per head)

and Mamba2's SSD (see :mod:`.ssd`) is that with

    q = C,  k = B (groups expanded to heads),  v = dt * x,  g = dt * A,  scale = 1,

the state transposed (fla keeps (d_state, headdim), the project (headdim, d_state)).
dt's bias and softplus, ``g`` and ``dt * x``, the group expansion and the D skip run in
PyTorch around the kernel, so autograd carries the gradients of dt, A, dt_bias and D;
the z gate stays in the mixer's gated norm. Padding needs nothing more than the
reference does: the mixer zeroes x on padded tokens, so they add nothing to the state.

Precision: fla multiplies in the dtype of q/k/v (bf16 tensor cores for a bf16 model;
TF32 for float32 unless ``TRITON_F32_DEFAULT=ieee``) with float32 accumulation and a
float32 state; ``dt * x`` is rounded to x's dtype before the kernel. The reference does
everything in float32, so the two agree to the input dtype's precision, not bit for bit
(tests/ops/test_fla_ssd.py states the tolerances).

fla is imported on first use, never at module import (it is optional and its import
takes seconds). Its kernels also run under ``TRITON_INTERPRET=1`` on CPU with two
test-only patches (tests/ops/test_fla_ssd.py says which and why).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from ._dtype import no_autocast
from .ssd import _heads, _prepare_dt, check_scan_shapes

FLA_CHUNK = 64  # fla's chunk length (its kernels are tuned for it); the scan's result
                # does not depend on it, so the mixer's ssm_chunk_size is not passed on


def fla_installed() -> bool:
    """Whether ``fla`` can be found (cheap: does not import it)."""
    return importlib.util.find_spec("fla") is not None


@functools.cache
def _chunk_simple_gla():
    """fla's kernel entry point, or the ImportError that stopped it (cached either way)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:   # not installed, or a dependency of it missing (einops, triton)
        return e
    return chunk_simple_gla


def load() -> "callable":
    """``fla.ops.simple_gla.chunk_simple_gla``; a clear error where it cannot be imported."""
    fn = _chunk_simple_gla()
    if isinstance(fn, ImportError):
        raise RuntimeError(
            "the 'fla' Mamba2 scan needs flash-linear-attention's kernels: "
            "pip install 'vllm-mamba-hybrid[train-gpu]' (or fla-core==0.6.0; on the lent GPU "
            f"machine see docs/gpu.md); import failed with: {fn!r}") from fn
    return fn


@functools.cache
def backward_blocker() -> str | None:
    """Why fla refuses the backward this scan needs on this machine, else None.

    fla 0.6.0 raises in its gated ``chunk_bwd_dqkwg`` on Hopper GPUs with Triton >= 3.4.0
    and < 3.7.1 (wrong results there, fla issue #640) unless its tilelang backend is
    installed: the lent H100 (torch 2.11, Triton 3.6) is such a machine (seen 2026-12-07,
    at the first backward of a training step). Asked up front, so that training falls back
    to the reference (``auto``) or stops before its first step (forced), with the reason."""
    from fla.backends import TileLangBackend
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    if (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1
            and not TileLangBackend.is_available()):
        import triton
        return (f"fla-core refuses the Mamba2 scan's backward on Hopper GPUs with Triton "
                f"{triton.__version__} (fla issue #640): it needs Triton >= 3.7.1 or tilelang")
    return None


def unusable_reason(x: torch.Tensor) -> str | None:
    """Why the mixer cannot take this scan for ``x`` (None: it can): it needs CUDA, float32
    or lower, an importable fla, and where gradients are taken, fla's backward on this GPU."""
    if not x.is_cuda or x.dtype == torch.float64:
        return f"fla's kernels take CUDA tensors of float32 or lower, not {x.dtype} on {x.device}"
    if not fla_installed() or isinstance(_chunk_simple_gla(), ImportError):
        return "fla-core is not importable (extra [train-gpu]; docs/gpu.md)"
    return backward_blocker() if torch.is_grad_enabled() else None


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(f"{reason}; training runs the reference Mamba2 scan instead", stacklevel=3)


def supports(x: torch.Tensor) -> bool:
    """Whether ``auto`` takes this scan for ``x``; a GPU where fla cannot take gradients is
    said once (a warning), since the user installed fla to have it."""
    reason = unusable_reason(x)
    if reason and x.is_cuda and fla_installed():
        _warn_fallback(reason)
    return reason is None


@torch.compiler.disable  # a compiled layer calls the kernels as they are (graph break)
@no_autocast
def ssd_chunk_scan_fla(
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
    """Same contract as :func:`.ssd.ssd_chunk_scan`: x: (b, l, h, p); dt: (b, l, h);
    A, D, dt_bias: (h,); B, C: (b, l, g, n); initial_state: (b, h, p, n).
    Returns ``(y (b, l, h, p) in x's dtype, final_state (b, h, p, n) float32)``,
    differentiable in every tensor input. ``chunk_size`` is accepted and not used
    (fla chunks by :data:`FLA_CHUNK`); float64 is not supported (use the reference)."""
    del chunk_size
    check_scan_shapes("ssd_chunk_scan_fla", x, dt, A, B, C, D, dt_bias, initial_state)
    h = x.shape[2]
    chunk_simple_gla = load()
    kd = x.dtype                                         # the kernels' operand dtype
    dtf = _prepare_dt(dt, dt_bias, dt_softplus)          # (b, l, h) float32
    q = _heads(C.to(kd), h, 2)
    k = _heads(B.to(kd), h, 2)
    v = (x.float() * dtf.unsqueeze(-1)).to(kd)
    logdecay = dtf * A.float()                           # (b, l, h) float32, <= 0
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2)
    o, final = chunk_simple_gla(q, k, v, g=logdecay, scale=1.0, initial_state=h0,
                                output_final_state=True, chunk_size=FLA_CHUNK)
    y = o.float()
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), final.float().transpose(-1, -2)
