"""The Mamba metadata the mixers read: vLLM's Mamba2 backend, with four guards for what
vLLM's runner does around CUDA graphs and speculative decoding.

1. A new prompt of one token runs as a decode from a zeroed state block. vLLM picks a full
   CUDA graph by the batch's shape alone, so a step whose requests all have one token (a
   new one-token prompt alone, or beside decodes) replays the captured decode graph.
   vLLM's Mamba builder keeps such a prompt a prefill (it has no state yet) and then
   leaves the graph's state-index buffer as the previous step left it: the captured decode
   kernels read and write some other block, and the prompt's first token comes out wrong
   (the H100, vLLM 0.26, graph mode, 2026-12-07). As a decode from a zeroed block the row
   gives the prefill's result exactly (the conv sees zeros, the SSM state starts at zero),
   and its index is where the graph reads it. Eager steps take the same path, so the CPU
   engine tests it. A hybrid with more Mamba than attention layers has several Mamba
   KV-cache groups, and vLLM derives the second group's metadata from the first's
   (``update_block_table``, no ``build``): that is where each further group zeroes its own
   blocks of those rows, or their state would be whatever the blocks last held.
2. With speculative decoding the decode graphs hold 1 + k tokens a request, and a prompt
   chunk of 1 + k tokens matches that shape just as well: replayed as a decode it would
   never run its prefill. No guard like (1) can turn a chunk of several tokens into a
   decode (the next step would resume from its first token's state), so with speculation
   the builder reports full graphs for single-token decodes only, and vLLM captures
   piecewise graphs instead: the mixers run outside the graphs, on each step's metadata.
3. vLLM 0.26 hands the builder the accepted-token counts only on steps where some request
   has drafts (0.32 on every step; vLLM PR #52942 describes the gap). After a step that
   accepted drafts, a step without any (an n-gram proposer that found no match for
   anyone) would then read the state after the first accepted token instead of the last.
   The builder keeps the runner's counts buffer from the steps that pass it and reads the
   current counts there on steps that do not; the runner refreshes that buffer every step.
4. A request resumed after preemption recomputes its prompt and outputs; the last chunk,
   past the prompt, is not "prefilling" to vLLM, so one of 2..1+k tokens becomes a decode
   row without drafts. The speculative kernels store the state after its token t in block
   column t, but the next step's count is 1 (nothing was accepted), so it would resume
   from the state after the chunk's first token (vLLM 0.26 and 0.32 alike; reproduced on
   the CPU engine). The builder marks such rows (``undrafted_rows``) and the mixers move
   their last token's state to column 0 (``ssm_ops.keep_last_token_state``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.mamba2_attn import (
    Mamba2AttentionBackend,
    Mamba2AttentionMetadata,
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


@dataclass
class HybridMamba2Metadata(Mamba2AttentionMetadata):
    # (1): rows of new one-token prompts run as decodes from zeroed state blocks.
    first_token_rows: list[int] | None = None
    # (4): decode rows that ran several tokens without drafts, and their token counts.
    undrafted_rows: torch.Tensor | None = None
    undrafted_lens: torch.Tensor | None = None


def undrafted_rows(query_start_loc_cpu: torch.Tensor, num_decodes: int,
                   draft_counts_cpu: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, their token counts): decode rows with more than one token that are not a
    token plus its drafts (vLLM marks a row's drafts in ``num_decode_draft_tokens_cpu``,
    -1 for none; 0.26 passes no counts at all on a step without drafts)."""
    query_lens = torch.diff(query_start_loc_cpu[:num_decodes + 1])
    drafted = (torch.zeros_like(query_lens, dtype=torch.bool) if draft_counts_cpu is None
               else draft_counts_cpu[:num_decodes] == query_lens - 1)
    rows = ((query_lens > 1) & ~drafted).nonzero().flatten()
    return rows, query_lens[rows]


class HybridMamba2MetadataBuilder(Mamba2AttentionMetadataBuilder):
    metadata_cls = HybridMamba2Metadata
    # (3): the runner's persistent accepted-counts buffer, once a step has passed a view of it.
    _accepted_buffer: torch.Tensor | None = None

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        if vllm_config.num_speculative_tokens > 0:   # (2)
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False, **kwargs):
        if self.num_spec_tokens == 0:
            rows = first_token_rows(common_attn_metadata)
            if rows:
                common_attn_metadata = self._first_tokens_as_decodes(common_attn_metadata, rows)
            md = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
            return replace(md, first_token_rows=rows) if rows else md
        kwargs = self._with_accepted_counts(common_attn_metadata, kwargs)
        md = super().build(common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        if md.num_decodes == 0 or md.num_accepted_tokens is None:   # no speculative rows
            return md
        rows, lens = undrafted_rows(common_attn_metadata.query_start_loc_cpu, md.num_decodes,
                                    kwargs.get("num_decode_draft_tokens_cpu"))
        if rows.numel() == 0:   # (4)
            return md
        device = md.num_accepted_tokens.device
        return replace(md, undrafted_rows=rows.to(device), undrafted_lens=lens.to(device))

    def update_block_table(self, metadata, blk_table, slot_mapping):   # (1), further groups
        if metadata.first_token_rows:
            self._zero_state_blocks(blk_table[metadata.first_token_rows, 0])
        return super().update_block_table(metadata, blk_table, slot_mapping)

    def _first_tokens_as_decodes(self, common_attn_metadata, rows: list[int]):   # (1)
        self._zero_state_blocks(common_attn_metadata.block_table_tensor[rows, 0])
        is_prefilling = common_attn_metadata.is_prefilling.clone()
        is_prefilling[rows] = False
        return common_attn_metadata.replace(is_prefilling=is_prefilling)

    def _with_accepted_counts(self, common_attn_metadata, kwargs: dict) -> dict:   # (3)
        accepted = kwargs.get("num_accepted_tokens")
        if accepted is not None:
            if accepted._base is not None:   # a view of the runner's buffer, not a capture's own
                self._accepted_buffer = accepted._base
            return kwargs
        if self._accepted_buffer is None:    # no step had drafts yet: every count is 1
            return kwargs
        return {**kwargs,
                "num_accepted_tokens": self._accepted_buffer[:common_attn_metadata.num_reqs]}

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
