"""benchmarks/distill_throughput.py: the scans it accepts follow scan_impl, its speedup and
scaling arithmetic, and a run that fails part-way keeps the rows it finished."""
import json
import os

import pytest

from benchmarks.distill_throughput import SCANS, _compare, main
from distillation.launch import TrainingFailed
from vllm_mamba_hybrid.ops.scan_impl import ENV, KERNELS


def test_every_kernel_scan_impl_knows_is_accepted():
    for variant, kernels in KERNELS.items():
        assert set(kernels) <= set(SCANS[variant]), variant
    with pytest.raises(SystemExit):   # argparse: a Mamba1 run has no mamba-ssm scan
        main(["--variant", "mamba1", "--scan", "mamba-ssm"])


def test_compare_by_hand():
    rows = [{"scan": "reference", "workers": 1, "tokens_per_s": 100.0},
            {"scan": "reference", "workers": 2, "tokens_per_s": 180.0},
            {"scan": "mamba-ssm", "workers": 1, "tokens_per_s": 150.0}]
    _compare(rows, "reference")
    assert [r["scaling_efficiency"] for r in rows] == [1.0, 0.9, 1.0]
    assert [r["speedup_vs_first_scan"] for r in rows] == [1.0, 1.0, 1.5]
    _compare(rows[2:], "reference")   # no base row measured yet
    assert rows[2]["speedup_vs_first_scan"] is None


def test_failed_row_keeps_finished_rows_and_scan_setting(tmp_path, monkeypatch):
    """On the CPU the forced mamba-ssm scan stops its row (it needs CUDA); the reference
    row before it is already in the JSON, and MAMBA_HYBRID_SCAN is the caller's again."""
    monkeypatch.setenv(ENV, "auto")
    out = tmp_path / "bench.json"
    with pytest.raises(TrainingFailed, match=f"{ENV}=mamba-ssm needs CUDA tensors"):
        main(["--shape", "tiny", "--device", "cpu", "--workers", "1", "--steps", "1",
              "--threads", "1", "--scan", "reference", "mamba-ssm", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["scan"] for r in rows] == ["reference"]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["speedup_vs_first_scan"] == 1.0
    assert os.environ[ENV] == "auto"
