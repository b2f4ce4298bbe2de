"""Fast generation runtime: static cache, CUDA-graph decode step, speculative decoding.

``fast_generate(model, input_ids, attention_mask, max_new_tokens, ...)`` is the
entry point; it takes a LlamaMambaHybridForCausalLM or a plain Llama teacher.
"""
from .decoder import FastGenerator
from .generate import fast_generate
from .speculative import SpeculativeGenerator
from .static_cache import StaticHybridCache, bytes_per_sequence

__all__ = ["FastGenerator", "SpeculativeGenerator", "StaticHybridCache", "bytes_per_sequence",
           "fast_generate"]
