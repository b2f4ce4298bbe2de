"""benchmarks/distill_throughput.py: the scans it accepts follow scan_impl, its speedup and
scaling arithmetic, and a row that fails is recorded while the others still run."""
import json
import os

import pytest

from benchmarks.distill_throughput import SCANS, _compare, main
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


def test_failed_row_is_recorded_and_the_other_scans_still_run(tmp_path, monkeypatch):
    """On the CPU the forced mamba-ssm scan fails its row (it needs CUDA), as an out-of-memory
    row does on a GPU: the JSON names the error, the reference row after it still runs (no
    base for a speedup), the exit code says a row failed, and MAMBA_HYBRID_SCAN is the
    caller's again."""
    monkeypatch.setenv(ENV, "auto")
    out = tmp_path / "bench.json"
    assert main(["--shape", "tiny", "--device", "cpu", "--workers", "1", "--steps", "1",
                 "--threads", "1", "--scan", "mamba-ssm", "reference", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    assert [r["scan"] for r in rows] == ["mamba-ssm", "reference"]
    assert f"{ENV}=mamba-ssm needs CUDA tensors" in rows[0]["error"]
    assert rows[1]["tokens_per_s"] > 0 and rows[1]["speedup_vs_first_scan"] is None
    assert os.environ[ENV] == "auto"
