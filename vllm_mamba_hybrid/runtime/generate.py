"""``fast_generate``: the runtime's drop-in for the reference ``generate``."""
from __future__ import annotations

import weakref

import torch

from .decoder import FastGenerator
from .speculative import SpeculativeGenerator

_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fast_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  max_new_tokens: int = 20, *, draft_model=None, num_draft_tokens: int = 4,
                  draft_token_ids: torch.Tensor | None = None,
                  use_cuda_graph: bool | None = None, use_triton: bool | None = None, **kwargs):
    """Drop-in for ``model.generate`` (greedy or sampling; speculative with ``draft_model``,
    whose head ``draft_token_ids`` may cut: `spec_decode.draft_vocab`).

    The generator (static cache + captured graphs) is kept per model for the last
    (batch, length bucket) used, so repeated calls of one shape reuse it.
    """
    b, width = input_ids.shape
    max_len = -(-(width + max_new_tokens + num_draft_tokens + 2) // 256) * 256
    key = (b, max_len, draft_model is not None and id(draft_model), num_draft_tokens, use_cuda_graph,
           use_triton, None if draft_token_ids is None else tuple(draft_token_ids.tolist()))
    cached = _GENERATORS.get(model)
    if cached is None or cached[0] != key:
        if draft_model is None:
            gen = FastGenerator(model, b, max_len, use_cuda_graph=use_cuda_graph, use_triton=use_triton)
        else:
            gen = SpeculativeGenerator(model, draft_model, b, max_len, num_draft_tokens=num_draft_tokens,
                                       use_cuda_graph=use_cuda_graph, use_triton=use_triton,
                                       draft_token_ids=draft_token_ids)
        _GENERATORS[model] = cached = (key, gen)
    return cached[1].generate(input_ids, attention_mask, max_new_tokens, **kwargs)
