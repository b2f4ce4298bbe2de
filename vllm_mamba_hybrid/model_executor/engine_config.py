"""Engine-config hook for LlamaMambaHybridForCausalLM (vLLM's per-architecture
``VerifyAndUpdateConfig`` mechanism; the plugin adds it to MODELS_CONFIG_MAP).

Runs where the engine config is built, before the hybrid defaults are applied.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)


class LlamaMambaHybridEngineConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache_config = vllm_config.cache_config
        if vllm_config.num_speculative_tokens > 0:
            raise ValueError(
                "LlamaMambaHybridForCausalLM does not support speculative decoding yet "
                "(its Mamba layers ignore accepted-token counts); remove the "
                "speculative config.")
        # The mixers keep one state per request (mamba_cache_mode "none"); the
        # block-aligned states prefix caching needs ("align") are not written.
        if cache_config.enable_prefix_caching:
            logger.warning(
                "Prefix caching is not supported for LlamaMambaHybridForCausalLM; "
                "turning it off.")
            cache_config.enable_prefix_caching = False
        # The paper's scan keeps its state in float32 even for bf16 weights.
        if cache_config.mamba_ssm_cache_dtype == "auto":
            cache_config.mamba_ssm_cache_dtype = "float32"
