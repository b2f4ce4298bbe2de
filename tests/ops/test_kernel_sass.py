"""The Mamba2 verify loop kernel's tile order, checked in the SASS the installed Triton
emits for an H100 (sm_90; compiled on this CPU, no GPU needed).

The sliced-n tile pays only if Triton puts its lanes on rows and slice width, not on
slices; which order does that changed between Triton 3.6 and 3.7, and the kernel picks
the order by version. Per new token the loop must then need clearly fewer instructions
than the other order and than one unsliced tile, without spilling.
"""
import importlib.util
from pathlib import Path

import pytest

from vllm_mamba_hybrid.ops import triton_verify

pytest.importorskip("triton.backends.nvidia")
_spec = importlib.util.spec_from_file_location(
    "kernel_sass", Path(__file__).parents[2] / "benchmarks" / "kernel_sass.py")
kernel_sass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_sass)


def new_token_loop(**kw):
    """(instructions per iteration of the new-token loop, registers, stack bytes)."""
    res, loops = kernel_sass.mamba2_kernel("loop", block_p=32, num_warps=2, **kw)
    assert len(loops) == 2, "expected the replay and the new-token loop"
    return sum(loops[1].values()), res["REG"], res.get("STACK", 0)


def test_picked_slice_order_beats_the_other_and_the_unsliced_tile():
    picked = triton_verify._SLICES_FIRST
    n_picked, regs, stack = new_token_loop(sub_n=32)
    n_other, _, _ = new_token_loop(sub_n=32, slices_first=not picked)
    n_unsliced, _, _ = new_token_loop(sub_n=128)
    assert stack == 0 and regs <= 168, (regs, stack)
    assert n_picked < 0.8 * n_unsliced, (n_picked, n_unsliced)
    assert n_picked < 0.7 * n_other, (n_picked, n_other)
