"""Reference PyTorch implementation of the Llama/Mamba hybrid (transformers PreTrainedModel)."""
from .cache import HybridCache
from .mamba1_mixer import Mamba1Mixer
from .mamba2_mixer import Mamba2Mixer
from .mamba_state import MambaLayerState
from .modeling_hybrid import (LlamaMambaHybridForCausalLM, LlamaMambaHybridModel,
                              LlamaMambaHybridPreTrainedModel)

__all__ = ["HybridCache", "LlamaMambaHybridForCausalLM", "LlamaMambaHybridModel",
           "LlamaMambaHybridPreTrainedModel", "Mamba1Mixer", "Mamba2Mixer", "MambaLayerState"]
