"""The Mamba metadata the mixers read: vLLM's Mamba2 backend, except that a new prompt of
one token runs as a decode from a zeroed state block.

Why: vLLM picks a full CUDA graph by the batch's shape alone, so a step whose requests
all have one token (a new one-token prompt alone, or beside decodes) replays the captured
decode graph. vLLM's Mamba builder keeps such a prompt a prefill (it has no state yet),
and then leaves the graph's state-index buffer as the previous step left it: the captured
decode kernels read and write some other block, and the prompt's first token comes out
wrong (the H100, vLLM 0.26, graph mode, 2026-12-07: the 1-token prompt of
tests/model_executor/test_vllm_engine.py). As a decode from a zeroed block the row gives
the prefill's result exactly (one token after no history: the conv sees zeros, the SSM
state starts at zero), and its block index is where the graph reads it. Eager steps take
the same path, so the CPU engine tests it.

Not with speculative decoding: there the decode graphs are captured for 1 + k tokens per
request, which a one-token prompt never matches.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.mamba2_attn import (
    Mamba2AttentionBackend,
    Mamba2AttentionMetadataBuilder,
)


def first_token_rows(common_attn_metadata) -> list[int]:
    """Rows of requests whose whole prompt so far is the one token scheduled now."""
    md = common_attn_metadata
    if md.is_prefilling is None or md.seq_lens_cpu_upper_bound is None:
        return []   # dummy / capture batches
    num_reqs = md.num_reqs
    query_lens = torch.diff(md.query_start_loc_cpu[:num_reqs + 1])
    rows = (md.is_prefilling[:num_reqs] & (query_lens == 1)
            & (md.seq_lens_cpu_upper_bound[:num_reqs] == 1))
    return rows.nonzero().flatten().tolist()


class HybridMamba2MetadataBuilder(Mamba2AttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False, **kwargs):
        rows = first_token_rows(common_attn_metadata) if self.num_spec_tokens == 0 else []
        if rows:
            self._zero_state_blocks(common_attn_metadata.block_table_tensor[rows, 0])
            is_prefilling = common_attn_metadata.is_prefilling.clone()
            is_prefilling[rows] = False
            common_attn_metadata = common_attn_metadata.replace(is_prefilling=is_prefilling)
        return super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)

    def _zero_state_blocks(self, blocks: torch.Tensor) -> None:
        """Conv and SSM state of ``blocks`` in every layer this builder serves."""
        layers = self.vllm_config.compilation_config.static_forward_context
        for name in self.layer_names:
            for state in layers[name].kv_cache:
                state[blocks] = 0


class HybridMamba2Backend(Mamba2AttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[HybridMamba2MetadataBuilder]:
        return HybridMamba2MetadataBuilder
