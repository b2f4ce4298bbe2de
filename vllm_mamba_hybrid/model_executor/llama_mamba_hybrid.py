"""vLLM model for Llama/Mamba hybrids ("The Mamba in the Llama").

Layers listed in ``config.attn_layers`` are vLLM's own ``LlamaDecoderLayer``
(attention, RoPE from ``rope_parameters``, MLP); every other layer replaces
``self_attn`` by a Mamba mixer (``mixers.py``) under the same norms and MLP.
Checkpoint tensor names are the HF ones, so weights load 1:1 (q/k/v and
gate/up, and Mamba1's x/z/B/C projections, are stacked into single GEMMs:
``layout.STACKED_PARAMS``; the expected tensors: ``layout.checkpoint_tensor_shapes``).
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.logger import init_logger
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.utils import (
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from vllm_mamba_hybrid.checkpoint import check_finite, tensor_files
from vllm_mamba_hybrid.config import LlamaMambaHybridConfig
from vllm_mamba_hybrid.layout import A_LOG, A_PARAM, STACKED_PARAMS, checkpoint_tensor_shapes
from vllm_mamba_hybrid.model_executor.mixers import (
    Mamba1Mixer,
    Mamba2Mixer,
    mamba_state_dtypes,
    mamba_state_shapes,
)

logger = init_logger(__name__)


class LlamaMambaDecoderLayer(nn.Module):
    """A teacher layer whose attention was replaced by a Mamba mixer."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: LlamaMambaHybridConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        mixer_cls = Mamba2Mixer if config.mamba_variant == "mamba2" else Mamba1Mixer
        self.mamba = mixer_cls(
            config, model_config=vllm_config.model_config,
            cache_config=vllm_config.cache_config, quant_config=quant_config,
            prefix=f"{prefix}.mamba")
        self.mlp = LlamaMLP(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act, quant_config=quant_config,
            bias=getattr(config, "mlp_bias", False), prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.mamba(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": -1, "intermediate_tensors": 0,
                      "inputs_embeds": 0})
class LlamaMambaHybridModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LlamaMambaHybridConfig = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config)

        def make_layer(prefix: str) -> nn.Module:
            idx = int(prefix.rsplit(".", 1)[1])
            if config.is_attention_layer(idx):
                return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix)
            return LlamaMambaDecoderLayer(vllm_config=vllm_config, prefix=prefix)

        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, make_layer, prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaMambaHybridForCausalLM(nn.Module, HasInnerState, IsHybrid):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: LlamaMambaHybridConfig = vllm_config.model_config.hf_config
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError(
                "LlamaMambaHybridForCausalLM does not support prefix caching; start vLLM "
                "with enable_prefix_caching=False (the vllm_mamba_hybrid plugin does this "
                "when it is loaded as a vLLM plugin).")
        if get_pp_group().world_size > 1:
            raise ValueError("LlamaMambaHybridForCausalLM does not support pipeline parallelism")
        self.config = config
        self.vllm_config = vllm_config
        self.model = LlamaMambaHybridModel(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    # ---- hybrid cache interface (called before the model is built) -------------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return mamba_state_shapes(
            vllm_config.model_config.hf_config, vllm_config.parallel_config.tensor_parallel_size,
            vllm_config.num_speculative_tokens)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return mamba_state_dtypes(vllm_config.model_config, vllm_config.cache_config)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()

    # ---- forward -------------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- weights -------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Strict loader: every checkpoint tensor must be expected, well-shaped, finite
        and present; errors name the tensor and the checkpoint (file, where local)."""
        source = self.vllm_config.model_config.model
        # The files' headers first: a truncated file is named before vLLM reads it.
        where = tensor_files(source) if Path(source).is_dir() else {}
        expected = checkpoint_tensor_shapes(self.config)
        params = dict(self.named_parameters())
        seen: set[str] = set()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                logger.warning("%s: ignoring lm_head.weight, the model ties it to "
                               "model.embed_tokens.weight", source)
                continue
            file = where.get(name, source)
            if name not in expected:
                raise ValueError(f"Unexpected tensor {name!r} in checkpoint {file} "
                                 f"(mamba_variant={self.config.mamba_variant!r}, "
                                 f"attn_layers={self.config.attn_layers})")
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"Tensor {name!r} in checkpoint {file} has shape "
                                 f"{tuple(tensor.shape)}, expected {expected[name]}")
            if name in seen:
                raise ValueError(f"Tensor {name!r} appears twice in checkpoint {source}")
            check_finite(name, tensor, file)
            seen.add(name)
            param_name, shard = name.replace(A_LOG, A_PARAM), None
            for ckpt_piece, param_piece, shard_id in STACKED_PARAMS:
                if ckpt_piece in name:
                    param_name, shard = name.replace(ckpt_piece, param_piece), shard_id
                    break
            param = params[param_name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard)
            loaded.add(param_name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise ValueError(f"Checkpoint {source} lacks {len(missing)} tensor(s): "
                             f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        return loaded
