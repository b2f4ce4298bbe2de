"""A verify kernel (Mamba2, or Mamba1 with --variant mamba1) against a baseline copy of
another revision, timed side by side on the same inputs; y and state of the two are
compared. A baseline ``triton_verify.py`` times the Triton kernels (GPU); a baseline
``verify_cpu.cpp`` times the C++ kernels, both builds compiled here with the same flags.

Ratios between kernel versions are only meaningful from one process on one machine, so
this times both in one (CUDA-graph medians on a GPU, as in kernels_ssm.py):

  git show 3f49949:vllm_mamba_hybrid/ops/triton_verify.py > /tmp/base_triton_verify.py
  python benchmarks/kernels_ab.py --baseline /tmp/base_triton_verify.py --out ab.json \
      --kw '{}' '{"block_p": 32, "num_warps": 4}'
  python benchmarks/kernels_ab.py --baseline /tmp/base_triton_verify.py --variant mamba1
  git show ff5f2e1:csrc/verify_cpu.cpp > /tmp/base_verify_cpu.cpp
  python benchmarks/kernels_ab.py --baseline /tmp/base_verify_cpu.cpp --variant mamba1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import runpy

import torch

import kernels_ssm as ks
from vllm_mamba_hybrid.ops import triton_verify

KEYS = ["state", "state_idx", "replay_x", "replay_dt", "replay_B", "num_replay", "x", "dt",
        "A", "B", "C", "D", "dt_bias"]
KEYS_MAMBA1 = KEYS[:-1] + ["z", "dt_bias"]


CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
CURRENT_CPP = CSRC / "verify_cpu.cpp"


def load_cpp(path, name: str, variant: str):
    """``{variant}_verify`` of a verify_cpu.cpp, compiled as extension ``name`` with
    setup.py's flags."""
    from torch.utils.cpp_extension import load
    flags = runpy.run_path(str(CSRC / "build_flags.py"))["cpu_flags"]()
    return getattr(load(name=name, sources=[str(path)], extra_cflags=flags), f"{variant}_verify")


def load_baseline(path: str, variant: str = "mamba2"):
    """``{variant}_verify_triton`` of a triton_verify.py file."""
    if not os.path.isfile(path):
        raise SystemExit(f"--baseline {path}: no such file")
    spec = importlib.util.spec_from_file_location("baseline_triton_verify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    name = f"{variant}_verify_triton"
    if not hasattr(module, name):
        raise SystemExit(f"--baseline {path}: defines no {name}")
    return getattr(module, name)


def kernel_kw(text: str) -> dict:
    """A JSON object: keyword arguments of the current Triton kernel."""
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({e})")
    if not isinstance(kw, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: want a JSON object, e.g. "
                                         '\'{"block_p": 32, "num_warps": 4}\'')
    return kw


def call(fn, state, inputs, **kw):
    keys = KEYS_MAMBA1 if "z" in inputs else KEYS
    return fn(*[state if q == "state" else inputs[q] for q in keys], True, **kw)


def time_verify(fn, variant, batch, k, device, **kw):
    """Seconds per verify call, cycling over input sets that exceed the caches."""
    torch.manual_seed(0)
    state, sets, nbytes = ks.cache_busting_sets(variant, batch, k, device)
    return ks.time_fn(lambda: [call(fn, state, s, **kw) for s in sets], device) / len(sets), nbytes


def difference(fn_a, kw_a, fn_b, kw_b, variant, batch, k, device):
    """Relative differences (y, state) of two kernels on one fresh input set."""
    torch.manual_seed(1)
    state, (inputs,) = ks.make_sets(variant, batch, k + 1, k + 1, 1, device)
    runs = ((fn_a, kw_a, state.clone()), (fn_b, kw_b, state.clone()))
    (ya, sa), (yb, sb) = [(call(fn, st, inputs, **kw).float(), st) for fn, kw, st in runs]
    return float((yb - ya).norm() / ya.norm()), float((sb - sa).norm() / sa.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True,
                    help="a triton_verify.py (GPU) or verify_cpu.cpp (CPU) of another revision")
    ap.add_argument("--variant", choices=("mamba2", "mamba1"), default="mamba2",
                    help="which kernel pair (default mamba2)")
    ap.add_argument("--baseline-kw", default=None,
                    help="JSON keyword arguments of the baseline's verify function "
                         "(default: algo=loop for Mamba2)")
    ap.add_argument("--kw", nargs="+", type=kernel_kw, default=None,
                    help="keyword arguments of the current Triton kernel, one JSON object a "
                         "configuration, each timed against the baseline (default: {}, the "
                         "kernel's defaults; Mamba2 adds algo=loop)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 64 (CPU: 1 8)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cpu = args.baseline.endswith(".cpp")
    if args.kw and cpu:
        ap.error("--kw: only the Triton kernels take keyword arguments")
    if cpu:
        if not os.path.isfile(args.baseline):
            ap.error(f"--baseline {args.baseline}: no such file")
        if args.baseline_kw:
            ap.error("--baseline-kw: the C++ kernels take no keyword arguments")
        device, base_kw, configs = "cpu", {}, [{}]
        base_fn = load_cpp(args.baseline, "baseline_verify_cpu", args.variant)
        current = load_cpp(CURRENT_CPP, "current_verify_cpu", args.variant)
        name = f"CPU x{torch.get_num_threads()} threads"
    else:
        base_fn = load_baseline(args.baseline, args.variant)
        try:
            base_kw = json.loads(args.baseline_kw or ('{"algo": "loop"}' if args.variant == "mamba2"
                                                       else "{}"))
        except json.JSONDecodeError as e:
            ap.error(f"--baseline-kw: not JSON ({e})")
        current = getattr(triton_verify, f"{args.variant}_verify_triton")
        configs = [dict(kw, algo="loop") if args.variant == "mamba2" else kw
                   for kw in args.kw or [{}]]
        if not torch.cuda.is_available():
            ap.error("times Triton kernels: needs a CUDA GPU")
        device, name = "cuda", torch.cuda.get_device_name()
    bw = ks.copy_bandwidth(device)
    print(f"{name}, copy {bw / 1e9:.0f} GB/s; baseline {args.baseline} {base_kw}")
    rows = []
    for batch in args.batches or ([1, 8] if cpu else [1, 8, 64]):
        for k in args.ks:
            t_base, nbytes = time_verify(base_fn, args.variant, batch, k, device, **base_kw)
            for kw in configs:
                t, _ = time_verify(current, args.variant, batch, k, device, **kw)
                err_y, err_state = difference(base_fn, base_kw, current, kw, args.variant, batch, k,
                                              device)
                label = " ".join(f"{key} {v}" for key, v in kw.items() if key != "algo") or "default"
                rows.append(dict(batch=batch, k=k, variant=args.variant, kernel_kw=kw,
                                 t_base_us=t_base * 1e6, t_us=t * 1e6, frac_copy=nbytes / t / bw,
                                 frac_copy_base=nbytes / t_base / bw, err_y=err_y,
                                 err_state=err_state))
                print(f"{args.variant} b{batch} k{k} {label}: "
                      f"baseline {t_base * 1e6:.1f} us ({nbytes / t_base / bw:.0%}) "
                      f"now {t * 1e6:.1f} us ({nbytes / t / bw:.0%}) "
                      f"x{t_base / t:.2f}; diff y {err_y:.1e} state {err_state:.1e}", flush=True)
                if args.out:   # after every row: a run cut short keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump(dict(device=name, copy_gbps=bw / 1e9, baseline=args.baseline,
                                       baseline_kw=base_kw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
