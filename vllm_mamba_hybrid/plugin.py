"""vLLM plugin (entry point ``vllm.general_plugins``: ``mamba_hybrid``).

vLLM calls ``register()`` in every process it starts (API server, engine core,
workers), so it stays cheap and idempotent: the model class is registered
lazily by name and imported only when vLLM builds the model.
"""
from __future__ import annotations

ARCHITECTURE = "LlamaMambaHybridForCausalLM"
MODEL_CLASS = "vllm_mamba_hybrid.model_executor.llama_mamba_hybrid:LlamaMambaHybridForCausalLM"
# Custom ops of the mixers (see model_executor/mixers.py): split points for
# piecewise CUDA graphs, like vLLM's own mamba_mixer ops.
MIXER_OPS = ("vllm::llama_hybrid_mamba1_mixer", "vllm::llama_hybrid_mamba2_mixer")


def register() -> None:
    import vllm
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.config.compilation import CompilationConfig
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_mamba_hybrid.config import LlamaMambaHybridConfig
    from vllm_mamba_hybrid.model_executor.engine_config import LlamaMambaHybridEngineConfig
    from vllm_mamba_hybrid.model_executor.vllm_compat import check_vllm_version

    warning = check_vllm_version(vllm.__version__)
    if warning:
        init_logger(__name__).warning_once(warning)

    AutoConfig.register(LlamaMambaHybridConfig.model_type, LlamaMambaHybridConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, LlamaMambaHybridEngineConfig)
    for op in MIXER_OPS:
        if op not in CompilationConfig._attention_ops:
            CompilationConfig._attention_ops.append(op)
