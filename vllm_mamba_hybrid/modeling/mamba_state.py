"""Per-layer recurrent state of a Mamba mixer during incremental decoding."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MambaLayerState:
    """conv: the last ``d_conv - 1`` conv inputs, (batch, conv_dim, d_conv - 1);
    ssm: the SSM state in float32 ((batch, d_inner, d_state) for Mamba1,
    (batch, nheads, headdim, d_state) for Mamba2). Mixers replace both tensors
    after every forward, so one object follows a sequence through its decode."""

    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice) -> "MambaLayerState":
        """Keep only the batch rows in ``index`` (sequences still decoding)."""
        if self.conv is None:
            return MambaLayerState()
        return MambaLayerState(self.conv[index], self.ssm[index])

    def row(self, i: int, pad: int = 0) -> "MambaLayerState":
        """Row ``i`` of a batch, as views (``pad``: left padding, which a recurrent state
        does not have; the argument matches KVCacheEntry.row)."""
        return self.select(slice(i, i + 1))

    @staticmethod
    def stack(states: list["MambaLayerState"], width: int = 0) -> "MambaLayerState":
        """One-row states as a batch; a fresh (empty) row gets zeros (``width``: the
        padded length, which a recurrent state does not need; as KVCacheEntry.stack)."""
        like = next((s for s in states if s.conv is not None), None)
        if like is None:
            return MambaLayerState()
        return MambaLayerState(
            torch.cat([like.conv.new_zeros(like.conv.shape) if s.conv is None else s.conv
                       for s in states]),
            torch.cat([like.ssm.new_zeros(like.ssm.shape) if s.ssm is None else s.ssm
                       for s in states]))
