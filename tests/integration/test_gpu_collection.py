"""What tests/conftest.py does for the lent GPU machine.

That machine has no vLLM: conftest leaves out the test modules that cannot be
imported without it. The list must be exactly those modules, or `pytest -m gpu tests/`
stops at collection there again (a module missing from it) or skips tests it could run
(a module listed that does not need vLLM). Its GPU jobs' logs are read before a run
ends: `--failures-now` prints each failure's report when it happens."""
import subprocess
import sys

from tests.conftest import NEEDS_VLLM_TO_IMPORT
from tests.utils import REPO

# Imports every test module with vLLM made unimportable; prints those that fail on it.
PROBE = """
import importlib, pathlib, sys
sys.modules["vllm"] = None
failing = []
for path in sorted(pathlib.Path("tests").rglob("test_*.py")):
    try:
        importlib.import_module(".".join(path.with_suffix("").parts))
    except ImportError as e:
        if "vllm" not in str(e):
            raise
        failing.append(path.relative_to("tests").as_posix())
print("FAILING", " ".join(failing))
"""


def test_modules_left_out_without_vllm_are_exactly_those_that_need_it():
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("FAILING")]
    assert res.returncode == 0 and lines, res.stdout[-2000:] + res.stderr[-3000:]
    assert sorted(lines[-1].split()[1:]) == sorted(NEEDS_VLLM_TO_IMPORT)


def test_failures_now_reports_a_failure_before_the_run_ends(tmp_path):
    """`pytest --failures-now` (what the GPU jobs pass): a failure's report is printed when
    it happens, before the next test runs, not only in the summary at the end."""
    (tmp_path / "test_planted.py").write_text(
        "def test_fails():\n    assert [1, 2] == [1, 3], 'planted'\n\n"
        "def test_after():\n    print('SECOND TEST RAN')\n")
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p",
                          "no:cacheprovider", "-v", "-s", "--failures-now",
                          str(tmp_path / "test_planted.py")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 1, out[-3000:] + res.stderr[-3000:]
    report = out.index("test_planted.py::test_fails failed in call")
    assert "AssertionError: planted" in out[report:out.index("SECOND TEST RAN")]
    assert report < out.index("SECOND TEST RAN") < out.index("= FAILURES =")
