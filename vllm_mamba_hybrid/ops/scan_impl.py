"""Which full-sequence scan a mixer's training / prefill forward runs.

``MAMBA_HYBRID_SCAN`` (environment, so that it reaches every training worker) picks it:

- ``auto`` (default): on CUDA a fused kernel (Mamba1: the project's Triton walk,
  :mod:`.triton_scan`; Mamba2: mamba-ssm's Triton SSD, :mod:`.mamba_ssm_ssd`, where it
  imports, else flash-linear-attention's ``chunk_simple_gla``, :mod:`.fla_ssd`, where it can
  run), the reference everywhere else. Mamba2's order is measured: mamba-ssm 4x the
  reference's forward + backward at a 1B-shaped layer on an H100, fla unable to take
  gradients there (docs/gpu.md);
- ``reference``: the plain-PyTorch reference (:func:`.selective_scan.selective_scan_fn`,
  :func:`.ssd.ssd_chunk_scan`) on every device (the old training path, for A/B timing);
- ``triton`` (Mamba1) / ``mamba-ssm`` or ``fla`` (Mamba2): that kernel, an error where it
  cannot run.

The CPU path is always the reference unless a kernel is forced (under
``TRITON_INTERPRET=1`` the forced kernels also run on CPU, slowly: tests only).
"""
from __future__ import annotations

import os

import torch

from . import fla_ssd, mamba_ssm_ssd, triton_scan
from .selective_scan import selective_scan_fn
from .ssd import ssd_chunk_scan
from .triton_step import available

ENV = "MAMBA_HYBRID_SCAN"
KERNELS = {"mamba1": ("triton",), "mamba2": ("mamba-ssm", "fla")}


def requested(variant: str) -> str:
    """The setting for ``variant`` ('mamba1' or 'mamba2'), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    allowed = ("auto", "reference", *KERNELS[variant])
    if value not in allowed:
        raise ValueError(f"{ENV}={value!r} does not apply to {variant}; use one of {allowed}")
    return value


def _forced(name: str, t: torch.Tensor) -> None:
    if not available(t.device):
        raise RuntimeError(f"{ENV}={name} needs CUDA tensors (got {t.device}) "
                           f"or TRITON_INTERPRET=1")
    if t.dtype == torch.float64:
        raise TypeError(f"{ENV}={name} computes in float32 or lower; float64 runs the reference")


def mamba1_scan(u: torch.Tensor):
    """The selective scan for u (the mixer's x)."""
    impl = requested("mamba1")
    if impl == "auto":
        return triton_scan.selective_scan_triton if triton_scan.supports(u) else selective_scan_fn
    if impl == "triton":
        _forced(impl, u)
        return triton_scan.selective_scan_triton
    return selective_scan_fn


def mamba2_scan(x: torch.Tensor):
    """The SSD chunk scan for x (the mixer's per-head input)."""
    impl = requested("mamba2")
    if impl == "auto":
        if mamba_ssm_ssd.supports(x):
            return mamba_ssm_ssd.ssd_chunk_scan_mamba_ssm
        return fla_ssd.ssd_chunk_scan_fla if fla_ssd.supports(x) else ssd_chunk_scan
    if impl == "mamba-ssm":
        _forced(impl, x)
        mamba_ssm_ssd.load()   # a missing mamba-ssm says how to install it, before any work
        return mamba_ssm_ssd.ssd_chunk_scan_mamba_ssm
    if impl == "fla":
        _forced(impl, x)
        fla_ssd.load()   # a missing fla says how to install it, before any work
        reason = fla_ssd.backward_blocker() if torch.is_grad_enabled() else None
        if reason:
            raise RuntimeError(f"{ENV}=fla: {reason}")
        return fla_ssd.ssd_chunk_scan_fla
    return ssd_chunk_scan
