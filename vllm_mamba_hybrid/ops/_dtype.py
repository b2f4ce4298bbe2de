"""Compute dtype of the reference ops, and keeping autocast out of them."""
import functools

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for low-precision inputs (the scan must not run in bf16), float64 kept for checks."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def no_autocast(fn):
    """Run an op with autocast off: under bf16 autocast (mixed-precision training) its
    einsums would silently run in bf16, which the float32 scan contract forbids."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return fn(*args, **kwargs)  # the common case costs two flag reads
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapper
