"""benchmarks/ncu_stalls.py: stall samples of an Nsight Compute SASS dump summed by
reason, region and instruction; checked on a small dump in ncu's CSV layout whose sums
are computed by hand, and on a file that is not such a dump."""
import csv
import gzip
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "ncu_stalls", Path(__file__).parents[2] / "benchmarks" / "ncu_stalls.py")
ncu_stalls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_stalls)

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
          "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
# a prologue (executed 4 times), a loop body (20 = 4 programs x 5 iterations), an epilogue
ROWS = [("0x0", "LDG.E R2, [R4]", "10", "4", "0", "10", "0"),
        ("0x10", "IMAD R3, R2, R2", "6", "4", "6", "0", "6"),
        ("0x20", "FFMA R5, R3, R3, R5", "1,000", "20", "900", "100", "900"),
        ("0x30", "FMUL R6, R5, R5", "24", "20", "0", "24", "0"),
        ("0x40", "STG.E [R8], R6", "0", "4", "0", "0", "0")]


def write_dump(path: Path, gz: bool) -> None:
    with (gzip.open if gz else open)(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "_mamba2_verify_kernel", ""])
        w.writerow(HEADER)
        w.writerows(ROWS)


@pytest.mark.parametrize("gz", [False, True])
def test_sums_by_region_reason_and_instruction(tmp_path, gz, capsys, monkeypatch):
    path = tmp_path / ("sass.csv.gz" if gz else "sass.csv")
    write_dump(path, gz)
    rows = ncu_stalls.read_rows(str(path))
    assert [r["Source"] for r in rows] == [r[1] for r in ROWS]
    assert ncu_stalls.value(rows[2], ncu_stalls.SAMPLES) == 1000      # "1,000" as ncu writes it
    assert ncu_stalls.regions(rows) == [(0, 1, 4.0), (2, 3, 20.0), (4, 4, 4.0)]
    monkeypatch.setattr("sys.argv", ["ncu_stalls.py", str(path), "--top", "1"])
    ncu_stalls.main()
    out = capsys.readouterr().out
    assert "5 instructions, 1040 stall samples" in out
    assert "long_sb           87.1%" in out                # (6 + 900) / 1040; "Not Issued" left out
    assert "wait              12.9%" in out                # (10 + 100 + 24) / 1040
    assert "Not Issued" not in out                         # a subset of the samples above
    assert "    2-3     (   2)         20   98.5%" in out  # the loop body: 1024 / 1040
    assert "96.2%      2        20  FFMA R5, R3, R3, R5" in out


def test_refuses_a_file_without_stall_samples(tmp_path):
    path = tmp_path / "details.txt"
    path.write_text("==PROF== Connected to process 1\nSection: GPU Speed Of Light\n")
    with pytest.raises(SystemExit, match="details.txt: no 'Warp Stall Sampling"):
        ncu_stalls.read_rows(str(path))
    path.write_text(",".join(HEADER) + "\n")
    with pytest.raises(SystemExit, match="details.txt: .* no instruction rows"):
        ncu_stalls.read_rows(str(path))
