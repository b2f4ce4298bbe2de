"""The fla Mamba2 training scan (fused ``chunk_simple_gla``) == the reference SSD scan.

Fresh random inputs every run; outputs (y and the final state) and the gradients of
every input (x, dt, A, B, C, D, the dt bias and the initial state) under random upstream
weights on both outputs, against :func:`ssd_chunk_scan` in float64 on the same (rounded)
inputs. Shapes: odd lengths, one token, exactly one and several of fla's 64-token
chunks, B groups below and equal to the heads, headdim != d_state. On a GPU under
``-m gpu``; on CPU the kernels run under ``TRITON_INTERPRET=1`` in a subprocess with
two test-only patches of fla 0.6.0 / Triton (:func:`interpreter_patches`), float32 only:
the interpreter (Triton 3.9) multiplies bf16 ``tl.dot`` operands as their raw 16-bit
patterns (a 16x16 bf16 ``tl.dot`` came out ~2e10 off), so bf16 is checked on the GPU.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.ops.test_ops import rel_err
from tests.utils import run_under_triton_interpreter
from vllm_mamba_hybrid.ops import fla_ssd, mamba_ssm_ssd, scan_impl, ssd_chunk_scan

NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")
# (outputs, gradients) relative tolerance by input dtype. float32: IEEE fp32 products with
# fp32 accumulation (tests/conftest.py sets TRITON_F32_DEFAULT=ieee; TF32 would be ~1e-3).
# bf16: fla multiplies bf16 operands (dt * x, the chunk's scores and, in the forward, the
# chunk states are rounded to bf16), the reference float32: a few bf16 ulps. Gradients of
# A, D and the dt bias are sums over every token, channel and state whose terms cancel:
# float32 summation in another order leaves up to ~1e-4 of their (small) norm (seen 1.2e-4
# for dA at l=70), so the float32 bar for gradients is 3e-4, still 3x below TF32's ~1e-3.
TOL = {torch.float32: (2e-5, 3e-4), torch.bfloat16: (2e-2, 3e-2)}


def _inputs(b, l, h, g, p, n):
    return dict(x=torch.randn(b, l, h, p), dt=torch.randn(b, l, h) * 0.7 - 1,
                A=-torch.rand(h) * 4 - 0.05, B=torch.randn(b, l, g, n), C=torch.randn(b, l, h, n),
                D=torch.randn(h), dt_bias=torch.randn(h) * 0.5,
                initial_state=torch.randn(b, h, p, n))


def _grad_err(got, ref):
    """Relative error, measured against at least 1: where the exact gradient vanishes (dA
    of a single token without initial state: A only decays the state before it) fla's
    ``dg = q.dq - k.dk`` leaves float32 rounding noise (~1e-7), not zero."""
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1.0)).item()


def check_scan(device, dtype, b, l, h, g, p, n, with_state, scan=None):
    """``scan`` (default: fla's) against the float64 reference; test_mamba_ssm_ssd.py too."""
    scan = scan or fla_ssd.ssd_chunk_scan_fla
    base = _inputs(b, l, h, g, p, n)
    if not with_state:
        base.pop("initial_state")
    low = {k: v.to(dtype) if k in ("x", "dt", "B", "C") else v for k, v in base.items()}
    ref = {k: v.double().requires_grad_() for k, v in low.items()}
    got = {k: v.to(device).requires_grad_() for k, v in low.items()}
    y_ref, s_ref = ssd_chunk_scan(**ref)
    y, s = scan(**got)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    tol_out, tol_grad = TOL[dtype]
    shape = f"(b={b} l={l} h={h} g={g} p={p} n={n} {dtype} state={with_state})"
    for name, a, r in (("y", y, y_ref), ("final_state", s, s_ref)):
        err = rel_err(a.cpu(), r)
        assert err < tol_out, f"{name}: relative error {err:.2e} {shape}"
    wy = torch.randn(y_ref.shape, dtype=torch.float64)
    ws = torch.randn(s_ref.shape, dtype=torch.float64)
    ((y_ref * wy).sum() + (s_ref * ws).sum()).backward()
    ((y.double() * wy.to(device)).sum() + (s.double() * ws.to(device)).sum()).backward()
    for k in ref:
        g_got, g_ref = got[k].grad, ref[k].grad
        assert g_got is not None and g_got.dtype == got[k].dtype, k
        assert torch.isfinite(g_got).all(), k
        err = _grad_err(g_got.cpu(), g_ref)
        assert err < tol_grad, f"d{k}: relative error {err:.2e} {shape}"


CASES = [  # (b, l, h, g, p, n): odd lengths, 1 token, one and several 64-token chunks (and a
    # short last one), groups < heads and == heads, headdim != d_state
    (2, 37, 4, 2, 16, 16), (3, 1, 2, 1, 16, 16), (1, 64, 2, 1, 32, 32), (2, 65, 3, 3, 16, 16),
    (1, 130, 6, 2, 64, 64), (2, 200, 4, 4, 32, 16)]
INTERPRETED = [(2, 37, 4, 2, 16, 16), (1, 70, 2, 1, 16, 32), (2, 1, 2, 2, 16, 16)]


def interpreter_patches():
    """Let fla 0.6.0's kernels run under the Triton interpreter (test-only, CPU):

    1. Triton's autotuner times every config on the active driver, and the interpreter
       has none ("0 active drivers"): every config is scored equal, so the first runs.
    2. fla's kernels loop ``for i_t in range(NT)`` and call ``i_t.to(tl.int64)``; compiled,
       the loop variable is a tensor, interpreted it is a Python int ("'int' object has no
       attribute 'to'"): fla's modules get a ``range`` whose ints also have ``.to``.
    """
    import builtins
    import sys

    import triton.runtime.autotuner as autotuner
    from triton.runtime.interpreter import _implicit_cvt

    autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]

    class LoopInt(int):
        def to(self, dtype, **kwargs):
            return _implicit_cvt(int(self)).to(dtype, **kwargs)

    def loop_range(*args):
        return map(LoopInt, builtins.range(*args))

    fla_ssd.load()
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.ops") and module is not None:
            module.range = loop_range


def interpreter_checks():
    import time
    interpreter_patches()
    t0 = time.time()
    for case in INTERPRETED:
        for with_state in (False, True):
            check_scan("cpu", torch.float32, *case, with_state)
    print(f"fla ssd checks passed in {time.time() - t0:.0f} s")


def _fla_path() -> str:
    """The folder fla imports from, for the interpreter's subprocess (its PYTHONPATH is the repo)."""
    spec = importlib.util.find_spec("fla")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def test_fla_ssd_interpreted():
    pytest.importorskip("triton")
    if not fla_ssd.fla_installed():
        pytest.skip("fla-core is not installed (extra [train-gpu])")
    run_under_triton_interpreter(
        f"import sys; sys.path.insert(1, {_fla_path()!r}); "
        "from tests.ops.test_fla_ssd import interpreter_checks as f; f()",
        "fla ssd checks passed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(4, 512, 9, 3, 64, 64)])   # SmolLM2's Mamba2 layer
def test_fla_ssd_gpu(case, dtype):
    reason = fla_ssd.unusable_reason(torch.empty(0, device="cuda", requires_grad=True))
    if reason:
        pytest.skip(reason)
    for with_state in (False, True):
        check_scan("cuda", dtype, *case, with_state)


# ---- which scan the mixers take (CPU, no fla needed) ----

def test_cpu_takes_the_reference_by_default(monkeypatch):
    monkeypatch.delenv(scan_impl.ENV, raising=False)
    x = torch.zeros(1, 2, 2, 4)
    assert scan_impl.mamba2_scan(x) is ssd_chunk_scan
    assert scan_impl.mamba1_scan(x).__name__ == "selective_scan_fn"


def test_forced_kernel_off_cuda_is_an_error(monkeypatch):
    monkeypatch.setenv(scan_impl.ENV, "fla")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        scan_impl.mamba2_scan(torch.zeros(1, 2, 2, 4))


@pytest.mark.parametrize("variant,value", [("mamba1", "fla"), ("mamba2", "triton"),
                                           ("mamba2", "fast")])
def test_unknown_or_foreign_setting_is_named(monkeypatch, variant, value):
    monkeypatch.setenv(scan_impl.ENV, value)
    with pytest.raises(ValueError, match=f"{scan_impl.ENV}='{value}' does not apply to {variant}"):
        scan_impl.requested(variant)


def test_missing_fla_says_how_to_install(monkeypatch):
    monkeypatch.setattr(fla_ssd, "_chunk_simple_gla", lambda: ImportError("No module named 'fla'"))
    assert not fla_ssd.supports(torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"\[train-gpu\]"):
        fla_ssd.load()


@pytest.mark.parametrize("scan", [fla_ssd.ssd_chunk_scan_fla,
                                  mamba_ssm_ssd.ssd_chunk_scan_mamba_ssm])
@pytest.mark.parametrize("name,bad", [("C", lambda t: t[..., :4]), ("A", lambda t: t[:1]),
                                      ("dt", lambda t: t[:, :-1]), ("D", lambda t: t[:1]),
                                      ("initial_state", lambda t: t[..., :2])])
def test_fused_scans_reject_bad_shapes_by_name(scan, name, bad):
    """The fused kernels index memory by the inputs' shapes, so a wrong one must stop
    before them, named (checked before the kernels are imported: no fla or mamba-ssm here)."""
    t = _inputs(1, 5, 4, 2, 16, 8)
    t[name] = bad(t[name])
    with pytest.raises(ValueError, match=f"{scan.__name__}: {name} is "):
        scan(**t)


def test_a_gpu_where_fla_cannot_take_gradients_stops_forced_training(monkeypatch):
    """fla 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (the lent H100);
    forced, the scan says so before a step runs; forward-only use (no_grad) still may."""
    pytest.importorskip("fla")
    assert fla_ssd.backward_blocker() is None   # this CPU machine is no Hopper GPU
    monkeypatch.setenv(scan_impl.ENV, "fla")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the forced path past its device check
    monkeypatch.setattr(fla_ssd, "backward_blocker", lambda: "fla refuses here (Triton 3.6)")
    x = torch.zeros(1, 2, 2, 4)
    with pytest.raises(RuntimeError, match=r"MAMBA_HYBRID_SCAN=fla: fla refuses here \(Triton 3.6\)"):
        scan_impl.mamba2_scan(x)
    with torch.no_grad():
        assert scan_impl.mamba2_scan(x) is fla_ssd.ssd_chunk_scan_fla
