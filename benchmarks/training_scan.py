"""Time of the Mamba1 training scan (Triton, forward and backward) over launch settings.

The scan walks the tokens in order, so it is latency-bound: its bytes and FLOPs (printed
next to the time as a roofline) are far below what the GPU moves in that time. This
sweeps the two launch settings, channels a program and warps a program, at a layer's
shape, and prints ms per call and the share of the roofline.

    python benchmarks/training_scan.py --shape 32 9 64 64 512 --out scan.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_gpu import timed  # noqa: E402
from vllm_mamba_hybrid.ops import triton_scan  # noqa: E402

HBM_BYTES_S = 4.8e12    # H200 HBM3e (datasheet); an H100 SXM has 3.35e12
FP32_FLOPS = 67e12      # H100/H200 SXM fp32 non-tensor (datasheet)


def roofline_ms(b, g, r, n, l, block_d) -> float:
    """Lower bound for forward + backward at the GPU's datasheet rates. Bytes: per token and
    channel u (bf16) and dt (fp32) read three times (forward, recomputation, walk back), y,
    dy, du and ddt (fp32) once; per token and group B and C (bf16) three times, dB and dC
    (fp32) added once by each program of the group. FLOPs: about 36 per state element and
    token over the three passes (an exp counted as one)."""
    d, programs_per_group = g * r, -(-r // min(r, block_d))
    io = b * l * (d * ((2 + 4) * 3 + 4 * 4) + g * n * ((2 + 2) * 3 + 2 * 4 * programs_per_group))
    flops = b * l * d * n * 36
    return max(io / HBM_BYTES_S, flops / FP32_FLOPS) * 1e3


def time_ms(x: dict, backward: bool, reps: int) -> float:
    def call():
        y, _ = triton_scan.selective_scan_triton(**x, delta_softplus=True)
        if backward:
            y.float().sum().backward()
    return timed(call, reps) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=5, action="append", metavar=("B", "G", "R", "N", "L"),
                   help="batch, B/C groups, channels a group, d_state, tokens (repeatable; "
                        "default: SmolLM2's Mamba1 layer at d_state 16 and 64, 32 x 512)")
    p.add_argument("--block-d", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--num-warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    for flag, values in (("--block-d", args.block_d), ("--num-warps", args.num_warps)):
        bad = [v for v in values if v < 1 or v & (v - 1)]
        if bad:   # Triton block sizes and warp counts are powers of two
            p.error(f"{flag} takes powers of two, got {bad}")
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    bad = [s for s in args.shape or [] if min(s) < 1]
    if bad:
        p.error(f"--shape takes positive B G R N L, got {bad}")
    if not torch.cuda.is_available():
        raise SystemExit("training_scan.py times the Triton scan on a CUDA GPU; none is visible")
    shapes = args.shape or [[32, 36, 16, 16, 512], [32, 9, 64, 64, 512]]
    rows, default = [], dict(triton_scan.LAUNCH)
    print(f"{'shape (b g r n l)':<24}{'block_d':>8}{'warps':>6}{'fwd ms':>9}{'fwd+bwd ms':>12}"
          f"{'roofline ms':>13}{'of roofline':>12}")
    try:
        for shape, bd, nw in itertools.product(shapes, args.block_d, args.num_warps):
            b, g, r, n, l = shape
            d = g * r
            dev = torch.device("cuda")
            x = dict(u=torch.randn(b, d, l, device=dev, dtype=torch.bfloat16),
                     delta=torch.randn(b, d, l, device=dev, dtype=torch.bfloat16) - 1,
                     A=-torch.rand(d, n, device=dev) - 0.1,
                     B=torch.randn(b, g, n, l, device=dev, dtype=torch.bfloat16),
                     C=torch.randn(b, g, n, l, device=dev, dtype=torch.bfloat16))
            for v in x.values():
                v.requires_grad_()
            triton_scan.LAUNCH.update(block_d=bd, num_warps=nw)
            fwd, both = time_ms(x, False, args.reps), time_ms(x, True, args.reps)
            roof = roofline_ms(b, g, r, n, l, bd)
            rows.append(dict(shape=shape, block_d=bd, num_warps=nw, fwd_ms=fwd, fwd_bwd_ms=both,
                             roofline_ms=roof))
            print(f"{' '.join(map(str, shape)):<24}{bd:>8}{nw:>6}{fwd:>9.2f}{both:>12.2f}"
                  f"{roof:>13.3f}{roof / both:>11.1%}", flush=True)
    finally:
        triton_scan.LAUNCH.update(default)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
