"""Reference ops == naive float64 recurrences, on fresh random inputs every run."""
import pytest
import torch

from tests import naive
from vllm_mamba_hybrid.ops import (causal_conv1d_fn, causal_conv1d_update, gated_rms_norm,
                                   selective_scan_fn, selective_state_update,
                                   ssd_chunk_scan, ssd_state_update)

LENGTHS = [1, 3, 16, 37, 130]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _maybe_state(shape, with_state):
    return torch.randn(*shape) if with_state else torch.zeros(*shape)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
def test_causal_conv1d_matches_naive(length, with_state):
    b, dim, w = 2, 12, 4
    x, weight, bias = torch.randn(b, dim, length), torch.randn(dim, w), torch.randn(dim)
    state = _maybe_state((b, dim, w - 1), with_state)
    out, final = causal_conv1d_fn(x, weight, bias, state if with_state else None)
    ref_out, ref_final = naive.conv1d(x, weight, bias, state)
    assert rel_err(out, ref_out) < 1e-6 and rel_err(final, ref_final) < 1e-6
    # stepping token by token with the update op gives the same outputs and state
    s = state.clone()
    steps = []
    for t in range(length):
        o, s = causal_conv1d_update(x[..., t], s, weight, bias)
        steps.append(o)
    assert rel_err(torch.stack(steps, -1), ref_out) < 1e-6 and rel_err(s, ref_final) < 1e-6


def _mamba1_inputs(b, d, n, g, length):
    return dict(u=torch.randn(b, d, length), delta=torch.randn(b, d, length),
                A=-torch.rand(d, n) * 4 - 0.1, B=torch.randn(b, g, n, length),
                C=torch.randn(b, g, n, length), D=torch.randn(d), z=torch.randn(b, d, length),
                delta_bias=torch.randn(d) * 0.5)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan_matches_naive(length, with_state):
    b, d, n, g = 2, 24, 8, 3
    inp = _mamba1_inputs(b, d, n, g, length)
    state = _maybe_state((b, d, n), with_state)
    y, final = selective_scan_fn(**inp, delta_softplus=True,
                                 initial_state=state if with_state else None, chunk_size=16)
    ref_y, ref_final = naive.mamba1_scan(*inp.values(), state)
    assert rel_err(y, ref_y) < 1e-5 and rel_err(final, ref_final) < 1e-5

    s = state.clone()
    steps = []
    for t in range(length):
        o, s = selective_state_update(s, inp["u"][..., t], inp["delta"][..., t], inp["A"],
                                      inp["B"][..., t], inp["C"][..., t], inp["D"],
                                      inp["z"][..., t], inp["delta_bias"], dt_softplus=True)
        steps.append(o)
    assert rel_err(torch.stack(steps, -1), ref_y) < 1e-5 and rel_err(s, ref_final) < 1e-5


def _ssd_inputs(b, length, h, p, g, n):
    return dict(x=torch.randn(b, length, h, p), dt=torch.randn(b, length, h),
                A=-torch.rand(h) * 4 - 0.1, B=torch.randn(b, length, g, n),
                C=torch.randn(b, length, g, n), D=torch.randn(h), dt_bias=torch.randn(h) * 0.5)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_chunk_scan_matches_naive(length, with_state):
    b, h, p, g, n = 2, 6, 8, 3, 8
    inp = _ssd_inputs(b, length, h, p, g, n)
    state = _maybe_state((b, h, p, n), with_state)
    y, final = ssd_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=16,
                              D=inp["D"], dt_bias=inp["dt_bias"],
                              initial_state=state if with_state else None)
    ref_y, ref_final = naive.ssd_scan(*inp.values(), state)
    assert rel_err(y, ref_y) < 1e-5 and rel_err(final, ref_final) < 1e-5

    s = state.clone()
    steps = []
    for t in range(length):
        o, s = ssd_state_update(s, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t],
                                inp["C"][:, t], inp["D"], inp["dt_bias"])
        steps.append(o)
    assert rel_err(torch.stack(steps, 1), ref_y) < 1e-5 and rel_err(s, ref_final) < 1e-5


def test_ssd_chunked_continuation_equals_one_pass():
    """Splitting a sequence at arbitrary points and carrying the state changes nothing."""
    inp = _ssd_inputs(1, 50, 4, 8, 2, 8)
    full, full_state = ssd_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 8,
                                      inp["D"], inp["dt_bias"])
    state, parts = None, []
    for a, b in [(0, 5), (5, 21), (21, 50)]:
        y, state = ssd_chunk_scan(inp["x"][:, a:b], inp["dt"][:, a:b], inp["A"], inp["B"][:, a:b],
                                  inp["C"][:, a:b], 8, inp["D"], inp["dt_bias"], initial_state=state)
        parts.append(y)
    assert rel_err(torch.cat(parts, 1), full) < 1e-5 and rel_err(state, full_state) < 1e-5


def test_bf16_inputs_keep_float32_state():
    inp = _ssd_inputs(1, 40, 4, 8, 4, 8)
    y, state = ssd_chunk_scan(*(inp[k].bfloat16() if k in "xdtBC" else inp[k]
                                for k in ("x", "dt", "A", "B", "C")), 16, inp["D"], inp["dt_bias"])
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    ref_y, _ = naive.ssd_scan(*(inp[k].bfloat16().float() if k in ("x", "dt", "B", "C") else inp[k]
                                for k in inp), torch.zeros(1, 4, 8, 8))
    assert rel_err(y, ref_y) < 2e-2


def test_gated_rms_norm_per_group():
    x, z, w = torch.randn(3, 5, 24), torch.randn(3, 5, 24), torch.randn(24)
    out = gated_rms_norm(x, z, w, eps=1e-5, group_size=8)
    assert rel_err(out, naive.gated_rms_norm(x, z, w, 1e-5, 8)) < 1e-6
    # per-group is not the same as whole-width normalisation
    assert rel_err(out, naive.gated_rms_norm(x, z, w, 1e-5, 24)) > 1e-3


def test_ssd_chunk_scan_gradients_match_naive():
    b, l, h, p, g, n = 1, 7, 2, 3, 1, 2
    inp = {k: v.double().requires_grad_() for k, v in _ssd_inputs(b, l, h, p, g, n).items()}

    def f(x, dt, A, B, C, D, dt_bias):
        return ssd_chunk_scan(x, dt, A, B, C, 3, D, dt_bias)[0]

    # the op computes in float32, so compare its gradients with the naive float64 ones
    args = tuple(inp.values())
    out = f(*args)
    ref = naive.ssd_scan(*args, torch.zeros(b, h, p, n))[0]
    gout = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * gout).sum(), args)
    ref_grads = torch.autograd.grad((ref * gout).sum(), args)
    for name, a, r in zip(inp, grads, ref_grads):
        assert rel_err(a, r) < 1e-4, name


def test_ssd_chunk_scan_gradcheck():
    """Finite-difference gradcheck of the chunked scan in float64 (several chunks, padding)."""
    inp = {k: v.double().requires_grad_() for k, v in _ssd_inputs(1, 5, 2, 2, 1, 2).items()}

    def f(x, dt, A, B, C, D, dt_bias):
        return ssd_chunk_scan(x, dt, A, B, C, 2, D, dt_bias)

    assert torch.autograd.gradcheck(f, tuple(inp.values()))


def test_selective_scan_gradcheck():
    inp = {k: v.double().requires_grad_() for k, v in _mamba1_inputs(1, 4, 2, 2, 5).items()}

    def f(*args):
        return selective_scan_fn(*args[:7], delta_bias=args[7], delta_softplus=True, chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(inp.values()))


def test_selective_scan_gradients_match_naive():
    b, d, n, g, l = 1, 6, 3, 2, 9
    inp = {k: v.double().requires_grad_() for k, v in _mamba1_inputs(b, d, n, g, l).items()}
    args = tuple(inp.values())
    out = selective_scan_fn(*args[:7], delta_bias=args[7], delta_softplus=True, chunk_size=4)[0]
    ref = naive.mamba1_scan(*args, torch.zeros(b, d, n))[0]
    gout = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * gout).sum(), args)
    ref_grads = torch.autograd.grad((ref * gout).sum(), args)
    for name, a, r in zip(inp, grads, ref_grads):
        assert rel_err(a, r) < 1e-4, name


def test_scans_keep_float32_math_under_bf16_autocast():
    """Mixed-precision training runs the model under autocast; the SSM ops must not
    let it turn their einsums into bf16 (same result as outside autocast, bit for bit)."""
    from vllm_mamba_hybrid.ops import selective_scan_fn, ssd_chunk_scan
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    r = lambda *s: torch.randn(*s, generator=g)
    m2 = (r(2, 20, 4, 8), r(2, 20, 4), -torch.rand(4, generator=g) - 0.1, r(2, 20, 2, 8),
          r(2, 20, 4, 8))
    m1 = (r(2, 16, 20), r(2, 16, 20), -torch.rand(16, 4, generator=g) - 0.1, r(2, 2, 4, 20),
          r(2, 2, 4, 20))
    plain = [ssd_chunk_scan(*m2, chunk_size=8)[0], selective_scan_fn(*m1, delta_softplus=True)[0]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [ssd_chunk_scan(*m2, chunk_size=8)[0], selective_scan_fn(*m1, delta_softplus=True)[0]]
    for a, b in zip(plain, mixed):
        assert b.dtype == torch.float32 and torch.equal(a, b)
