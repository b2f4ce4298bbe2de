"""Speculative decoding for hybrid targets served by vLLM.

* ``HybridDraftProposer``: a draft model (small Llama or hybrid sharing the
  target's tokenizer) for vLLM's ``custom_class`` hook; vLLM's own
  ``draft_model`` method cannot run beside a hybrid target.
* ``draft_vocab``: a draft's head cut to the target's commonest tokens
  (``draft_vocab.json``; a cheaper draft step, same outputs).
* ``spec_decode_metrics``: acceptance rate and mean accepted length of an engine.

n-gram speculation needs nothing from here: ``{"method": "ngram", ...}``.
"""
from vllm_mamba_hybrid.spec_decode.metrics import spec_decode_metrics

__all__ = ["HybridDraftProposer", "spec_decode_metrics"]


def __getattr__(name):
    # Lazy: importing the proposer pulls in torch/transformers model code.
    if name == "HybridDraftProposer":
        from vllm_mamba_hybrid.spec_decode.draft_proposer import HybridDraftProposer
        return HybridDraftProposer
    raise AttributeError(name)
