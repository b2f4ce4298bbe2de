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
    "kernel_sass", Path(__file__).parents[1] / "benchmarks" / "kernel_sass.py")
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


def test_prefetching_walk_keeps_the_token_loops_without_spills():
    """A program walking sequences (PREFETCH) nests the token loops in the walk: the SASS
    reading must still find exactly the replay and the new-token loop, and the doubled
    state tile must fit in registers."""
    n_walk, regs, stack = new_token_loop(sub_n=32, prefetch=True)
    n_plain, regs_plain, _ = new_token_loop(sub_n=32)
    assert stack == 0 and regs_plain < regs <= 255, (regs_plain, regs, stack)
    assert n_walk < 1.1 * n_plain, (n_walk, n_plain)
