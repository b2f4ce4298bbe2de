"""Registers, spills and per-loop instruction counts of the SSM verify kernels (Mamba2
loop and block form, Mamba1), compiled for an H100 (sm_90) on a machine without a GPU.

Why: a kernel's time at batch 1-64 follows its instruction count per token and its
registers (programs resident per SM), and both can be read before any GPU time is
spent. Triton versions lay the same tile out differently (<= 3.6 and >= 3.7 put the
lanes of the sliced Mamba2 tile on different axes), so compile with the GPU's Triton:

  pip install --target /tmp/t36 --no-deps triton==3.6.0
  PYTHONPATH=/tmp/t36:. python benchmarks/kernel_sass.py --block-p 16 32 --warps 2 4 \
      --sub-n 32 128
  PYTHONPATH=/tmp/t36:. python benchmarks/kernel_sass.py --kernel mamba1 --block-p 64

The launch is specialised as at run time on contiguous inputs: each tensor's last
stride is the constant 1, other strides and pointers are divisible by 16. Loops are
the replay and the new-token loops (backward branches in the SASS), counted per
iteration.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_mamba_hybrid.ops import triton_verify

FP32_PTRS = {"state_ptr", "A_ptr", "D_ptr", "dtb_ptr"}
INT_PTRS = {"idx_ptr", "nrep_ptr"}


def compile_sm90(kernel, constexprs: dict, num_warps: int):
    """Compile a verify kernel for sm_90 as a launch on contiguous bf16 inputs would."""
    sig, consts, attrs = {}, dict(constexprs), {}
    strides = [n for n in kernel.arg_names if n.startswith("s_")]
    last_of = {n.split("_")[1]: n for n in strides}        # s_<tensor>_<dim>, innermost last
    unit_strides = set(last_of.values())
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in unit_strides:
            sig[name], consts[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_PTRS else "*i32" if name in INT_PTRS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("s_") or name in ("P", "N", "DIM"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(cubin: bytes) -> tuple[dict, list[collections.Counter]]:
    """(REG/STACK/SHARED of the kernel, opcode counts of each loop body)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", usage)}
    labels = {m.group(1): i for i, line in enumerate(sass)
              if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = []
    for i, line in enumerate(sass):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)
        start = labels.get(m.group(1), i) if m else i
        if start < i - 1:                               # a backward branch: a loop body
            loops.append(collections.Counter(
                mm.group(1) for b in sass[start:i + 1]
                if (mm := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", b))))
    return res, loops


def mamba2_kernel(algo: str, block_p: int, num_warps: int, sub_n: int | None = 32,
                  slices_first: bool | None = None, d_state: int = 128):
    """Resources and loop bodies of the Mamba2 verify kernel ("loop" or "dot") as
    `mamba2_verify_triton` would launch it (slice order: this Triton's, unless given)."""
    block_n = triton.next_power_of_2(d_state)
    consts = dict(HAS_D=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, BLOCK_N=block_n, BLOCK_P=block_p)
    if algo == "dot":
        kernel = triton_verify._mamba2_verify_dot_kernel
        consts.update(R_PAD=16, T_PAD=16, DOT_PRECISION="tf32x3")
    else:
        kernel = triton_verify._mamba2_verify_kernel
        consts.update(SUB_N=min(sub_n, block_n), SLICES_FIRST=triton_verify._SLICES_FIRST
                      if slices_first is None else slices_first)
    return resources(compile_sm90(kernel, consts, num_warps).asm["cubin"])


def mamba1_kernel(block_d: int, num_warps: int, d_state: int = 16, sub_n: int | None = None):
    """Resources and loop bodies of the Mamba1 verify kernel as `mamba1_verify_triton`
    would launch it (with z, D and the dt bias)."""
    block_n = triton.next_power_of_2(d_state)
    consts = dict(HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, DT_SOFTPLUS=True, BLOCK_D=block_d,
                  BLOCK_N=block_n, SUB_N=min(block_n, sub_n or 16),
                  SLICES_FIRST=triton_verify._SLICES_FIRST, FAST_SFU=True)
    return resources(compile_sm90(triton_verify._mamba1_verify_kernel, consts, num_warps)
                     .asm["cubin"])


def power_of_two(text: str) -> int:
    v = int(text)
    if v < 1 or v & (v - 1):
        raise argparse.ArgumentTypeError(f"{text}: tile sizes and warps are powers of two")
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=("loop", "dot", "mamba1"), default="loop",
                    help="Mamba2 loop / block form, or Mamba1 (--block-p is then BLOCK_D)")
    ap.add_argument("--block-p", type=power_of_two, nargs="+", default=[32])
    ap.add_argument("--warps", type=power_of_two, nargs="+", default=[2])
    ap.add_argument("--sub-n", type=power_of_two, nargs="+", default=None,
                    help="n-slice width (d_state or more: one slice); default: the launcher's "
                         "(loop kernel 32)")
    ap.add_argument("--slices-first", type=int, choices=(0, 1), default=None,
                    help="loop kernel: tile axis order (default: the one picked for this Triton)")
    ap.add_argument("--d-state", type=int, default=None, help="default 128, Mamba1 16")
    args = ap.parse_args()
    first = triton_verify._SLICES_FIRST if args.slices_first is None else bool(args.slices_first)
    d_state = args.d_state or (16 if args.kernel == "mamba1" else 128)
    print(f"triton {triton.__version__}, sm_90, {args.kernel}, d_state {d_state}"
          + (f", slices first: {first}" if args.kernel == "loop" else ""))
    print(f"{'block':>7} {'warps':>5} {'sub_n':>5} {'regs':>4} {'stack':>5}  "
          "instructions per iteration: replay / new-token loop (top opcodes)")
    subs = args.sub_n or [32 if args.kernel == "loop" else None]
    for bp, nw, sub in itertools.product(args.block_p, args.warps, subs):
        if args.kernel == "mamba1":
            res, loops = mamba1_kernel(bp, nw, d_state, sub)
        else:
            res, loops = mamba2_kernel(args.kernel, bp, nw, sub, first, d_state)
        counts = " / ".join(str(sum(c.values())) for c in loops) or "-"
        top = "; ".join(" ".join(f"{op} {n}" for op, n in c.most_common(4)) for c in loops)
        print(f"{bp:7d} {nw:5d} {str(sub):>5} {res.get('REG', 0):4d} {res.get('STACK', 0):5d}  "
              f"{counts}  ({top})")


if __name__ == "__main__":
    main()
