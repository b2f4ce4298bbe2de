"""The Mamba2 Triton verify kernel against a baseline copy of ``triton_verify.py`` (another
revision), timed side by side on the same inputs; y and state of the two are compared.

Ratios between kernel versions are only meaningful from one call on one card, so this
times both in one process (CUDA-graph medians as in kernels_ssm.py):

  git show 3f49949:vllm_mamba_hybrid/ops/triton_verify.py > /tmp/base_triton_verify.py
  python benchmarks/kernels_ab.py --baseline /tmp/base_triton_verify.py --out ab.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch

import kernels_ssm as ks
from vllm_mamba_hybrid.ops import triton_verify

KEYS = ["state", "state_idx", "replay_x", "replay_dt", "replay_B", "num_replay", "x", "dt",
        "A", "B", "C", "D", "dt_bias"]


def load_baseline(path: str):
    """``mamba2_verify_triton`` of a triton_verify.py file."""
    if not os.path.isfile(path):
        raise SystemExit(f"--baseline {path}: no such file")
    spec = importlib.util.spec_from_file_location("baseline_triton_verify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "mamba2_verify_triton"):
        raise SystemExit(f"--baseline {path}: defines no mamba2_verify_triton")
    return module.mamba2_verify_triton


def tile(text: str) -> tuple[int, int, int]:
    """'sub_n,block_p,num_warps', each a power of two."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 1 or v & (v - 1) for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: want sub_n,block_p,num_warps, three powers of two (e.g. 32,32,2)")
    return values


def call(fn, state, inputs, **kw):
    return fn(*[state if q == "state" else inputs[q] for q in KEYS], True, **kw)


def time_verify(fn, batch, k, **kw):
    """Seconds per verify call, cycling over input sets that exceed the L2 cache 4x."""
    torch.manual_seed(0)
    state, sets, nbytes = ks.cache_busting_sets("mamba2", batch, k, "cuda")
    return ks.time_fn(lambda: [call(fn, state, s, **kw) for s in sets], "cuda") / len(sets), nbytes


def difference(fn_a, kw_a, fn_b, kw_b, batch, k):
    """Relative differences (y, state) of two kernels on one fresh input set."""
    torch.manual_seed(1)
    state, (inputs,) = ks.make_sets("mamba2", batch, k + 1, k + 1, 1, "cuda")
    runs = ((fn_a, kw_a, state.clone()), (fn_b, kw_b, state.clone()))
    (ya, sa), (yb, sb) = [(call(fn, st, inputs, **kw).float(), st) for fn, kw, st in runs]
    return float((yb - ya).norm() / ya.norm()), float((sb - sa).norm() / sa.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="a triton_verify.py of another revision")
    ap.add_argument("--baseline-kw", default='{"algo": "loop"}',
                    help="JSON keyword arguments of the baseline's mamba2_verify_triton")
    ap.add_argument("--tiles", nargs="+", type=tile,
                    default=[(32, 32, 2), (32, 32, 4), (16, 32, 4), (32, 16, 2)],
                    help="sub_n,block_p,num_warps of the current loop kernel")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base_fn = load_baseline(args.baseline)
    try:
        base_kw = json.loads(args.baseline_kw)
    except json.JSONDecodeError as e:
        ap.error(f"--baseline-kw: not JSON ({e})")
    if not torch.cuda.is_available():
        ap.error("times Triton kernels: needs a CUDA GPU")
    bw = ks.copy_bandwidth("cuda")
    name = torch.cuda.get_device_name()
    print(f"{name}, copy {bw / 1e9:.0f} GB/s; baseline {args.baseline} {base_kw}")
    rows = []
    for batch in args.batches:
        for k in args.ks:
            t_base, nbytes = time_verify(base_fn, batch, k, **base_kw)
            for sub, bp, nw in args.tiles:
                kw = dict(algo="loop", sub_n=sub, block_p=bp, num_warps=nw)
                t, _ = time_verify(triton_verify.mamba2_verify_triton, batch, k, **kw)
                err_y, err_state = difference(base_fn, base_kw, triton_verify.mamba2_verify_triton,
                                              kw, batch, k)
                rows.append(dict(batch=batch, k=k, sub=sub, block_p=bp, warps=nw,
                                 t_base_us=t_base * 1e6, t_us=t * 1e6, frac_copy=nbytes / t / bw,
                                 frac_copy_base=nbytes / t_base / bw, err_y=err_y,
                                 err_state=err_state))
                print(f"b{batch} k{k} sub {sub} block_p {bp} warps {nw}: "
                      f"baseline {t_base * 1e6:.1f} us ({nbytes / t_base / bw:.0%}) "
                      f"now {t * 1e6:.1f} us ({nbytes / t / bw:.0%}) "
                      f"x{t_base / t:.2f}; diff y {err_y:.1e} state {err_state:.1e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=name, copy_gbps=bw / 1e9, baseline=args.baseline,
                           baseline_kw=base_kw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
