"""Reference ops in plain PyTorch (CPU and GPU, differentiable).

They are the ground truth that every fused kernel (Triton, C++, vLLM's own) is
tested against, and the CPU fallback where no kernel exists. All math runs in
float32 whatever the input dtype; outputs come back in the input dtype and
states in float32.
"""
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from .gated_norm import gated_rms_norm
from .selective_scan import selective_scan_fn, selective_state_update
from .ssd import ssd_chunk_scan, ssd_state_update
from .verify import conv_verify, mamba1_verify, mamba2_verify

__all__ = [
    "causal_conv1d_fn", "causal_conv1d_update", "gated_rms_norm",
    "selective_scan_fn", "selective_state_update", "ssd_chunk_scan", "ssd_state_update",
    "conv_verify", "mamba1_verify", "mamba2_verify",
]
