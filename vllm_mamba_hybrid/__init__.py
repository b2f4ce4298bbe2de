"""vllm-mamba-hybrid: Llama -> hybrid Mamba/attention models, served with vLLM.

Importing the package registers the hybrid config and model with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)`` needs no
``trust_remote_code``.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .config import LlamaMambaHybridConfig
from .modeling import LlamaMambaHybridForCausalLM

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    try:
        AutoConfig.register(LlamaMambaHybridConfig.model_type, LlamaMambaHybridConfig)
    except ValueError:  # already registered (idempotent)
        pass
    try:
        AutoModelForCausalLM.register(LlamaMambaHybridConfig, LlamaMambaHybridForCausalLM)
    except ValueError:
        pass


_register_with_transformers()

__all__ = ["LlamaMambaHybridConfig", "LlamaMambaHybridForCausalLM", "__version__"]
