"""Multi-step SSM verification for speculative decoding: the replay formulation.

A verify step scores ``T = k + 1`` candidate tokens (the last accepted token and
k drafts) of every sequence. Instead of writing the state after every candidate
(vLLM's Mamba2 path: one read, k + 1 state writes, k + 1 state slots per
sequence), each sequence keeps ONE checkpoint state plus the post-conv inputs
(x, dt, B) of the last block. The next verify step

1. reads the checkpoint ``state[state_idx[b]]`` once,
2. replays the ``num_replay[b]`` tokens of the previous block that were accepted
   (the rejection sampler's count, bonus token included) and writes the result
   back once: the new checkpoint,
3. runs the T new tokens from that state in registers and emits their outputs;
   their states are never written, so rejected drafts (and padding tokens of a
   row with fewer drafts) cost no state traffic and need no rollback.

State traffic is one read and one write per sequence and step, whatever k is:
for a Mamba2 layer of Llama-3-8B shape the state (2 MiB per sequence) dwarfs
the inputs (~26 KiB per token). The price is caching x, dt, B of the last block
(the caller keeps them: the next call's ``replay_*``) and recomputing the
accepted tokens' updates, which is cheap arithmetic next to the state bytes.

Guarantee: after a call with ``num_replay[b] = j``, ``state[state_idx[b]]``
equals feeding the first j replay tokens one by one through the single-step op
(``ssd_state_update`` / ``selective_state_update``); ``y[b, t]`` equals the
single-step output of new token t fed after them.

Row conventions (all three ops): ``state_idx[b] < 0`` marks a finished (EOS)
or padding row: its state and conv buffer are neither read meaningfully nor
written, and its outputs are zeros. Active rows must have distinct slots.
``0 <= num_replay[b] <= R`` (replay inputs past ``num_replay[b]`` are never
used, may be garbage). The conv buffer follows vLLM's widened convention (see
:func:`conv_verify`): rollback is choosing a start column, no copy of a state.

``out`` (optional) receives y (e.g. a preallocated buffer of the mixer).
``impl``: ``"reference"`` (per-sequence loops over the single-step foundation
ops; ground truth), ``"torch"`` (vectorised over the batch, :mod:`.cpu_verify`),
``"cpp"`` (the C++ CPU kernels of ``csrc/verify_cpu.cpp``, built by setup.py),
``"triton"`` (GPU kernels, :mod:`.triton_verify`), ``"auto"`` (Triton on CUDA
tensors, C++ on CPU tensors where it was built, torch otherwise). The conv has
no C++ kernel: its torch path moves a few KB per sequence.
"""
from __future__ import annotations

import torch

from .causal_conv1d import causal_conv1d_update
from .selective_scan import per_channel_groups, selective_state_update
from .ssd import ssd_state_update

IMPLS = ("auto", "reference", "torch", "cpp", "triton")


def cpp_kernels():
    """The compiled CPU kernels, or None where the package was installed without them."""
    try:
        from .. import _verify_cpu
    except ImportError:
        return None
    return _verify_cpu


def _pick(impl: str, t: torch.Tensor, has_cpp: bool = True) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if t.is_cuda:
            return "triton"
        return "cpp" if has_cpp and cpp_kernels() is not None else "torch"
    if impl == "cpp" and t.is_cuda:
        raise ValueError("impl='cpp' runs on CPU tensors; use 'triton' or 'auto' for CUDA")
    if impl == "cpp" and cpp_kernels() is None:
        raise RuntimeError("impl='cpp' needs the C++ kernels: reinstall the package with torch "
                           "present (pip install --no-build-isolation -e .)")
    return impl


def _check_rows(state_idx, num_replay, batch, replay_len, what):
    if state_idx.shape != (batch,) or num_replay.shape != (batch,):
        raise ValueError(f"{what}: state_idx and num_replay must be ({batch},)")
    if replay_len == 0 and num_replay.numel() and not num_replay.is_cuda and int(num_replay.max()) > 0:
        raise ValueError(f"{what}: num_replay > 0 but no replay inputs")


def _run_impl(variant: str, impl: str, args: tuple, out: torch.Tensor | None) -> torch.Tensor:
    """Call ``{variant}_verify`` of the picked implementation (the Triton kernel writes
    ``out`` itself; the others return y, copied into ``out`` when one is given)."""
    if impl == "triton":
        from . import triton_verify
        return getattr(triton_verify, f"{variant}_verify_triton")(*args, out=out)
    if impl == "cpp":
        y = getattr(cpp_kernels(), f"{variant}_verify")(*args)
    elif impl == "reference":
        y = {"mamba2": _mamba2_reference, "mamba1": _mamba1_reference}[variant](*args)
    else:
        from . import cpu_verify
        y = getattr(cpu_verify, f"{variant}_verify_torch")(*args)
    return y if out is None else out.copy_(y)


def mamba2_verify(
    state: torch.Tensor,
    state_idx: torch.Tensor,
    replay_x: torch.Tensor,
    replay_dt: torch.Tensor,
    replay_B: torch.Tensor,
    num_replay: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    impl: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba2 (SSD) verify step; ``state`` is updated in place (the checkpoint).

    state: (slots, h, p, n) float32; state_idx, num_replay: (batch,) int;
    replay_x: (batch, R, h, p); replay_dt: (batch, R, h); replay_B: (batch, R, g, n);
    x: (batch, T, h, p); dt: (batch, T, h); B: (batch, T, g, n); C: (batch, T, gc, n)
    (head h reads group h // (h_total // g)); A, D, dt_bias: (h,).
    Returns y: (batch, T, h, p) in x's dtype (zeros on rows with state_idx < 0).
    """
    _check_rows(state_idx, num_replay, x.shape[0], replay_x.shape[1], "mamba2_verify")
    impl = _pick(impl, x)
    args = (state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B, C, D,
            dt_bias, dt_softplus)
    return _run_impl("mamba2", impl, args, out)


def mamba1_verify(
    state: torch.Tensor,
    state_idx: torch.Tensor,
    replay_x: torch.Tensor,
    replay_dt: torch.Tensor,
    replay_B: torch.Tensor,
    num_replay: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    impl: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba1 (selective scan, grouped B/C) verify step; ``state`` updated in place.

    state: (slots, d, n) float32; replay_x, replay_dt: (batch, R, d);
    replay_B: (batch, R, g, n); x, dt, z: (batch, T, d); B: (batch, T, g, n);
    C: (batch, T, gc, n) (channel c reads group c // (d // g)); A: (d, n);
    D, dt_bias: (d,). The replay needs neither C nor z (no outputs).
    Returns y = (C.h + D x) * silu(z): (batch, T, d) in x's dtype.
    """
    _check_rows(state_idx, num_replay, x.shape[0], replay_x.shape[1], "mamba1_verify")
    impl = _pick(impl, x)
    args = (state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B, C, D, z,
            dt_bias, dt_softplus)
    return _run_impl("mamba1", impl, args, out)


def conv_verify(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    state_idx: torch.Tensor,
    num_accepted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    impl: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal depthwise conv over a verify block, with vLLM's widened conv buffer.

    x: (batch, T, dim); conv_state: (slots, dim, width - 1 + K) with K >= T - 1
    (any strides; vLLM keeps the channel axis contiguous); weight: (dim, width);
    num_accepted: (batch,) >= 1, the previous step's accepted count with the bonus
    token (1 after a prefill, which writes columns 0..width-2).
    Row b starts from columns ``a-1 .. a+width-3`` (a = num_accepted[b]) and then
    keeps its last ``width - 2 + T`` inputs in columns ``0 .. width-3+T``, so the
    next step's start column a'-1 selects the window after a' accepted tokens.
    Returns the conv outputs (batch, T, dim) in x's dtype (zeros where state_idx < 0).
    """
    batch, T, dim = x.shape
    width = weight.shape[-1]
    if conv_state.shape[1] != dim or conv_state.shape[2] < width - 2 + T:
        raise ValueError(f"conv_state {tuple(conv_state.shape)} too narrow for width {width}, T {T}")
    impl = _pick(impl, x, has_cpp=False)
    if impl == "cpp":
        raise ValueError("conv_verify has no C++ kernel; use impl='torch' or 'auto'")
    args = (x, conv_state, state_idx, num_accepted, weight, bias, activation)
    if impl == "triton":
        from .triton_verify import conv_verify_triton
        return conv_verify_triton(*args, out=out)
    if impl == "reference":
        y = _conv_reference(*args)
    else:
        from .cpu_verify import conv_verify_torch
        y = conv_verify_torch(*args)
    return y if out is None else out.copy_(y)


# --- references: per-sequence loops over the single-step foundation ops ---------------------

def _mamba2_reference(state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B, C,
                      D, dt_bias, dt_softplus):
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        slot = int(state_idx[b])
        if slot < 0:
            continue
        S = state[slot:slot + 1]
        for t in range(int(num_replay[b])):  # replay: no output, C unused (B stands in)
            _, S = ssd_state_update(S, replay_x[b:b + 1, t], replay_dt[b:b + 1, t], A,
                                    replay_B[b:b + 1, t], replay_B[b:b + 1, t], None, dt_bias,
                                    dt_softplus)
        state[slot] = S[0]
        for t in range(x.shape[1]):
            yt, S = ssd_state_update(S, x[b:b + 1, t], dt[b:b + 1, t], A, B[b:b + 1, t],
                                     C[b:b + 1, t], D, dt_bias, dt_softplus)
            y[b, t] = yt[0]
    return y


def _mamba1_reference(state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B, C,
                      D, z, dt_bias, dt_softplus):
    d = x.shape[-1]
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        slot = int(state_idx[b])
        if slot < 0:
            continue
        S = state[slot:slot + 1]
        for t in range(int(num_replay[b])):
            Bt = per_channel_groups(replay_B[b:b + 1, t], d)
            _, S = selective_state_update(S, replay_x[b:b + 1, t], replay_dt[b:b + 1, t], A, Bt, Bt,
                                          None, None, dt_bias, dt_softplus)
        state[slot] = S[0]
        for t in range(x.shape[1]):
            yt, S = selective_state_update(
                S, x[b:b + 1, t], dt[b:b + 1, t], A, per_channel_groups(B[b:b + 1, t], d),
                per_channel_groups(C[b:b + 1, t], d), D, None if z is None else z[b:b + 1, t],
                dt_bias, dt_softplus)
            y[b, t] = yt[0]
    return y


def _conv_reference(x, conv_state, state_idx, num_accepted, weight, bias, activation):
    width = weight.shape[-1]
    T = x.shape[1]
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        slot = int(state_idx[b])
        if slot < 0:
            continue
        start = int(num_accepted[b]) - 1
        window = conv_state[slot:slot + 1, :, start:start + width - 1].clone()
        kept = [window[0, :, 1:]]
        for t in range(T):
            o, window = causal_conv1d_update(x[b:b + 1, t], window, weight, bias, activation)
            out[b, t] = o[0]
            kept.append(x[b, t, :, None].to(conv_state.dtype))
        conv_state[slot, :, :width - 2 + T] = torch.cat(kept, dim=-1)
    return out
