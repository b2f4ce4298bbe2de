"""The mamba-ssm Mamba2 training scan (``mamba_chunk_scan_combined``) == the reference.

On a GPU (``-m gpu``): outputs and the gradients of every input against the float64
reference on fresh random inputs (:func:`tests.ops.test_fla_ssd.check_scan`, same shapes and
tolerances). On CPU, without mamba-ssm: how its Triton modules are found and loaded when
the package's CUDA extension is missing (a stand-in package whose ``__init__`` fails as
mamba-ssm's does) and which scan the mixers take (bad shapes: test_fla_ssd.py, both scans).
"""
import sys
import textwrap

import pytest
import torch

from tests.ops.test_fla_ssd import CASES, check_scan
from vllm_mamba_hybrid.ops import mamba_ssm_ssd, scan_impl, ssd_chunk_scan


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(4, 512, 9, 3, 64, 64)])   # SmolLM2's Mamba2 layer
def test_mamba_ssm_ssd_gpu(case, dtype):
    reason = mamba_ssm_ssd.unusable_reason(torch.empty(0, device="cuda"))
    if reason:
        pytest.skip(reason)
    for with_state in (False, True):
        check_scan("cuda", dtype, *case, with_state, scan=mamba_ssm_ssd.ssd_chunk_scan_mamba_ssm)


@pytest.fixture
def fresh_loader(monkeypatch):
    """No mamba_ssm module or cached import outcome leaks into or out of a test."""
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
        monkeypatch.delitem(sys.modules, name)
    mamba_ssm_ssd._combined.cache_clear()
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == "mamba_ssm"]:
        del sys.modules[name]
    mamba_ssm_ssd._combined.cache_clear()


def _stand_in_package(root, seed: int):
    """A ``mamba_ssm`` tree shaped like the real one: its ``__init__`` needs the CUDA
    extension; ``ssd_combined`` imports a sibling kernel module and ``mamba_ssm.utils``."""
    files = {
        "mamba_ssm/__init__.py": "import selective_scan_cuda  # the CUDA extension\n",
        "mamba_ssm/ops/__init__.py": "from mamba_ssm.ops.selective_scan_interface import x\n",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/utils/__init__.py": "",
        "mamba_ssm/utils/torch.py": "def custom_fwd(f):\n    return f\n",
        "mamba_ssm/ops/triton/ssd_chunk_state.py": f"SEED = {seed}\n",
        "mamba_ssm/ops/triton/ssd_combined.py": textwrap.dedent("""
            from mamba_ssm.ops.triton.ssd_chunk_state import SEED
            from mamba_ssm.utils.torch import custom_fwd

            @custom_fwd
            def mamba_chunk_scan_combined(*args, **kwargs):
                return SEED
            """),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_kernels_load_without_the_cuda_extension(tmp_path, monkeypatch, fresh_loader):
    seed = int(torch.randint(1, 1 << 30, ()).item())
    _stand_in_package(tmp_path, seed)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="selective_scan_cuda"):
        __import__("mamba_ssm")                      # the normal import fails, as on the GPU
    assert mamba_ssm_ssd.package_dir() == tmp_path / "mamba_ssm"
    fn = mamba_ssm_ssd.load()
    assert fn.__module__ == mamba_ssm_ssd.ENTRY and fn() == seed
    assert mamba_ssm_ssd.load() is fn                # imported once


def test_missing_mamba_ssm_says_how_to_install(monkeypatch, fresh_loader):
    monkeypatch.setattr(mamba_ssm_ssd, "package_dir", lambda: None)
    with pytest.raises(RuntimeError, match=r"\[accel\].*MAMBA_SKIP_CUDA_BUILD"):
        mamba_ssm_ssd.load()


def test_auto_on_cpu_keeps_the_reference(monkeypatch):
    monkeypatch.delenv(scan_impl.ENV, raising=False)
    assert scan_impl.mamba2_scan(torch.zeros(1, 2, 2, 4)) is ssd_chunk_scan
    assert mamba_ssm_ssd.unusable_reason(torch.zeros(1, 2, 2, 4)).startswith(
        "mamba-ssm's kernels take CUDA tensors")


def test_forcing_mamba_ssm(monkeypatch):
    monkeypatch.setenv(scan_impl.ENV, "mamba-ssm")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="MAMBA_HYBRID_SCAN=mamba-ssm needs CUDA tensors"):
        scan_impl.mamba2_scan(torch.zeros(1, 2, 2, 4))
    with pytest.raises(ValueError, match="'mamba-ssm' does not apply to mamba1"):
        scan_impl.requested("mamba1")
