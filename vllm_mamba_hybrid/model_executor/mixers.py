"""Mamba mixers of "The Mamba in the Llama" hybrids for vLLM's V1 engine.

Both mixers keep their conv and SSM state in vLLM's paged Mamba cache
(``MambaBase``) and run conv + scan inside a registered custom op, as vLLM's
own mixers do, so torch.compile / CUDA graphs split the model there. Both use
the Mamba2-type metadata builder and one state layout,
``conv: (d_conv-1, conv_dim)`` (vLLM's SD/DS orientation) and
``ssm: (d_inner // d_state, d_state, d_state)`` float32 by default:

* Mamba2: one SSM head per attention head, headdim = d_state.
* Mamba1: channel c is row c % d_state of "head" c // d_state, which is the
  group whose B and C it reads, so the SSU kernels' head/group mapping holds.

Tokens arrive decode rows first, then prefill rows (vLLM V1 ordering); a new prompt of
one token arrives as a decode row with a zeroed state (``mamba_metadata``). With
speculative decoding a decode row holds 1+k candidate tokens; the conv state is
widened by k columns and every candidate gets its own SSM state block, as for
vLLM's own Mamba2 mixer (``ssm_ops.SpecDecode``).
"""
from __future__ import annotations

import torch
from torch import nn

from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import CacheConfig, ModelConfig, get_current_vllm_config
from vllm.distributed import divide, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_mixer2 import Mixer2RMSNormGated
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateDtypeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn
from vllm.model_executor.layers.mamba.ops.ssd_combined import (
    mamba_chunk_scan_combined_varlen,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.model_loader.weight_utils import (
    composed_weight_loader,
    sharded_weight_loader,
)
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    _resolve_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from vllm_mamba_hybrid.config import LlamaMambaHybridConfig
from vllm_mamba_hybrid.layout import (
    check_tensor_parallel_size,
    mamba1_projections,
    mamba2_conv_channels,
    mamba2_in_proj,
    mamba2_in_proj_parts,
    shard_sizes,
)
from vllm_mamba_hybrid.model_executor.mamba_metadata import (
    HybridMamba2Backend,
    HybridMamba2Metadata,
)
from vllm_mamba_hybrid.model_executor.ssm_ops import (
    SpecDecode,
    conv_update,
    keep_last_token_state,
    mamba1_prefill_scan,
    ssm_update,
)
from vllm_mamba_hybrid.model_executor.vllm_compat import conv_state_shape

def mamba_state_shapes(
    config: LlamaMambaHybridConfig, tp_size: int, num_spec: int = 0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(conv_state, ssm_state) shapes of one layer's cache block; the conv state
    keeps ``num_spec`` extra columns so a verify step can roll back by choosing
    its start column (vLLM's convention)."""
    conv_shape = conv_state_shape(config.conv_dim, config.d_conv, tp_size, num_spec)
    heads = divide(config.d_inner // config.d_state, tp_size)
    return conv_shape, (heads, config.d_state, config.d_state)


def mamba_state_dtypes(model_config: ModelConfig, cache_config: CacheConfig):
    """(conv_state, ssm_state) dtypes; the engine-config hook makes "auto" SSM float32."""
    return MambaStateDtypeCalculator.mamba2_state_dtype(
        model_config.dtype, cache_config.mamba_cache_dtype, cache_config.mamba_ssm_cache_dtype
    )


def _a_log_loader():
    """A = -exp(A_log), applied exactly once, when the checkpoint tensor is loaded."""
    return composed_weight_loader(sharded_weight_loader(0), lambda a: -torch.exp(a.float()))


class _HybridMambaMixer(MambaBase, nn.Module):
    """Cache plumbing shared by both variants."""

    def __init__(self, config: LlamaMambaHybridConfig, model_config: ModelConfig | None,
                 cache_config: CacheConfig | None, prefix: str):
        super().__init__()
        self.config = config
        self.model_config = model_config
        self.cache_config = cache_config
        self.prefix = prefix
        self.tp_size = get_tensor_model_parallel_world_size()
        check_tensor_parallel_size(config, self.tp_size)
        self.d_state = config.d_state
        self.d_inner = divide(config.d_inner, self.tp_size)
        self.nheads = self.d_inner // self.d_state
        self.repeat_group = config.repeat_group
        self.conv_dim = divide(config.conv_dim, self.tp_size)
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        vllm_config = get_current_vllm_config()
        self.num_spec = vllm_config.num_speculative_tokens

        compilation_config = vllm_config.compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self

    def _make_conv1d(self, output_sizes: list[int]) -> None:
        # vLLM's convention: the depthwise conv as a linear layer whose weight is
        # viewed as (dim, 1, width) to match the checkpoint's Conv1d shape. The kernels
        # read a (dim, width) view taken now: after loading, vLLM's CPU linear method
        # may replace conv1d.weight by a repacked GEMM weight.
        self.conv1d = MergedColumnParallelLinear(
            input_size=self.config.d_conv, output_sizes=output_sizes,
            bias=self.config.conv_bias, prefix=f"{self.prefix}.conv1d")
        self.conv1d.weight.data = self.conv1d.weight.data.unsqueeze(1)
        self.register_buffer("conv_weights", self.conv1d.weight.view(
            self.conv1d.weight.size(0), self.conv1d.weight.size(2)), persistent=False)

    def _repeat_groups(self, t: torch.Tensor) -> torch.Tensor:
        """(tokens, kv_groups * d_state) -> (tokens, heads, d_state), GQA-style."""
        groups = t.view(t.shape[0], -1, self.d_state)
        return groups.repeat_interleave(self.repeat_group, dim=1)

    def _metadata(self) -> HybridMamba2Metadata | None:
        attn_metadata = get_forward_context().attn_metadata
        if attn_metadata is None:
            return None  # profile run
        assert isinstance(attn_metadata, dict)
        return attn_metadata.get(self.prefix)

    @staticmethod
    def _spec(md: HybridMamba2Metadata) -> SpecDecode | None:
        """The decode rows' speculative metadata, None without speculation."""
        if md.num_accepted_tokens is None:
            return None
        return SpecDecode(md.state_indices_tensor_d, md.num_accepted_tokens,
                          md.query_start_loc_d)

    @staticmethod
    def _keep_undrafted_rows(md: HybridMamba2Metadata, spec: SpecDecode | None,
                             conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Recompute chunks that ran as decode rows without drafts resume from their last
        token (mamba_metadata.py, guard 4)."""
        if spec is not None and md.undrafted_rows is not None:
            keep_last_token_state(conv_state, ssm_state, spec, md.undrafted_rows,
                                  md.undrafted_lens)

    def _states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv_state as (blocks, dim, width-1), ssm_state) views of the cache."""
        conv_state = self.kv_cache[0]
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        return conv_state, self.kv_cache[1]

    def _conv_prefill(self, x: torch.Tensor, md: HybridMamba2Metadata,
                      conv_state: torch.Tensor) -> torch.Tensor:
        return causal_conv1d_fn(
            x.transpose(0, 1), self.conv_weights, self.conv1d.bias, activation="silu",
            conv_states=conv_state, has_initial_state=md.has_initial_states_p,
            cache_indices=md.state_indices_tensor_p, query_start_loc=md.query_start_loc_p,
            metadata=md,
        ).transpose(0, 1)

    # ---- MambaBase ----------------------------------------------------------------
    def get_state_shape(self):
        return mamba_state_shapes(self.config, self.tp_size, self.num_spec)

    def get_state_dtype(self):
        assert self.model_config is not None and self.cache_config is not None
        return mamba_state_dtypes(self.model_config, self.cache_config)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.MAMBA2

    def get_attn_backend(self):
        return HybridMamba2Backend   # vLLM's, with one-token prompts as decodes (see there)


class Mamba2Mixer(_HybridMambaMixer):
    """Mamba2InLlama (``layout.mamba2_in_proj``): in_proj -> [z | x | B | C | dt], conv
    over x||B||C, SSD scan with x/B repeated to all heads, gated per-head RMSNorm, out_proj."""

    def __init__(self, config: LlamaMambaHybridConfig, model_config: ModelConfig | None = None,
                 cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__(config, model_config, cache_config, prefix)
        nheads = config.mamba_nheads
        self.in_proj = MergedColumnParallelLinear(
            config.hidden_size, list(mamba2_in_proj(config).values()),
            bias=False, quant_config=quant_config, prefix=f"{prefix}.in_proj")
        self._make_conv1d(list(mamba2_conv_channels(config).values()))
        self.in_proj_parts = shard_sizes(mamba2_in_proj_parts(config), self.tp_size)
        self.conv_channels = shard_sizes(mamba2_conv_channels(config), self.tp_size)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, dtype=torch.float32))
        self.A = nn.Parameter(torch.empty(self.nheads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.nheads, dtype=torch.float32))
        set_weight_attrs(self.dt_bias, {"weight_loader": sharded_weight_loader(0)})
        set_weight_attrs(self.D, {"weight_loader": sharded_weight_loader(0)})
        set_weight_attrs(self.A, {"weight_loader": _a_log_loader()})
        self.norm = Mixer2RMSNormGated(config.d_inner, nheads, eps=config.mamba_norm_eps)
        self.out_proj = RowParallelLinear(
            config.d_inner, config.hidden_size, bias=False, input_is_parallel=True,
            quant_config=quant_config, prefix=f"{prefix}.out_proj")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        zxbcdt, _ = self.in_proj(hidden_states)
        ssm_out = torch.empty(hidden_states.shape[0], self.d_inner,
                              dtype=hidden_states.dtype, device=hidden_states.device)
        torch.ops.vllm.llama_hybrid_mamba2_mixer(zxbcdt, ssm_out, _encode_layer_name(self.prefix))
        z = zxbcdt[:, : self.in_proj_parts[0]]
        y = self.norm(ssm_out, z)
        out, _ = self.out_proj(y)
        return out

    def _split_xbc(self, xbc: torch.Tensor):
        x, B, C = torch.split(xbc, self.conv_channels, dim=-1)
        return (self._repeat_groups(x), self._repeat_groups(B),
                C.reshape(C.shape[0], self.nheads, self.d_state))

    def conv_ssm_forward(self, zxbcdt: torch.Tensor, output: torch.Tensor) -> None:
        """Conv + SSM for all tokens; writes y = C.h + D*x (pre-norm) into output."""
        md = self._metadata()
        if md is None:
            output.zero_()
            return
        _, xbc, dt = torch.split(zxbcdt, self.in_proj_parts, dim=-1)
        conv_state, ssm_state = self._states()
        nd = md.num_decode_tokens
        end = nd + md.num_prefill_tokens
        p = self.d_state

        if md.num_prefills > 0:
            x, B, C = self._split_xbc(self._conv_prefill(xbc[nd:end], md, conv_state))
            initial_states = None
            if md.prep_initial_states:
                initial_states = torch.where(
                    md.has_initial_states_p[:, None, None, None],
                    ssm_state[md.state_indices_tensor_p], 0)
            final_states = mamba_chunk_scan_combined_varlen(
                x, dt[nd:end], self.A, B, C, chunk_size=md.chunk_size,
                cu_seqlens=md.query_start_loc_p, cu_chunk_seqlens=md.cu_chunk_seqlen_p,
                last_chunk_indices=md.last_chunk_indices_p, seq_idx=md.seq_idx_p,
                out=output[nd:end].view(-1, self.nheads, p), D=self.D, z=None,
                dt_bias=self.dt_bias, initial_states=initial_states, dt_softplus=True,
                state_dtype=ssm_state.dtype)
            ssm_state[md.state_indices_tensor_p] = final_states

        if md.num_decodes > 0:
            idx, spec = md.state_indices_tensor_d[:, 0], self._spec(md)
            x, B, C = self._split_xbc(conv_update(
                xbc[:nd], conv_state, self.conv_weights, self.conv1d.bias, idx, spec))
            ssm_update(
                ssm_state, x, dt[:nd, :, None].expand(-1, -1, p),
                self.A[:, None, None].expand(-1, p, p), B, C,
                self.D[:, None].expand(-1, p), self.dt_bias[:, None].expand(-1, p),
                None, idx, output[:nd].view(nd, self.nheads, p), per_head_params=True,
                spec=spec)
            self._keep_undrafted_rows(md, spec, conv_state, ssm_state)


class Mamba1Mixer(_HybridMambaMixer):
    """MambaInLlama: x/z/B/C/dt projections, x repeated per d_state group (before
    or after the conv), selective scan with the dt bias applied twice, y gated by
    silu(z), out_proj."""

    def __init__(self, config: LlamaMambaHybridConfig, model_config: ModelConfig | None = None,
                 cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__(config, model_config, cache_config, prefix)
        # in_proj_x, in_proj_z, B_proj, C_proj stacked into one GEMM (layout.STACKED_PARAMS).
        self.in_proj = MergedColumnParallelLinear(
            config.hidden_size, list(mamba1_projections(config).values()),
            bias=False, quant_config=quant_config, prefix=f"{prefix}.in_proj")
        self.in_proj_parts = shard_sizes(mamba1_projections(config), self.tp_size)
        self.dt_proj_down = ReplicatedLinear(
            config.hidden_size, config.dt_rank, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.dt_proj_down")
        # Bias added here (first time); the scan adds it again (checkpoints rely on it).
        self.dt_proj = ColumnParallelLinear(
            config.dt_rank, config.d_inner, bias=True, quant_config=quant_config,
            prefix=f"{prefix}.dt_proj")
        self._make_conv1d([config.conv_dim])
        self.A = nn.Parameter(torch.empty(self.d_inner, self.d_state, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, dtype=torch.float32))
        set_weight_attrs(self.D, {"weight_loader": sharded_weight_loader(0)})
        set_weight_attrs(self.A, {"weight_loader": _a_log_loader()})
        self.out_proj = RowParallelLinear(
            config.d_inner, config.hidden_size, bias=False, input_is_parallel=True,
            quant_config=quant_config, prefix=f"{prefix}.out_proj")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj, _ = self.in_proj(hidden_states)
        dt, _ = self.dt_proj(self.dt_proj_down(hidden_states)[0])
        ssm_out = torch.empty(hidden_states.shape[0], self.d_inner,
                              dtype=hidden_states.dtype, device=hidden_states.device)
        torch.ops.vllm.llama_hybrid_mamba1_mixer(proj, dt, ssm_out,
                                                 _encode_layer_name(self.prefix))
        out, _ = self.out_proj(ssm_out)
        return out

    def _repeat_x(self, x: torch.Tensor, before_conv: bool) -> torch.Tensor:
        if before_conv != self.config.repeat_kv_before_conv:
            return x
        return self._repeat_groups(x).reshape(x.shape[0], self.d_inner)

    def conv_ssm_forward(self, proj: torch.Tensor, dt: torch.Tensor,
                         output: torch.Tensor) -> None:
        """Conv + SSM for all tokens; writes y = (C.h + D*x) * silu(z) into output."""
        md = self._metadata()
        if md is None:
            output.zero_()
            return
        x, z, B, C = torch.split(proj, self.in_proj_parts, dim=-1)
        x = self._repeat_x(x, before_conv=True)
        conv_state, ssm_state = self._states()
        nd = md.num_decode_tokens
        end = nd + md.num_prefill_tokens
        n = self.d_state
        dt_bias = self.dt_proj.bias

        if md.num_prefills > 0:
            xc = self._repeat_x(self._conv_prefill(x[nd:end], md, conv_state), before_conv=False)
            c_p = C[nd:end]
            output[nd:end] = mamba1_prefill_scan(
                xc, dt[nd:end], self.A, self._repeat_groups(B[nd:end]),
                c_p.reshape(c_p.shape[0], self.nheads, n), self.D, z[nd:end], dt_bias,
                ssm_state, md.query_start_loc_p, md.state_indices_tensor_p,
                md.has_initial_states_p)

        if md.num_decodes > 0:
            idx, spec = md.state_indices_tensor_d[:, 0], self._spec(md)
            xc = conv_update(x[:nd], conv_state, self.conv_weights, self.conv1d.bias, idx, spec)
            xc = self._repeat_x(xc, before_conv=False)
            heads = (nd, self.nheads, n)
            ssm_update(
                ssm_state, xc.view(heads), dt[:nd].reshape(heads), self.A.view(-1, n, n),
                self._repeat_groups(B[:nd]), C[:nd].reshape(heads), self.D.view(-1, n),
                dt_bias.view(-1, n), z[:nd].reshape(heads), idx, output[:nd].view(heads),
                per_head_params=False, spec=spec)
            self._keep_undrafted_rows(md, spec, conv_state, ssm_state)


def _layer(layer_name: LayerNameType):
    return get_forward_context().no_compile_layers[_resolve_layer_name(layer_name)]


@eager_break_during_capture
def llama_hybrid_mamba2_mixer(zxbcdt: torch.Tensor, output: torch.Tensor,
                              layer_name: LayerNameType) -> None:
    _layer(layer_name).conv_ssm_forward(zxbcdt, output)


@eager_break_during_capture
def llama_hybrid_mamba1_mixer(proj: torch.Tensor, dt: torch.Tensor, output: torch.Tensor,
                              layer_name: LayerNameType) -> None:
    _layer(layer_name).conv_ssm_forward(proj, dt, output)


direct_register_custom_op(
    op_name="llama_hybrid_mamba2_mixer", op_func=llama_hybrid_mamba2_mixer,
    mutates_args=["output"])
direct_register_custom_op(
    op_name="llama_hybrid_mamba1_mixer", op_func=llama_hybrid_mamba1_mixer,
    mutates_args=["output"])
