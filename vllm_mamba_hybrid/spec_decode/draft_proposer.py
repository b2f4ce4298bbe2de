"""A draft-model proposer for hybrid targets, through vLLM's ``custom_class`` hook.

vLLM's ``draft_model`` method places the draft's attention layers into the
target's KV-cache groups, which a hybrid target's Mamba groups break
(PITFALLS.md). This proposer keeps the draft entirely outside vLLM: it runs the
project's reference model (``LlamaMambaHybridForCausalLM``; a plain Llama draft
goes through ``conversion.init.as_hybrid``) with its own per-sequence ``HybridCache``.

Use::

    VLLM_MAMBA_HYBRID_DRAFT=/path/to/draft  # Llama or hybrid dir, target's vocabulary
    LLM(target, speculative_config={
        "method": "custom_class",
        "model": "vllm_mamba_hybrid.spec_decode.HybridDraftProposer",
        "num_speculative_tokens": 4})

vLLM hands ``propose`` each batch row's tokens but no request ids, so the draft
state is keyed by token prefix: a state is a function of the tokens it consumed.
A propose call feeds every row's last token and then its own drafts, k + 1 single-
token steps run as ONE left-padded batch over all rows (each row at its own
position); after each step the row's state is kept as a snapshot keyed by the
tokens it has consumed (cheap: views, since the reference cache *replaces* its
tensors on every forward). The next call's context of a row is its old context +
the accepted drafts + the target's token, so the snapshot of the context minus its
last token is always there (the (k+1)-th step exists for the all-accepted case);
only rows without one (new, preempted, evicted) are prefilled, one at a time.
Snapshots unused for two calls are dropped, so finished requests free their memory.

A draft directory with a ``draft_vocab.json`` (``mamba-hybrid draft-vocab``) is run
with its head cut to those tokens (`draft_vocab`): a cheaper step, same outputs.

vLLM's batch-size schedule (``num_speculative_tokens_per_batch_size``, e.g.
``[[1, 2, 4], [3, 3, 0]]``: k = 4 up to 2 requests, none from 3 on) reaches only vLLM's
own proposers, so this one applies it itself: k for the number of requests in the
call's batch, and no draft forward at all where that is 0 (drafts cost more than they
save once the cores are busy; speculation's fixed costs stay: README, "Speculation by
batch size").
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np
import torch

from vllm.logger import init_logger

from vllm_mamba_hybrid.spec_decode.draft_vocab import cut_head, load_draft_vocab

logger = init_logger(__name__)

DRAFT_ENV = "VLLM_MAMBA_HYBRID_DRAFT"
# Snapshots not touched for this many propose calls are dropped.
_KEEP_CALLS = 2


def load_draft_model(path: str | os.PathLike, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32):
    """A Llama or hybrid checkpoint as a reference ``LlamaMambaHybridForCausalLM``."""
    from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM
    from vllm_mamba_hybrid.checkpoint import load_causal_lm

    model = load_causal_lm(path, dtype)
    if not isinstance(model, LlamaMambaHybridForCausalLM):
        from vllm_mamba_hybrid.conversion.init import as_hybrid
        model = as_hybrid(model)
    return model.to(device).eval()


@dataclass
class _Snapshot:
    cache: object  # HybridCache after consuming the key's tokens
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
        self._k_by_batch_size = None  # lookup[number of requests] -> k
        if spec.num_speculative_tokens_per_batch_size:
            from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup
            self._k_by_batch_size = build_dynamic_sd_schedule_lookup(
                spec.num_speculative_tokens_per_batch_size,
                vllm_config.scheduler_config.max_num_seqs, self.k)
        self.max_model_len = vllm_config.model_config.max_model_len
        self.target_vocab = vllm_config.model_config.get_vocab_size()
        self.draft_path = draft_path or os.environ.get(DRAFT_ENV)
        if not self.draft_path:
            raise ValueError(f"HybridDraftProposer needs the draft model directory in ${DRAFT_ENV}")
        self.device = torch.device(
            "cuda" if vllm_config.device_config.device_type == "cuda" else "cpu")
        self.model = None
        self._token_ids = None  # a cut head's token ids (draft_vocab.json), or None
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
        self._token_ids = load_draft_vocab(self.draft_path, self.model.lm_head.out_features)
        if self._token_ids is not None:
            self.model.lm_head = cut_head(self.model.lm_head, self._token_ids)
            self._token_ids = self._token_ids.to(self.device)
        logger.info("HybridDraftProposer: draft %s (%d layers, head of %d tokens), k=%d",
                    self.draft_path, self.model.config.num_hidden_layers,
                    self.model.lm_head.out_features, self.k)

    @torch.inference_mode()
    def _prefill(self, ids) -> object:
        """A fresh cache after ``ids`` (may be empty)."""
        from vllm_mamba_hybrid.modeling import HybridCache
        cache = HybridCache(self.model.config)
        if len(ids):
            self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
        return cache

    def _cache_before_last(self, ctx: np.ndarray):
        """The draft's cache after ``ctx[:-1]``: a snapshot, topped up or prefilled."""
        n = len(ctx)
        for m in range(n - 1, max(-1, n - self.k - 3), -1):
            snap = self._snaps.get(ctx[:m].tobytes())
            if snap is None:
                continue
            snap.last_call = self._calls
            cache = snap.cache
            if m < n - 1:
                cache = _copy_cache(cache)
                with torch.inference_mode():
                    self.model(input_ids=torch.tensor([ctx[m:n - 1].tolist()], device=self.device),
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
            return cache
        return self._prefill(ctx[:n - 1].tolist())

    @torch.inference_mode()
    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None, **kwargs) -> list[list[int]]:
        """Up to k greedy draft tokens per batch row ([] where a row gets none)."""
        from vllm_mamba_hybrid.modeling import HybridCache
        if self.model is None:
            self.load_model()
        self._calls += 1
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        k = self.k
        if self._k_by_batch_size is not None:
            k = self._k_by_batch_size[min(len(sampled_token_ids), len(self._k_by_batch_size) - 1)]
        rows = []  # (batch row, context, budget)
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            budget = min(k, self.max_model_len - n)
            if len(sampled) and budget > 0:  # not mid-prefill, not at max length
                rows.append((i, np.ascontiguousarray(token_ids_cpu[i, :n]), budget))
        if rows:
            caches = [self._cache_before_last(ctx) for _, ctx, _ in rows]
            pads = [max(c.seen_tokens for c in caches) - c.seen_tokens for c in caches]
            batch, mask = HybridCache.stack(caches)
            mask = mask.to(self.device)
            inputs = torch.tensor([[int(ctx[-1])] for _, ctx, _ in rows], device=self.device)
            consumed = [ctx for _, ctx, _ in rows]  # what each row's batch state has seen
            for _ in range(max(b for _, _, b in rows) + 1):
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                logits = self.model(input_ids=inputs, attention_mask=mask, past_key_values=batch,
                                    use_cache=True, logits_to_keep=1).logits[:, -1]
                nxt = logits.argmax(-1)
                if self._token_ids is not None:  # a cut head's output i is token _token_ids[i]
                    nxt = self._token_ids[nxt]
                for r, ((i, _, budget), token) in enumerate(zip(rows, nxt.tolist())):
                    self._snaps[consumed[r].tobytes()] = _Snapshot(batch.row(r, pads[r]),
                                                                  self._calls)
                    if len(drafts[i]) < budget:
                        drafts[i].append(token)
                    consumed[r] = np.append(consumed[r], np.asarray([token], consumed[r].dtype))
                inputs = nxt[:, None]
        stale = [key for key, s in self._snaps.items() if s.last_call <= self._calls - _KEEP_CALLS]
        for key in stale:
            del self._snaps[key]
        return drafts
