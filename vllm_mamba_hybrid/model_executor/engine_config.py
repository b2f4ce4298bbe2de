"""Engine-config hook for LlamaMambaHybridForCausalLM (vLLM's per-architecture
``VerifyAndUpdateConfig`` mechanism; the plugin adds it to MODELS_CONFIG_MAP).

Runs where the engine config is built, before the hybrid defaults are applied.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_mamba_hybrid.layout import check_tensor_parallel_size
from vllm_mamba_hybrid.model_executor.vllm_compat import replayssm_enabled

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)

# Proposers that run beside a hybrid target: they need no draft layers in vLLM's
# KV cache groups and no target hidden states. "custom_class" covers the
# project's draft-model proposer (vllm_mamba_hybrid.spec_decode.HybridDraftProposer).
SUPPORTED_SPEC_METHODS = ("ngram", "ngram_gpu", "custom_class", "suffix")


def check_speculative_config(vllm_config: VllmConfig) -> None:
    """Refuse speculative setups the hybrid's Mamba layers cannot serve."""
    spec = vllm_config.speculative_config
    if spec is None or vllm_config.num_speculative_tokens == 0:
        return
    if spec.method not in SUPPORTED_SPEC_METHODS:
        hint = ""
        if spec.method == "draft_model":
            hint = (" vLLM's draft_model proposer puts the draft's layers into the hybrid's "
                    "cache groups and fails; use the project's own draft proposer instead: "
                    "speculative_config={\"method\": \"custom_class\", \"model\": "
                    "\"vllm_mamba_hybrid.spec_decode.HybridDraftProposer\", "
                    "\"num_speculative_tokens\": k} with VLLM_MAMBA_HYBRID_DRAFT=/draft/dir.")
        raise ValueError(
            f"LlamaMambaHybridForCausalLM supports speculative methods "
            f"{SUPPORTED_SPEC_METHODS}, not {spec.method!r}.{hint}")
    if replayssm_enabled(vllm_config.cache_config):
        raise ValueError(
            "LlamaMambaHybridForCausalLM's Mamba layers keep one state block per draft "
            "token; ReplaySSM (use_replayssm) is not implemented for them.")


class LlamaMambaHybridEngineConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        cache_config = vllm_config.cache_config
        # Here, in the process that builds the config, before any worker is started (and
        # before vLLM sizes the Mamba state per rank).
        check_tensor_parallel_size(vllm_config.model_config.hf_config,
                                   vllm_config.parallel_config.tensor_parallel_size)
        check_speculative_config(vllm_config)
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
