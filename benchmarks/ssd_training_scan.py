"""Mamba2's training scan (forward + backward) three ways, checked and timed side by side.

Which kept library's SSD kernels should the GPU training path take (issue 38)? Candidates:
the reference (:func:`vllm_mamba_hybrid.ops.ssd.ssd_chunk_scan`, unfused PyTorch), fla-core's
``chunk_simple_gla`` (:mod:`vllm_mamba_hybrid.ops.fla_ssd`; its backward is refused on
Hopper with Triton < 3.7.1, then it is timed forward only), and mamba-ssm's Triton SSD
(:mod:`vllm_mamba_hybrid.ops.mamba_ssm_ssd`, what the paper's training code calls), each where
it imports. ``--mamba-ssm-src DIR`` (the folder holding ``mamba_ssm/``, e.g. an unpacked
sdist) puts mamba-ssm's sources on the path where it is not installed.

Every candidate's output, final state and input gradients are compared with the reference
in float64 on the same rounded inputs (relative error printed), then timed (CUDA events).

    python benchmarks/ssd_training_scan.py --mamba-ssm-src /tmp/mssm --out scan.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_mamba_hybrid.ops import fla_ssd, mamba_ssm_ssd  # noqa: E402
from vllm_mamba_hybrid.ops.ssd import ssd_chunk_scan  # noqa: E402

INPUTS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def inputs(b, l, h, g, p, n, dtype, device):
    t = dict(x=torch.randn(b, l, h, p), dt=torch.randn(b, l, h) * 0.7 - 1,
             A=-torch.rand(h) * 4 - 0.05, B=torch.randn(b, l, g, n), C=torch.randn(b, l, h, n),
             D=torch.randn(h), dt_bias=torch.randn(h) * 0.5,
             initial_state=torch.randn(b, h, p, n))
    return {k: (v.to(dtype) if k in ("x", "B", "C") else v).to(device) for k, v in t.items()}


def run(scan, t, backward: bool):
    leaves = {k: v.detach().clone().requires_grad_(backward) for k, v in t.items()}
    y, s = scan(**leaves)
    if backward:
        g = torch.Generator(device=y.device).manual_seed(1)
        wy = torch.randn(y.shape, device=y.device, generator=g)
        ws = torch.randn(s.shape, device=y.device, generator=g)
        ((y.float() * wy).sum() + (s.float() * ws).sum()).backward()
    return y, s, {k: v.grad for k, v in leaves.items()}


def errors(got, ref) -> dict[str, float]:
    y, s, grads = got
    ry, rs, rgrads = ref
    out = {"y": rel(y, ry), "final_state": rel(s, rs)}
    out.update({f"d{k}": rel(grads[k], rgrads[k]) for k in INPUTS if grads[k] is not None})
    return out


def rel(a, b) -> float:
    b = b.double().cpu()
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1.0)).item()


def time_ms(scan, t, backward: bool, reps: int) -> float:
    for _ in range(2):
        run(scan, t, backward)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        run(scan, t, backward)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=6, default=[16, 512, 9, 3, 64, 64],
                   metavar=("B", "L", "H", "G", "P", "N"),
                   help="default: a SmolLM2 50%% Mamba2 layer, 16 x 512 tokens")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--mamba-ssm-src", type=Path, help="folder holding mamba_ssm/ (an unpacked sdist)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.mamba_ssm_src and not (args.mamba_ssm_src / "mamba_ssm/ops/triton/ssd_combined.py").is_file():
        p.error(f"--mamba-ssm-src {args.mamba_ssm_src}: no mamba_ssm/ops/triton/ssd_combined.py "
                f"there (the folder holding mamba_ssm/ of its unpacked sdist; docs/gpu.md)")
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    t = inputs(*args.shape, dtype, "cuda")
    ref = run(ssd_chunk_scan, {k: v.double() for k, v in t.items()}, True)
    candidates = {"reference": (ssd_chunk_scan, True)}
    reason = fla_ssd.unusable_reason(t["x"])          # with gradients
    with torch.no_grad():
        if fla_ssd.unusable_reason(t["x"]) is None:     # the forward alone may still run
            candidates["fla"] = (fla_ssd.ssd_chunk_scan_fla, reason is None)
    if args.mamba_ssm_src:   # found as Python would find an installed mamba_ssm
        sys.path.insert(0, str(args.mamba_ssm_src))
    if mamba_ssm_ssd.unusable_reason(t["x"]) is None:
        candidates["mamba-ssm"] = (mamba_ssm_ssd.ssd_chunk_scan_mamba_ssm, True)
    rows = []
    for name, (scan, backward) in candidates.items():
        row = {"scan": name, "backward": backward,
               "errors": errors(run(scan, t, backward), ref) if backward else
               {"y": rel(run(scan, t, False)[0], ref[0])},
               "fwd_ms": time_ms(scan, t, False, args.reps),
               "fwd_bwd_ms": time_ms(scan, t, True, args.reps) if backward else None}
        rows.append(row)
        worst = max(row["errors"].items(), key=lambda kv: kv[1])
        fb = f"{row['fwd_bwd_ms']:.2f}" if backward else "-"
        print(f"{name:10s} fwd {row['fwd_ms']:.2f} ms  fwd+bwd {fb} ms  "
              f"worst rel err {worst[0]} {worst[1]:.1e}", flush=True)
    if reason:
        print(f"fla: {reason}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"shape": dict(zip("blhgpn", args.shape)), "dtype": args.dtype,
             "device": torch.cuda.get_device_name(), "fla_backward": reason or "ok",
             "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
