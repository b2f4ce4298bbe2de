"""The Triton Mamba1 training scan == the reference scan, forward and backward.

Fresh random inputs every run; gradients of every input (u, delta, A, B, C, D, z, the
delta bias and the initial state) under random upstream weights on both outputs (y and
the final state), against the reference in float64. Layouts: contiguous (b, d, l) and
the mixer's transposed (b, l, d) views. Group widths below, equal to and above the
kernel's channel block (so several programs add into one group's dB/dC). On CPU the
kernels run under ``TRITON_INTERPRET=1`` in a subprocess; on a GPU under ``-m gpu``.
"""
import pytest
import torch

from tests.ops.test_ops import rel_err
from tests.utils import run_under_triton_interpreter
from vllm_mamba_hybrid.ops import selective_scan_fn

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# (outputs, gradients) relative tolerance by input dtype: fp32 math in both; bf16 rounds
# the outputs and input gradients to 8 bits.
TOL = {torch.float32: (1e-5, 2e-5), torch.bfloat16: (1e-2, 1.5e-2)}


def _inputs(b, g, r, n, l, layout):
    d = g * r
    t = dict(u=torch.randn(b, d, l), delta=torch.randn(b, d, l) * 0.7 - 1,
             A=-torch.rand(d, n) * 4 - 0.05, B=torch.randn(b, g, n, l), C=torch.randn(b, g, n, l),
             D=torch.randn(d), z=torch.randn(b, d, l), delta_bias=torch.randn(d) * 0.5,
             initial_state=torch.randn(b, d, n))
    if layout == "mixer":  # (b, l, d) storage seen as (b, d, l), B/C as (b, l, g, n) storage
        for k in ("u", "delta", "z"):
            t[k] = t[k].transpose(1, 2).contiguous().transpose(1, 2)
        for k in ("B", "C"):
            t[k] = t[k].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    return t


def check_scan(device, dtype, b, g, r, n, l, with_state, layout="contiguous"):
    from vllm_mamba_hybrid.ops.triton_scan import selective_scan_triton
    base = _inputs(b, g, r, n, l, layout)
    if not with_state:
        base.pop("initial_state")
    low = {k: v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v for k, v in base.items()}
    ref = {k: v.double().requires_grad_() for k, v in low.items()}
    got = {k: v.to(device).requires_grad_() for k, v in low.items()}
    # .to() keeps the strides of a dense non-contiguous tensor: the mixer layout travels
    y_ref, h_ref = selective_scan_fn(**ref, delta_softplus=True)
    y, h = selective_scan_triton(**got, delta_softplus=True)
    assert y.dtype == dtype and h.dtype == torch.float32
    tol_out, tol_grad = TOL[dtype]
    assert rel_err(y.cpu(), y_ref) < tol_out, rel_err(y.cpu(), y_ref)
    assert rel_err(h.cpu(), h_ref) < 1e-5, rel_err(h.cpu(), h_ref)
    wy, wh = torch.randn(y_ref.shape, dtype=torch.float64), torch.randn(h_ref.shape, dtype=torch.float64)
    ((y_ref * wy).sum() + (h_ref * wh).sum()).backward()
    ((y.double() * wy.to(device)).sum() + (h.double() * wh.to(device)).sum()).backward()
    for k in ref:
        g_got, g_ref = got[k].grad, ref[k].grad
        assert g_got is not None and g_got.dtype == got[k].dtype, k
        assert torch.isfinite(g_got).all(), k
        err = rel_err(g_got.cpu(), g_ref)
        assert err < tol_grad, f"d{k}: relative error {err:.2e} (b={b} g={g} r={r} n={n} l={l})"


CASES = [  # (b, g, r, n, l): r below / at / above the kernel's channel block (LAUNCH), odd n
    # and l, n = 64, l below, at and across the backward's 16-token chunks (a short last one)
    (2, 3, 5, 4, 11), (1, 2, 32, 16, 9), (2, 2, 40, 3, 17), (3, 1, 7, 16, 1), (1, 2, 64, 64, 7),
    (2, 1, 16, 4, 32), (2, 2, 3, 8, 45)]


def interpreter_checks():
    for case in CASES:
        for with_state in (False, True):
            check_scan("cpu", torch.float32, *case, with_state)
    check_scan("cpu", torch.float32, 2, 3, 6, 8, 13, True, layout="mixer")
    check_scan("cpu", torch.bfloat16, 2, 3, 6, 8, 13, False, layout="mixer")
    print("triton scan checks passed")


def test_triton_scan_interpreted():
    run_under_triton_interpreter("from tests.ops.test_triton_scan import interpreter_checks as f; f()",
                                 "triton scan checks passed")


@pytest.mark.parametrize("name,bad", [("C", lambda t: t[..., :4]), ("A", lambda t: t[:, :3]),
                                      ("z", lambda t: t[:, :-1]), ("D", lambda t: t[:-1]),
                                      ("initial_state", lambda t: t[:, :, :2])])
def test_rejects_bad_shapes_by_name(name, bad):
    """The kernels index by the shapes, so a wrong one must stop before launch, named."""
    pytest.importorskip("triton")
    from vllm_mamba_hybrid.ops.triton_scan import selective_scan_triton
    t = _inputs(1, 2, 4, 4, 5, "contiguous")
    t[name] = bad(t[name])
    with pytest.raises(ValueError, match=f"selective_scan_triton: {name} is "):
        selective_scan_triton(**t)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES + [(2, 36, 16, 16, 512),    # SmolLM2's 50% Mamba1 layer,
                                  (2, 9, 64, 64, 512)])    # at d_state 16 and 64
def test_triton_scan_gpu(case, dtype):
    for with_state in (False, True):
        check_scan("cuda", dtype, *case, with_state)
    check_scan("cuda", dtype, *case, True, layout="mixer")
