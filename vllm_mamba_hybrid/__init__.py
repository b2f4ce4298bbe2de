"""vllm-mamba-hybrid: Llama -> hybrid Mamba/attention models, served with vLLM.

The package itself imports nothing heavy, so ``vllm_mamba_hybrid.ops`` (and the layout)
load without transformers or vLLM. Importing ``vllm_mamba_hybrid.modeling``, or taking
``LlamaMambaHybridConfig`` / ``LlamaMambaHybridForCausalLM`` from here, registers the
hybrid with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
needs no ``trust_remote_code``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"LlamaMambaHybridConfig": "config", "LlamaMambaHybridForCausalLM": "modeling"}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        importlib.import_module(".modeling", __name__)  # registers both Auto classes
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LlamaMambaHybridConfig", "LlamaMambaHybridForCausalLM", "__version__"]
