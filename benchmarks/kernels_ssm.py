"""Benchmark of the speculative verify ops (vllm_mamba_hybrid.ops.verify).

Layers of Llama-3-8B shape: Mamba2 (32 heads, head_dim 128, 128x128 fp32 state
per head, B from 8 KV groups) and Mamba1 (d_inner 4096, d_state 16, d_xb 1024:
64 B groups, 256 C groups). bf16 inputs, fp32 state. Every row replays R = k+1
accepted tokens (the worst case: all drafts accepted) and scores T = k+1 new ones.

Minimum bytes of one verify call (each byte read or written once; e = 2 for bf16):
  Mamba2: batch * [ 2 * h*p*n*4                         state read + write
                    + R * (h*p + h + g*n) * e            replay x, dt, B
                    + T * (h*p + h + g*n + gc*n) * e     new x, dt, B, C
                    + T * h*p * e ]                      y
          + 3 * h * 4                                    A, D, dt_bias
  Mamba1: batch * [ 2 * d*n*4 + R * (2*d + g*n) * e + T * (3*d + (g+gc)*n) * e + T * d * e ]
          + d*n*4 + 2 * d * 4                            A, D, dt_bias
The sequential baseline is k+1 single-step updates: the same kernel with R = 1,
T = 1 called k+1 times (a plain decode step: one state read + write each), so its
floor is (k+1) times the state traffic. Roofline: bytes / measured copy bandwidth
(a large device-to-device copy, read + write counted) -- see NOTES_kernels.md.
"copy us" / "%same": a plain copy of the call's minimum bytes, timed the same way, and
its time over the kernel's (100%: as fast as copying its bytes; the fixed cost of a
launch that a few-MB call cannot amortise is in both).

GPU timing: CUDA-graph replays (triton.testing.do_bench_cudagraph, median), each
replay cycling over enough state slots / input sets to exceed the L2 cache 4x.
CPU timing: median wall time, the C++ kernels and the torch path side by side
(--impls), cycling over input sets that exceed the last-level cache 2x.

  python benchmarks/kernels_ssm.py --out results.json            # GPU if present
  python benchmarks/kernels_ssm.py --device cpu --batches 1 8 --out cpu.json
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time

import torch

from vllm_mamba_hybrid.ops.verify import mamba1_verify, mamba2_verify

M2 = dict(h=32, p=128, n=128, g=8, gc=32)
M1 = dict(d=4096, n=16, g=64, gc=256)
L2_BYTES = 50 * 2**20
CPU_CACHE_BYTES = 64 * 2**20
TOKEN_KEYS = ("replay_x", "replay_dt", "replay_B", "x", "dt", "B", "C", "z")


def min_bytes(variant, batch, R, T, e=2):
    if variant == "mamba2":
        h, p, n, g, gc = (M2[k] for k in ("h", "p", "n", "g", "gc"))
        per_row = (2 * h * p * n * 4 + R * (h * p + h + g * n) * e
                   + T * (h * p + h + g * n + gc * n) * e + T * h * p * e)
        return batch * per_row + 3 * h * 4
    d, n, g, gc = (M1[k] for k in ("d", "n", "g", "gc"))
    per_row = 2 * d * n * 4 + R * (2 * d + g * n) * e + T * (3 * d + (g + gc) * n) * e + T * d * e
    return batch * per_row + d * n * 4 + 2 * d * 4


def make_sets(variant, batch, R, T, nsets, device, dtype=torch.bfloat16):
    """nsets independent (state_idx, inputs) sets over one shared state pool."""
    rnd = lambda *s: torch.randn(*s, device=device)
    if variant == "mamba2":
        h, p, n, g, gc = (M2[k] for k in ("h", "p", "n", "g", "gc"))
        state = rnd(nsets * batch, h, p, n) * 0.1
        params = dict(A=-torch.rand(h, device=device) * 4 - 0.2, D=rnd(h), dt_bias=rnd(h) * 0.5)
        shapes = dict(replay_x=(R, h, p), replay_dt=(R, h), replay_B=(R, g, n), x=(T, h, p),
                      dt=(T, h), B=(T, g, n), C=(T, gc, n))
    else:
        d, n, g, gc = (M1[k] for k in ("d", "n", "g", "gc"))
        state = rnd(nsets * batch, d, n) * 0.1
        params = dict(A=-torch.rand(d, n, device=device) * 4 - 0.2, D=rnd(d), dt_bias=rnd(d) * 0.5)
        shapes = dict(replay_x=(R, d), replay_dt=(R, d), replay_B=(R, g, n), x=(T, d), dt=(T, d),
                      B=(T, g, n), C=(T, gc, n), z=(T, d))
    sets = []
    for i in range(nsets):
        inp = {k: (rnd(batch, *s) * (0.5 if "dt" in k else 1.0)).to(dtype) for k, s in shapes.items()}
        inp.update(params, state_idx=torch.arange(i * batch, (i + 1) * batch, device=device,
                                                  dtype=torch.int32),
                   num_replay=torch.full((batch,), R, device=device, dtype=torch.int32))
        sets.append(inp)
    return state, sets


def cache_busting_sets(variant, batch, k, device):
    """(state, input sets, minimum bytes of one call): enough sets of R = T = k+1 tokens
    that cycling over them exceeds the L2 cache 4x (GPU) or the last-level cache 2x."""
    nbytes = min_bytes(variant, batch, k + 1, k + 1)
    cache = 4 * L2_BYTES if device == "cuda" else 2 * CPU_CACHE_BYTES
    nsets = max(1, min(32, -(-cache // nbytes)))
    return (*make_sets(variant, batch, k + 1, k + 1, nsets, device), nbytes)


def step_sets(sets, k):
    """The sequential baseline's k+1 single steps: replay 1 token, score 1 token."""
    out = []
    for s in sets:
        for t in range(k + 1):
            one = {key: v[:, t:t + 1] if key in TOKEN_KEYS else v for key, v in s.items()}
            one["num_replay"] = torch.ones_like(s["num_replay"])
            out.append(one)
    return out


def copy_bandwidth(device):
    """Bytes/s of a large copy, read + write counted."""
    n = 2**28 if device == "cuda" else 2**25                     # 1 GiB / 128 MiB of fp32
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / time_fn(lambda: b.copy_(a), device)


@functools.lru_cache(maxsize=None)
def same_bytes_copy_time(nbytes, nsets, device):
    """Seconds a plain ``copy_`` takes to move ``nbytes`` (half read, half written), cycled
    over nsets buffer pairs as the kernel cycles over its sets: what moving a call's bytes
    costs in this timing regime, launch, ramp-up and tail included; the yardstick for a
    few-MB call, which cannot reach the rate of a 1 GiB copy. Cached: a tile sweep times
    the same bytes for every tile."""
    n = max(1, nbytes // 8)                                        # fp32 values each way
    src = [torch.randn(n, device=device) for _ in range(nsets)]
    dst = [torch.empty_like(s) for s in src]
    return time_fn(lambda: [d.copy_(s) for d, s in zip(dst, src)], device) / nsets


def time_fn(fn, device, reps=None):
    if device == "cuda":
        import triton.testing
        fn()                                                       # compile outside the graph
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e-3
    fn()
    times = []
    for _ in range(reps or 5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(variant, batch, k, device, copy_bw, seq=True, impl=None, **kernel_kw):
    if variant == "mamba2-dot":                 # the block-form Mamba2 kernel (GPU only)
        return dict(run_case("mamba2", batch, k, device, copy_bw, seq, algo="dot", **kernel_kw),
                    variant=variant)
    op = mamba2_verify if variant == "mamba2" else mamba1_verify
    state, sets, nbytes = cache_busting_sets(variant, batch, k, device)
    nsets = len(sets)
    impl = impl or ("triton" if device == "cuda" else "torch")
    if kernel_kw:
        from vllm_mamba_hybrid.ops import triton_verify
        fn_op = getattr(triton_verify, f"{variant}_verify_triton")
        keys = ["state", "state_idx", "replay_x", "replay_dt", "replay_B", "num_replay", "x", "dt",
                "A", "B", "C", "D"] + (["z"] if variant == "mamba1" else []) + ["dt_bias"]
        call = lambda s: fn_op(*[state if key == "state" else s[key] for key in keys], True,
                               **kernel_kw)
    else:
        call = lambda s: op(state=state, **s, impl=impl)
    t_verify = time_fn(lambda: [call(s) for s in sets], device) / nsets
    steps = step_sets(sets, k)
    t_seq = time_fn(lambda: [call(s) for s in steps], device) / nsets if seq else float("nan")
    seq_bytes = (k + 1) * min_bytes(variant, batch, 1, 1)
    t_copy = same_bytes_copy_time(nbytes, nsets, device)
    return dict(variant=variant, batch=batch, k=k, impl=impl, kernel=kernel_kw or "default",
                t_verify_us=t_verify * 1e6, t_seq_us=t_seq * 1e6, speedup=t_seq / t_verify,
                bytes=nbytes, roofline_us=nbytes / copy_bw * 1e6,
                gbps=nbytes / t_verify / 1e9, frac_copy=nbytes / t_verify / copy_bw,
                t_same_copy_us=t_copy * 1e6, frac_same_copy=t_copy / t_verify,
                seq_gbps=seq_bytes / t_seq / 1e9, nsets=nsets)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--variants", nargs="+", default=["mamba2", "mamba1"],
                    help="mamba2, mamba2-dot (block-form kernel, GPU), mamba1")
    ap.add_argument("--sweep", action="store_true",
                    help="also try tile sizes / warps at k = 4 for --variants and --batches (GPU)")
    ap.add_argument("--impls", nargs="+", default=None,
                    help="CPU implementations to time (default: cpp torch; GPU: triton)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = args.device
    if args.sweep and dev != "cuda":
        ap.error("--sweep times the Triton kernels' tiles: it needs --device cuda")
    batches = args.batches or ([1, 8, 64] if dev == "cuda" else [1, 8])
    impls = args.impls or (["triton"] if dev == "cuda" else ["cpp", "torch"])
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    if args.sweep:   # tiles (Mamba2 rows, Mamba1 channels) x warps (x n-slice width) at k = 4
        for variant, blocks, warp_set, subs in (("mamba2", (8, 16, 32, 64), (1, 2, 4, 8), (16, 32)),
                                                ("mamba2-dot", (16, 32, 64), (4, 8), (None,)),
                                                ("mamba1", (32, 64, 128, 256), (1, 2, 4, 8), (4, 8, 16))):
            if variant not in args.variants:
                continue
            for batch, blk, warps, sub in itertools.product(args.batches or (8, 64), blocks,
                                                            warp_set, subs):
                if variant == "mamba1" and not 4 <= blk * M1["n"] // (32 * warps) <= 32:
                    continue            # state values a thread: 4-32
                kw = dict(num_warps=warps, **({"block_d": blk} if variant == "mamba1" else
                                              {"block_p": blk}),
                          **({"sub_n": sub} if sub else {}),
                          **({"algo": "loop"} if sub and variant == "mamba2" else {}))
                r = run_case(variant, batch, 4, dev, bw, seq=False, **kw)
                rows.append(dict(r, sweep=True))
                print(f"sweep {variant} b{batch} " + " ".join(f"{k}={v}" for k, v in kw.items())
                      + f": {r['t_verify_us']:.1f} us {r['frac_copy']:.0%} of copy", flush=True)
    hdr = (f"{'variant':10} {'impl':>6} {'batch':>5} {'k':>2} {'verify us':>10} "
           f"{'roofline us':>11} {'GB/s':>7} {'%copy':>6} {'copy us':>8} {'%same':>6} {'seq us':>9} "
           f"{'speedup':>7}")
    table = []
    for variant in args.variants:
        for impl in impls:
            for batch in batches:
                for k in args.ks:
                    r = run_case(variant, batch, k, dev, bw, impl=impl)
                    rows.append(r)
                    table.append(f"{variant:10} {impl:>6} {batch:5d} {k:2d} {r['t_verify_us']:10.1f} "
                                 f"{r['roofline_us']:11.1f} {r['gbps']:7.0f} {r['frac_copy']:6.0%} "
                                 f"{r['t_same_copy_us']:8.1f} {r['frac_same_copy']:6.0%} "
                                 f"{r['t_seq_us']:9.1f} {r['speedup']:6.2f}x")
                    print(table[-1], flush=True)
    print(f"\n{name}, copy {bw / 1e9:.0f} GB/s\n{hdr}\n" + "\n".join(table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, copy_gbps=bw / 1e9, torch=torch.__version__, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
