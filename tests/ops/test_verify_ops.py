"""Verify ops (speculative decoding) == the per-sequence reference == single-step feeding.

Every batch holds every replay count 0..k+1 and finished (EOS) rows; inputs are
fresh random each run; replay inputs past a row's count, EOS rows' inputs and the
outputs are poisoned with NaN, so an element read that should not be, or not
written that should be, fails. The Triton kernels run here under
``TRITON_INTERPRET=1`` in a subprocess (the variable must be set before triton is
imported and slows every kernel down), and on a real GPU under ``-m gpu``.
"""
import pytest
import torch

from tests.ops.test_ops import rel_err
from tests.utils import run_under_triton_interpreter
from vllm_mamba_hybrid.ops import causal_conv1d_update, selective_state_update, ssd_state_update
from vllm_mamba_hybrid.ops.verify import conv_verify, mamba1_verify, mamba2_verify

KS = list(range(1, 9))
NAN = float("nan")
# (y tolerance, state tolerance) by input dtype: fp32 math either way; bf16 outputs
# are rounded to 8 bits, the fp32 state only sees summation-order differences.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.5e-2, 1e-4)}
SMALL2 = dict(h=4, g=2, gc=4, p=8, n=16)          # Mamba2: heads, B groups, C groups, headdim, d_state
SMALL1 = dict(d=32, n=8, g=2, gc=4)               # Mamba1: channels, d_state, B groups, C groups
# d_state cut into several 32-wide slices by the Triton Mamba2 loop kernel, the last one
# part-masked (48 pads to 64)
SLICED2 = [dict(h=2, g=1, gc=2, p=8, n=n) for n in (64, 48)]
# Mamba1's tile: d_state in 16-wide slices, one (n = 16; 3 pads to 4) or several (64;
# 40 pads to 64, its last slice part-masked), channels past the last full program (40)
SLICED1 = [dict(d=40, n=n, g=5, gc=10) for n in (16, 64, 40, 3)]


def _rows(k, device, n_eos=2):
    """Replay counts 0..k+1 (R = k+1) plus EOS rows, shuffled over a larger slot pool."""
    counts = list(range(k + 2)) + [k + 1] * n_eos
    batch = len(counts)
    perm = torch.randperm(batch)
    num_replay = torch.tensor(counts, dtype=torch.int32)[perm]
    slots = torch.randperm(batch + 3)[:batch]
    eos = perm >= k + 2                                   # rows that drew an EOS entry
    state_idx = torch.where(eos, -1, slots).to(torch.int32)
    return state_idx.to(device), num_replay.to(device), batch + 3, eos.to(device)


def _poison_past(t, num_replay):
    """NaN in replay tokens past each row's count: they must never be read."""
    keep = torch.arange(t.shape[1], device=t.device)[None] < num_replay[:, None]
    return torch.where(keep.view(*keep.shape, *([1] * (t.dim() - 2))), t, NAN)


def _poison_rows(t, eos):
    return torch.where(eos.view(-1, *([1] * (t.dim() - 1))), NAN, t)


def mamba2_case(k, dtype, device, h, g, gc, p, n, n_eos=2):
    state_idx, num_replay, slots, eos = _rows(k, device, n_eos)
    batch, R, T = state_idx.shape[0], k + 1, k + 1
    rnd = lambda *s: torch.randn(*s, device=device)
    replay = [rnd(batch, R, h, p), rnd(batch, R, h), rnd(batch, R, g, n)]
    new = [rnd(batch, T, h, p), rnd(batch, T, h), rnd(batch, T, g, n), rnd(batch, T, gc, n)]
    replay = [_poison_past(t, num_replay).to(dtype) for t in replay]
    new = [_poison_rows(t, eos).to(dtype) for t in new]
    return dict(
        state=rnd(slots, h, p, n), state_idx=state_idx, replay_x=replay[0], replay_dt=replay[1],
        replay_B=replay[2], num_replay=num_replay, x=new[0], dt=new[1], A=-torch.rand(h, device=device) * 4 - 0.2,
        B=new[2], C=new[3], D=rnd(h), dt_bias=rnd(h) * 0.5)


def mamba1_case(k, dtype, device, d, n, g, gc, n_eos=2):
    state_idx, num_replay, slots, eos = _rows(k, device, n_eos)
    batch, R, T = state_idx.shape[0], k + 1, k + 1
    rnd = lambda *s: torch.randn(*s, device=device)
    replay = [rnd(batch, R, d), rnd(batch, R, d), rnd(batch, R, g, n)]
    new = [rnd(batch, T, d), rnd(batch, T, d), rnd(batch, T, g, n), rnd(batch, T, gc, n),
           rnd(batch, T, d)]
    replay = [_poison_past(t, num_replay).to(dtype) for t in replay]
    new = [_poison_rows(t, eos).to(dtype) for t in new]
    return dict(
        state=rnd(slots, d, n), state_idx=state_idx, replay_x=replay[0], replay_dt=replay[1],
        replay_B=replay[2], num_replay=num_replay, x=new[0], dt=new[1],
        A=-torch.rand(d, n, device=device) * 4 - 0.2, B=new[2], C=new[3], D=rnd(d), z=new[4],
        dt_bias=rnd(d) * 0.5)


def _run(op, case, impl):
    """Run ``op`` on a copy of the state with a NaN-poisoned ``out``; returns (y, state)."""
    args = dict(case, state=case["state"].clone())
    out = torch.full_like(case["x"], NAN)
    y = op(**args, impl=impl, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y, args["state"]


def _mamba2_dot(impl, **kw):
    """The Triton Mamba2 kernel in its SSD block form (algo="dot")."""
    from vllm_mamba_hybrid.ops.triton_verify import mamba2_verify_triton
    return mamba2_verify_triton(**kw, dt_softplus=True, algo="dot")


def check_ssm(variant, impl, k, dtype, device, shape=None, n_eos=2, without=()):
    """variant "mamba2-dot" checks the block-form Mamba2 kernel (impl must be "triton");
    ``without``: optional inputs left out (None), e.g. Mamba1's gate z."""
    op, make = (mamba1_verify, mamba1_case) if variant == "mamba1" else (mamba2_verify, mamba2_case)
    case = make(k, dtype, device, n_eos=n_eos, **(shape or (SMALL1 if variant == "mamba1" else SMALL2)))
    case.update(dict.fromkeys(without))
    y_ref, st_ref = _run(op, case, "reference")
    y, st = _run(_mamba2_dot if variant == "mamba2-dot" else op, case, impl)
    tol_y, tol_s = TOL[dtype]
    assert torch.isfinite(y).all(), "unwritten or poisoned output"
    assert rel_err(y, y_ref) < tol_y, (variant, impl, k, rel_err(y, y_ref))
    assert rel_err(st, st_ref) < tol_s, (variant, impl, k, rel_err(st, st_ref))
    eos = case["state_idx"] < 0
    assert (y[eos] == 0).all(), "finished rows must output zeros"
    untouched = torch.ones(st.shape[0], dtype=torch.bool, device=device)
    untouched[case["state_idx"][~eos].long()] = False
    assert torch.equal(st[untouched], case["state"][untouched]), "a slot of no active row was written"


def conv_case(k, dtype, device, dim=24, width=4, n_eos=2):
    state_idx, num_accepted, slots, eos = _rows(k, device, n_eos)
    num_accepted = num_accepted.clamp(min=1)            # vLLM: a >= 1 (the bonus token)
    T = k + 1
    # vLLM's layout: channel axis contiguous, viewed as (slots, dim, width-1+k)
    conv_state = torch.randn(slots, width - 1 + k, dim, device=device).to(dtype).transpose(1, 2)
    x = _poison_rows(torch.randn(state_idx.shape[0], T, dim, device=device), eos).to(dtype)
    return dict(x=x, conv_state=conv_state, state_idx=state_idx, num_accepted=num_accepted,
                weight=torch.randn(dim, width, device=device), bias=torch.randn(dim, device=device))


def check_conv(impl, k, dtype, device, n_eos=2, **shape):
    case = conv_case(k, dtype, device, n_eos=n_eos, **shape)
    outs = {}
    for name in ("reference", impl):
        buf = case["conv_state"].clone(memory_format=torch.preserve_format)
        out = torch.full_like(case["x"], NAN)
        conv_verify(**dict(case, conv_state=buf), impl=name, out=out)
        outs[name] = (out, buf)
    (y_ref, st_ref), (y, st) = outs["reference"], outs[impl]
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < TOL[dtype][0], (impl, k, rel_err(y, y_ref))
    assert torch.equal(st, st_ref), "kept conv inputs differ"     # pure data movement: exact
    eos = case["state_idx"] < 0
    assert (y[eos] == 0).all()


def check_spec_loop(variant, impl, device, k=3, rounds=4, batch=3, width=4):
    """A small speculative loop through conv + SSM (the mixer's decode path, minus the
    projections) with random acceptances: after every round the checkpoint equals feeding
    the accepted tokens one by one, and each candidate's output equals the sequential one."""
    m2 = variant == "mamba2"
    h, g, p, n, d = 4, 2, 8, 16, 32
    conv_dim = h * p + g * n + h * n if m2 else d
    slots = torch.tensor([2, 0, 1], device=device, dtype=torch.int32)
    rnd = lambda *s: torch.randn(*s, device=device)
    A = -torch.rand(h if m2 else (d, n), device=device) * 3 - 0.2
    Dp, dt_bias = rnd(h if m2 else d), rnd(h if m2 else d) * 0.5
    weight, bias = rnd(conv_dim, width), rnd(conv_dim)

    # the sequential truth: one state per sequence, fed only accepted tokens
    conv_seq, ssm_seq = rnd(batch, conv_dim, width - 1), rnd(batch, h, p, n) if m2 else rnd(batch, d, n)
    conv_buf = torch.randn(batch, conv_dim, width - 1 + k, device=device)
    conv_buf[slots.long(), :, :width - 1] = conv_seq          # as a prefill leaves it: columns 0..w-2
    state = torch.randn_like(ssm_seq)
    state[slots.long()] = ssm_seq
    num_acc = torch.ones(batch, dtype=torch.int32, device=device)
    num_replay = torch.zeros(batch, dtype=torch.int32, device=device)
    replay = None
    T = k + 1

    def split(xc, lead):
        """Post-conv (.., conv_dim) -> SSM inputs; extra per-token inputs drawn at random."""
        if m2:
            x, B, C = xc.split([h * p, g * n, h * n], dim=-1)
            return x.unflatten(-1, (h, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (h, n))
        return xc, lead["B"], lead["C"]

    for _ in range(rounds):
        raw = rnd(batch, T, conv_dim)
        extra = dict(dt=rnd(batch, T, h if m2 else d), B=rnd(batch, T, g, n), C=rnd(batch, T, 4, n),
                     z=rnd(batch, T, d))
        xc = conv_verify(raw, conv_buf, slots, num_acc, weight, bias,
                         impl="torch" if impl == "cpp" else impl)  # the conv has no C++ kernel
        x, B, C = split(xc, extra)
        if replay is None:
            replay = [t[:, :0] for t in (x, extra["dt"], B)]
        if m2:
            y = mamba2_verify(state, slots, *replay, num_replay, x, extra["dt"], A, B, C, Dp, dt_bias,
                              impl=impl)
        else:
            y = mamba1_verify(state, slots, *replay, num_replay, x, extra["dt"], A, B, C, Dp,
                              extra["z"], dt_bias, impl=impl)
        # checkpoint after the replay == sequential state before this block
        assert rel_err(state[slots.long()], ssm_seq) < 1e-5
        # every candidate's output == feeding the block token by token from the sequential state
        cs, ss = conv_seq.clone(), ssm_seq.clone()
        for t in range(T):
            xt, cs = causal_conv1d_update(raw[:, t], cs, weight, bias)
            xs, Bs, Cs = split(xt, {k_: v[:, t] for k_, v in extra.items()})
            if m2:
                yt, ss = ssd_state_update(ss, xs, extra["dt"][:, t], A, Bs, Cs, Dp, dt_bias)
            else:
                rep = lambda G: G.repeat_interleave(d // G.shape[1], dim=1)
                yt, ss = selective_state_update(ss, xs, extra["dt"][:, t], A, rep(Bs), rep(Cs), Dp,
                                                extra["z"][:, t], dt_bias, True)
            assert rel_err(xc[:, t], xt) < 1e-5 and rel_err(y[:, t], yt) < 1e-5, (variant, t)
        # accept a random prefix a in 1..T; the sequential truth advances over it
        num_acc = torch.randint(1, T + 1, (batch,), device=device, dtype=torch.int32)
        for b in range(batch):
            for t in range(int(num_acc[b])):
                xt, conv_seq[b:b + 1] = causal_conv1d_update(raw[b:b + 1, t], conv_seq[b:b + 1],
                                                             weight, bias)
                xs, Bs, Cs = split(xt, {k_: v[b:b + 1, t] for k_, v in extra.items()})
                if m2:
                    _, ssm_seq[b:b + 1] = ssd_state_update(ssm_seq[b:b + 1], xs, extra["dt"][b:b + 1, t],
                                                           A, Bs, Cs, Dp, dt_bias)
                else:
                    rep = lambda G: G.repeat_interleave(d // G.shape[1], dim=1)
                    _, ssm_seq[b:b + 1] = selective_state_update(
                        ssm_seq[b:b + 1], xs, extra["dt"][b:b + 1, t], A, rep(Bs), rep(Cs), None,
                        None, dt_bias, True)
        replay, num_replay = [x, extra["dt"], B], num_acc.clone()
        window = torch.stack([conv_buf[slots[b].long(), :, int(num_acc[b]) - 1:int(num_acc[b]) + width - 2]
                              for b in range(batch)])
        assert torch.equal(window, conv_seq), "conv window after rollback-by-offset"


# --- reference vs the CPU paths: vectorised torch and the C++ kernels -----------------------

CPU_IMPLS = ["torch", "cpp"]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_cpu_ssm_matches_reference(variant, k, impl):
    check_ssm(variant, impl, k, torch.float32, "cpu")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_cpu_ssm_bf16(variant, impl):
    check_ssm(variant, impl, 4, torch.bfloat16, "cpu")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_mamba1_without_gate(impl):
    check_ssm("mamba1", impl, 3, torch.float32, "cpu", without=("z",))


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", [dict(d=24, n=8, g=2, gc=4), dict(d=48, n=40, g=3, gc=6)])
def test_cpu_mamba1_channels_not_a_multiple_of_the_vector(impl, shape):
    """The C++ kernel steps 16 channels a vector: 24 / 48 channels leave a part-filled
    block or groups (12 / 16 channels for B, 6 / 8 for C) that split a block; d_state 40
    is no power of two."""
    check_ssm("mamba1", impl, 3, torch.float32, "cpu", shape=shape)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("n", [20, 40, 7])
def test_cpu_mamba2_state_not_a_multiple_of_the_vector(impl, n):
    """The C++ kernel sweeps a state row 16 values at a time: d_state 20 / 40 / 7 leave a
    tail of 4 / 8 / 7 values (7: no full chunk at all)."""
    check_ssm("mamba2", impl, 3, torch.float32, "cpu", shape=dict(h=4, g=2, gc=4, p=8, n=n))


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_mamba2_long_blocks(impl):
    """k = 16: 17 new tokens, past the token counts the C++ row code is compiled for
    (its accumulators then live in memory)."""
    check_ssm("mamba2", impl, 16, torch.float32, "cpu", shape=dict(h=2, g=1, gc=2, p=8, n=20))


def test_cpp_kernels_are_built_and_chosen_on_cpu():
    from vllm_mamba_hybrid.ops.verify import _pick, cpp_kernels
    assert cpp_kernels() is not None, "the C++ verify kernels were not built by setup.py"
    assert _pick("auto", torch.zeros(1)) == "cpp"


def test_cpp_model_shapes():
    """Llama-3-8B-shaped layers, as the benchmark times them (bf16 inputs, fp32 state)."""
    check_ssm("mamba2", "cpp", 4, torch.bfloat16, "cpu", shape=dict(h=32, g=8, gc=32, p=128, n=128),
              n_eos=1)
    check_ssm("mamba1", "cpp", 4, torch.bfloat16, "cpu", shape=dict(d=4096, n=16, g=64, gc=256),
              n_eos=1)


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_cpp_refuses_bad_inputs_by_name(variant):
    """The kernels read raw pointers: a wrong shape or slot must fail before, by name."""
    op, make = (mamba1_verify, mamba1_case) if variant == "mamba1" else (mamba2_verify, mamba2_case)
    case = make(2, torch.float32, "cpu", **(SMALL1 if variant == "mamba1" else SMALL2))
    state = case["state"].clone()
    for name in ("replay_B", "C", "dt_bias"):
        bad = dict(case, state=state, **{name: case[name][..., :-1]})
        with pytest.raises(RuntimeError, match=f"{variant}_verify: {name} has shape"):
            op(**bad, impl="cpp")
    slots = case["state_idx"].clone()
    slots[slots.argmax()] = state.shape[0]
    with pytest.raises(RuntimeError, match=r"state_idx\[\d+\] = \d+ but the state has"):
        op(**dict(case, state=state, state_idx=slots), impl="cpp")
    assert torch.equal(state, case["state"]), "a refused call wrote the state"


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_cpp_state_in_a_strided_cache(variant):
    """vLLM hands the kernels a view of a larger cache: slot and head strides are not packed."""
    op, make = (mamba1_verify, mamba1_case) if variant == "mamba1" else (mamba2_verify, mamba2_case)
    case = make(3, torch.float32, "cpu", **(SMALL1 if variant == "mamba1" else SMALL2))
    big = torch.randn(case["state"].shape[0], 2, *case["state"].shape[1:])
    big[:, 0] = case["state"]
    strided = dict(case, state=big[:, 0])
    y_ref, st_ref = _run(op, case, "reference")
    y = op(**strided, impl="cpp")
    assert rel_err(y, y_ref) < 2e-5 and rel_err(big[:, 0], st_ref) < 2e-5


@pytest.mark.parametrize("k", [1, 4, 8])
def test_torch_conv_matches_reference(k):
    check_conv("torch", k, torch.float32, "cpu")


@pytest.mark.parametrize("impl", ["reference", "torch", "cpp"])
@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_spec_loop_equals_sequential(variant, impl):
    check_spec_loop(variant, impl, "cpu")


def test_triton_loop_tile_fills_the_sms():
    """Rows and warps of a Mamba2 loop program, hand-computed for the 8B layer (32 heads,
    p = d_state = 128) on 132 SMs: 32 rows on one warp while the grid is one wave of 8
    programs an SM (1,056), 16 rows on one warp beyond, halved rows on two warps where
    32-row programs would give an SM fewer than 4 (528)."""
    from vllm_mamba_hybrid.ops.triton_verify import _loop_tile
    heads = 32
    assert _loop_tile(128, 128, 8 * heads, 132) == (32, 1)       # 1,024 programs: one wave
    assert _loop_tile(128, 128, 16 * heads, 132) == (16, 1)      # 2,048 > 1,056 at 32 rows
    assert _loop_tile(128, 128, 64 * heads, 132) == (16, 1)
    assert _loop_tile(128, 128, 4 * heads, 132) == (16, 2)       # 512 < 528 at 32 rows
    assert _loop_tile(128, 128, 1 * heads, 132) == (8, 2)        # 128, 256 < 528; 8 is the floor
    assert _loop_tile(128, 128, 1 * heads, None) == (32, 2)      # no GPU: no halving
    assert _loop_tile(128, 64, 8 * heads, 132) == (32, 2)        # 512 programs of 64 rows < 528
    assert _loop_tile(128, 64, 16 * heads, 132) == (64, 1)       # 4096 state values at d_state 64
    assert _loop_tile(128, 64, 64 * heads, 132) == (32, 1)       # 4,096 programs > 1,056
    assert _loop_tile(8, 16, 1, 132) == (8, 2)                   # p smaller than the floor


@pytest.mark.parametrize("variant,bad", [("mamba2", dict(sub_n=24)), ("mamba2", dict(block_p=12)),
                                         ("mamba2", dict(sub_n=0)), ("mamba1", dict(block_d=48)),
                                         ("mamba1", dict(sub_n=6))])
def test_triton_refuses_tiles_that_are_not_powers_of_two(variant, bad):
    from vllm_mamba_hybrid.ops import triton_verify
    make, shape = (mamba1_case, SMALL1) if variant == "mamba1" else (mamba2_case, SMALL2)
    case = make(2, torch.float32, "cpu", **shape)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be a power of two"):
        getattr(triton_verify, f"{variant}_verify_triton")(**case, dt_softplus=True, **bad)


def test_triton_mamba1_warps_fill_small_grids():
    from vllm_mamba_hybrid.ops.triton_verify import _mamba1_warps
    assert _mamba1_warps(64, 132) == 8       # batch 1 at d_inner 4096: 64 programs
    assert _mamba1_warps(512, 132) == 4      # batch 8
    assert _mamba1_warps(64, None) == 4      # no GPU: the default


# --- Triton kernels under the interpreter (CPU, subprocess) ---------------------------------

def triton_interpreter_checks():
    """Entry point of the subprocess: every k, both variants, conv, and the spec loop."""
    for k in KS:
        for variant in ("mamba2", "mamba2-dot", "mamba1"):
            check_ssm(variant, "triton", k, torch.float32, "cpu")
        check_conv("triton", k, torch.float32, "cpu")
    for variant in ("mamba2", "mamba2-dot", "mamba1"):
        check_ssm(variant, "triton", 3, torch.bfloat16, "cpu")
    check_ssm("mamba1", "triton", 3, torch.float32, "cpu", without=("z",))
    from vllm_mamba_hybrid.ops import triton_verify
    picked = triton_verify._SLICES_FIRST
    for slices_first in (False, True):          # both tile orders, whatever Triton this is
        triton_verify._SLICES_FIRST = slices_first
        for shape in SLICED2:
            check_ssm("mamba2", "triton", 3, torch.float32, "cpu", shape=shape)
        for shape in SLICED1:
            check_ssm("mamba1", "triton", 3, torch.float32, "cpu", shape=shape)
    triton_verify._SLICES_FIRST = picked
    for variant in ("mamba2", "mamba1"):
        check_spec_loop(variant, "triton", "cpu", rounds=3)
    print("triton interpreter checks passed")


def test_triton_kernels_interpreted():
    run_under_triton_interpreter(
        "from tests.ops.test_verify_ops import triton_interpreter_checks as f; f()",
        "triton interpreter checks passed")


# --- Triton kernels on a real GPU -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", KS)
def test_triton_gpu(k, dtype):
    for variant in ("mamba2", "mamba2-dot", "mamba1"):
        check_ssm(variant, "triton", k, dtype, "cuda")
    for shape in SLICED2:
        check_ssm("mamba2", "triton", k, dtype, "cuda", shape=shape)
    for shape in SLICED1:
        check_ssm("mamba1", "triton", k, dtype, "cuda", shape=shape)
    check_ssm("mamba1", "triton", k, dtype, "cuda", without=("z",))
    check_conv("triton", k, dtype, "cuda")


@pytest.mark.gpu
def test_triton_gpu_model_shapes():
    """Llama-3-8B-shaped layers (8 KV groups for B; Mamba1 with d_xb = 1024)."""
    for variant in ("mamba2", "mamba2-dot"):
        check_ssm(variant, "triton", 4, torch.bfloat16, "cuda",
                  shape=dict(h=32, g=8, gc=32, p=128, n=128))
    check_ssm("mamba1", "triton", 4, torch.bfloat16, "cuda",
              shape=dict(d=4096, n=16, g=64, gc=256))
    check_conv("triton", 4, torch.bfloat16, "cuda", dim=4096 + 2 * 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_triton_gpu_spec_loop(variant):
    check_spec_loop(variant, "triton", "cuda")
