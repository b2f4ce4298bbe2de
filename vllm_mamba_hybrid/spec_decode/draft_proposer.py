"""A draft-model proposer for hybrid targets, through vLLM's ``custom_class`` hook.

vLLM's ``draft_model`` method places the draft's attention layers into the
target's KV-cache groups, which a hybrid target's Mamba groups break
(PITFALLS.md). This proposer keeps the draft entirely outside vLLM: it runs the
project's reference model (``LlamaMambaHybridForCausalLM``; a plain Llama draft
goes through ``runtime.as_hybrid``) with its own per-sequence ``HybridCache``.

Use::

    VLLM_MAMBA_HYBRID_DRAFT=/path/to/draft  # Llama or hybrid dir, target's vocabulary
    LLM(target, speculative_config={
        "method": "custom_class",
        "model": "vllm_mamba_hybrid.spec_decode.HybridDraftProposer",
        "num_speculative_tokens": 4})

vLLM hands ``propose`` each batch row's tokens but no request ids, so the draft
state is keyed by token prefix: a state is a function of the tokens it consumed.
After drafting d1..dk from context c, the states after c, c+d1, ..., c+d1..d(k-1)
are kept as snapshots (cheap: the reference cache *replaces* its tensors on
every forward, so a snapshot is a shallow copy). Next step the row's context is
c + accepted drafts + the target's token, so the longest snapshot that prefixes
it is the rollback point; only the rest (usually one token) is fed. Rows with no
snapshot (new, preempted, evicted) are prefilled from scratch. Snapshots unused
for two calls are dropped, so finished requests free their memory.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm.logger import init_logger

logger = init_logger(__name__)

DRAFT_ENV = "VLLM_MAMBA_HYBRID_DRAFT"
# Snapshots not touched for this many propose calls are dropped.
_KEEP_CALLS = 2


def load_draft_model(path: str | os.PathLike, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32):
    """A Llama or hybrid checkpoint as a reference ``LlamaMambaHybridForCausalLM``."""
    from vllm_mamba_hybrid import LlamaMambaHybridConfig, LlamaMambaHybridForCausalLM

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if model_type == LlamaMambaHybridConfig.model_type:
        model = LlamaMambaHybridForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        from vllm_mamba_hybrid.runtime.decoder import as_hybrid
        model = as_hybrid(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    return model.to(device).eval()


@dataclass
class _Snapshot:
    cache: object  # HybridCache after consuming the key's tokens
    next_token: int  # the draft's greedy token after them
    last_call: int


def _copy_cache(cache):
    """Shallow copy: later forwards on either copy replace tensors, never write them."""
    out = copy.copy(cache)
    out.layers = [copy.copy(entry) for entry in cache.layers]
    return out


class HybridDraftProposer:
    """Greedy draft of up to k tokens per request from a small model (see module doc)."""

    def __init__(self, vllm_config, draft_path: str | os.PathLike | None = None):
        spec = vllm_config.speculative_config
        self.k = spec.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.target_vocab = vllm_config.model_config.get_vocab_size()
        self.draft_path = draft_path or os.environ.get(DRAFT_ENV)
        if not self.draft_path:
            raise ValueError(f"HybridDraftProposer needs the draft model directory in ${DRAFT_ENV}")
        self.device = torch.device(
            "cuda" if vllm_config.device_config.device_type == "cuda" else "cpu")
        self.model = None
        self._snaps: dict[bytes, _Snapshot] = {}
        self._calls = 0

    def load_model(self, target_model=None) -> None:
        """Called by vLLM's model runner; the target model is not used."""
        if self.model is not None:
            return
        self.model = load_draft_model(self.draft_path, self.device)
        vocab = self.model.config.vocab_size
        if vocab > self.target_vocab:
            raise ValueError(f"draft {self.draft_path} has a vocabulary of {vocab} tokens, "
                             f"the target {self.target_vocab}: they must share a tokenizer")
        logger.info("HybridDraftProposer: draft %s (%d layers), k=%d", self.draft_path,
                    self.model.config.num_hidden_layers, self.k)

    @torch.inference_mode()
    def _feed(self, cache, ids) -> int:
        logits = self.model(input_ids=torch.tensor([ids], device=self.device),
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    def _keep(self, tokens: np.ndarray, cache, next_token: int) -> None:
        self._snaps[tokens.tobytes()] = _Snapshot(_copy_cache(cache), next_token, self._calls)

    def _resume(self, ctx: np.ndarray):
        """(cache after ctx, draft's next token), from the longest snapshot prefixing ctx."""
        from vllm_mamba_hybrid.modeling import HybridCache

        n = len(ctx)
        for m in range(n, max(0, n - self.k - 2), -1):
            snap = self._snaps.get(ctx[:m].tobytes())
            if snap is None:
                continue
            snap.last_call = self._calls
            cache = _copy_cache(snap.cache)
            if m == n:
                return cache, snap.next_token
            return cache, self._feed(cache, ctx[m:].tolist())
        cache = HybridCache(self.model.config)
        return cache, self._feed(cache, ctx.tolist())

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **kwargs) -> list[list[int]]:
        """Up to k greedy draft tokens per batch row ([] where a row gets none)."""
        if self.model is None:
            self.load_model()
        self._calls += 1
        drafts: list[list[int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            budget = min(self.k, self.max_model_len - n)
            if len(sampled) == 0 or budget <= 0:  # mid-prefill chunk, or at max length
                drafts.append([])
                continue
            ctx = np.ascontiguousarray(token_ids_cpu[i, :n])
            cache, token = self._resume(ctx)
            self._keep(ctx, cache, token)
            row = [token]
            while len(row) < budget:
                token = self._feed(cache, [token])
                self._keep(np.concatenate([ctx, np.asarray(row, dtype=ctx.dtype)]), cache, token)
                row.append(token)
            drafts.append(row)
        stale = [key for key, s in self._snaps.items() if s.last_call <= self._calls - _KEEP_CALLS]
        for key in stale:
            del self._snaps[key]
        return drafts
