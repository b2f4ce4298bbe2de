"""Mamba2's SSD scan for training on the GPU, on mamba-ssm's Triton kernels.

Why: the reference :func:`.ssd.ssd_chunk_scan` is an unfused chunked scan. mamba-ssm's
``mamba_chunk_scan_combined`` (forward and backward in Triton; what the paper's training
code calls) computes the same recurrence fused. Measured on the lent H100, bf16, forward +
backward (``benchmarks/ssd_training_scan.py``, 2026-12-07): 3.8 ms against the reference's
15.5 ms at a 1B-shaped layer (8 x 2048 tokens, 32 heads, 8 groups, 64 x 64), even at
SmolLM2's (16 x 512 tokens, 9 heads: 4.8 vs 4.6 ms), every output and gradient within
3.4e-3 of float64 (the reference's own bf16 error: 2.9e-3). fla's kernels
(:mod:`.fla_ssd`) cannot take gradients on that machine.

Loading: ``import mamba_ssm`` runs the package's ``__init__``, which imports its CUDA
extension; a pip install that could not build it (no nvcc, ``MAMBA_SKIP_CUDA_BUILD=TRUE``)
or a bare copy of its sources on ``sys.path`` has the Triton modules but no extension.
Those modules need only torch, triton and einops, so where the normal import fails they are
loaded from the package's folder with the package ``__init__`` skipped (``mamba_ssm`` is
then a bare namespace in this process: it had no working ``__init__`` anyway).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

from ._dtype import no_autocast
from .ssd import _heads, check_scan_shapes

ENTRY = "mamba_ssm.ops.triton.ssd_combined"
# The packages the SSD modules import from (their own __init__ files import nothing we need).
_PACKAGES = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils")


def package_dir() -> Path | None:
    """The ``mamba_ssm`` folder Python would import (found without importing it)."""
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else \
        sys.modules["mamba_ssm"].__spec__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _load_by_path(root: Path):
    """``ENTRY`` from the folder ``root`` with the package ``__init__`` files skipped."""
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]   # what a failed normal import left half-done
    for name in _PACKAGES:
        module = types.ModuleType(name)
        module.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = module
    return importlib.import_module(ENTRY).mamba_chunk_scan_combined


@functools.cache
def _combined():
    """mamba-ssm's ``mamba_chunk_scan_combined``, or the ImportError that stopped it."""
    root = package_dir()
    if root is None:
        return ImportError("No module named 'mamba_ssm'")
    try:
        return importlib.import_module(ENTRY).mamba_chunk_scan_combined
    except ImportError as normal:   # usually its CUDA extension (selective_scan_cuda)
        try:
            return _load_by_path(root)
        except ImportError as by_path:
            by_path.__cause__ = normal
            return by_path


def load():
    """``mamba_chunk_scan_combined``; a clear error where it cannot be imported."""
    fn = _combined()
    if isinstance(fn, ImportError):
        raise RuntimeError(
            "the 'mamba-ssm' Mamba2 scan needs mamba-ssm's Triton kernels: pip install "
            "'vllm-mamba-hybrid[accel]' (its CUDA extension is not needed: "
            "MAMBA_SKIP_CUDA_BUILD=TRUE pip install --no-build-isolation mamba-ssm; on the "
            f"lent GPU machine see docs/gpu.md); import failed with: {fn!r}") from fn
    return fn


def unusable_reason(x: torch.Tensor) -> str | None:
    """Why the mixer cannot take this scan for ``x`` (None: it can): CUDA tensors of
    float32 or lower and importable kernels."""
    if not x.is_cuda or x.dtype == torch.float64:
        return f"mamba-ssm's kernels take CUDA tensors of float32 or lower, not {x.dtype} on {x.device}"
    if isinstance(_combined(), ImportError):
        return "mamba-ssm's Triton kernels are not importable (extra [accel]; docs/gpu.md)"
    return None


def supports(x: torch.Tensor) -> bool:
    return unusable_reason(x) is None


@torch.compiler.disable  # a compiled layer calls the kernels as they are (graph break)
@no_autocast
def ssd_chunk_scan_mamba_ssm(
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
    A, D, dt_bias: (h,); B, C: (b, l, g, n); initial_state: (b, h, p, n). Returns
    ``(y (b, l, h, p) in x's dtype, final_state (b, h, p, n) float32)``, differentiable in
    every tensor input. mamba-ssm gives B and C one group count, so where they differ (the
    hybrids' per-head C) both are expanded to the heads."""
    check_scan_shapes("ssd_chunk_scan_mamba_ssm", x, dt, A, B, C, D, dt_bias, initial_state)
    h = x.shape[2]
    if C.shape[2] != B.shape[2]:   # mamba-ssm takes one group count: expand both to the heads
        B, C = _heads(B, h, 2), _heads(C, h, 2)
    y, final = load()(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                      initial_states=initial_state, dt_softplus=dt_softplus,
                      return_final_states=True)
    return y, final.float()
