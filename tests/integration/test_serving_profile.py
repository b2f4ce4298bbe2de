"""The serving benchmark's decode profile (``--profile CTX:BATCH``) on the real CPU engine.

It is what says where a decode step's time goes when a speed goal is missed, so it must
split the step the way the table is read: the Mamba mixers, attention and GEMMs each
found, and the split summing to the step's profiled total.
"""
import json
import subprocess
import sys

import pytest

from benchmarks.serving_throughput import profile_category

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("name,category", [
    ("selective_state_update_kernel", "mamba"), ("_chunk_scan_fwd_kernel", "mamba"),
    ("vllm::llama_hybrid_mamba2_mixer", "mamba"), ("_causal_conv1d_update_kernel", "conv"),
    ("kernel_unified_attention_3d", "attention"), ("vllm::unified_attention_with_output", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"), ("nvjet_tst_128x64_64x8", "gemm"),
    ("aten::mm", "gemm"), ("triton_red_fused_add_mul_rsqrt_0", "other")])
def test_kernel_names_fall_in_their_category(name, category):
    assert profile_category(name) == category


def test_profile_splits_a_hybrid_decode_step(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "benchmarks/serving_throughput.py", "--layers", "2",
           "--models", "mamba2-50%", "--contexts", "64", "--batches", "2", "--max-new", "48",
           "--profile", "64:2", "--kv-bytes", "2e8", "--workdir", str(tmp_path / "w"),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prof = json.loads(out.read_text())["results"]["mamba2-50%"]["contexts"]["64"]["decode"]["2"]["profile"]
    split = prof["ms_per_step"]
    assert split["mamba"] > 0 and split["attention"] > 0 and split["gemm"] > 0, split
    assert abs(sum(split.values()) - prof["total_ms_per_step"]) < 1e-6 * prof["total_ms_per_step"]
    assert prof["steps"] > 0 and len(prof["top"]) > 0
    assert "profile mamba2-50% ctx 64 batch 2" in proc.stdout


@pytest.mark.parametrize("cell,message", [
    ("x", "--profile 'x': expected CTX:BATCH"),
    ("99:1", "--profile 99:1: 99 must be one of --contexts"),
    ("1024:3", "3 one of --batches")])
def test_bad_profile_cells_are_refused_naming_the_flag(cell, message, capsys):
    from benchmarks.serving_throughput import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--profile", cell])   # defaults: --contexts 1024 4096 --batches 1 4
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
