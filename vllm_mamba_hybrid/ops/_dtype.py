"""Compute dtype of the reference ops."""
import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for low-precision inputs (the scan must not run in bf16), float64 kept for checks."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
