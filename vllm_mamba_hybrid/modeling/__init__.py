"""Reference PyTorch implementation of the Llama/Mamba hybrid (transformers PreTrainedModel).

Importing it registers the hybrid config and model with transformers' Auto classes."""
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import LlamaMambaHybridConfig
from .cache import HybridCache
from .mamba1_mixer import Mamba1Mixer
from .mamba2_mixer import Mamba2Mixer
from .mamba_state import MambaLayerState
from .modeling_hybrid import (LlamaMambaHybridForCausalLM, LlamaMambaHybridModel,
                              LlamaMambaHybridPreTrainedModel)

AutoConfig.register(LlamaMambaHybridConfig.model_type, LlamaMambaHybridConfig, exist_ok=True)
AutoModelForCausalLM.register(LlamaMambaHybridConfig, LlamaMambaHybridForCausalLM, exist_ok=True)

__all__ = ["HybridCache", "LlamaMambaHybridForCausalLM", "LlamaMambaHybridModel",
           "LlamaMambaHybridPreTrainedModel", "Mamba1Mixer", "Mamba2Mixer", "MambaLayerState"]
