"""Speculative decoding on the static-cache runtime (greedy; batched; EOS per row).

One round, entirely on the device (so on CUDA it is one captured graph and the
host only checks "all rows done" once per round):

1. the draft feeds the current token and its own k guesses (k + 1 single steps;
   the last one only brings its cache up to date in case all k are accepted);
2. the target verifies ``[current, d_1 .. d_k]`` in one (k + 1)-token pass;
   Mamba layers step token by token inside it and record their state after
   each token;
3. row b keeps its n_b leading matches plus the target's own next token;
   both models roll back: KV by moving ``end``, Mamba state by taking the
   recorded state after token n_b (no re-run of the target).

Greedy output equals plain greedy decoding of the target (same argmax at every
position). ``accept_prob`` replaces the draft/target comparison by a coin flip
with that per-token acceptance rate, for benchmarks with random weights.
``draft_token_ids`` cuts the draft's head to those tokens (`spec_decode.draft_vocab`).
"""
from __future__ import annotations

import torch

from ..modeling.modeling_hybrid import resolve_eos_and_pad
from ..spec_decode.draft_vocab import cut_head
from .decoder import FastGenerator, capture_graph, finish_rows


class SpeculativeGenerator:
    def __init__(self, target, draft, batch_size: int, max_len: int, *, num_draft_tokens: int = 4,
                 use_cuda_graph: bool | None = None, use_triton: bool | None = None,
                 accept_prob: float | None = None, attention_splits: int | None = None,
                 draft_token_ids: torch.Tensor | None = None):
        k = self.k = num_draft_tokens
        kw = dict(history=k + 1, use_cuda_graph=False, use_triton=use_triton,
                  attention_splits=attention_splits)
        # k + 2 spare slots: a round writes k + 1 tokens past a row's end
        self.target = FastGenerator(target, batch_size, max_len + k + 2, **kw)
        self.draft = FastGenerator(draft, batch_size, max_len + k + 2, **kw)
        if self.target.config.vocab_size != self.draft.config.vocab_size:
            raise ValueError("draft and target must share the vocabulary")
        self.batch_size, self.max_len, self.accept_prob = batch_size, max_len, accept_prob
        dev = self.device = self.target.device
        self.draft_token_ids = None   # the cut head's output i is token draft_token_ids[i]
        if draft_token_ids is not None:
            vocab = self.draft.model.lm_head.out_features
            if not len(draft_token_ids) or not 0 <= int(draft_token_ids.min()) <= int(
                    draft_token_ids.max()) < vocab:
                raise ValueError(f"draft_token_ids must be ids in [0, {vocab}) (the draft's head)")
            self.draft.head = cut_head(self.draft.model.lm_head, draft_token_ids)
            self.draft_token_ids = draft_token_ids.to(dev)
        self.use_graph = (dev.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        long = dict(dtype=torch.long, device=dev)
        self.cur = torch.zeros(batch_size, **long)
        self.drafts = torch.zeros(batch_size, k, **long)
        self.count = torch.zeros(batch_size, **long)
        self.limit = torch.zeros((), **long)
        self.tokens = torch.zeros(batch_size, max_len + k + 1, **long)
        self.accepted = torch.zeros((), **long)       # total drafts accepted (statistics)
        self._steps = torch.arange(k + 1, **long)
        self.rounds = 0
        self._graph = None
        if self.use_graph:
            self._graph, _ = capture_graph(self._round)
            for gen in (self.target, self.draft):
                gen.cache.end.zero_()
            self.count.zero_()
            self.accepted.zero_()

    @torch.no_grad()
    def _round(self) -> None:
        k, d, t = self.k, self.draft, self.target
        d.cache.hist_pos.zero_()
        t.cache.hist_pos.zero_()
        token = self.cur
        for i in range(k + 1):
            logits = d._forward(token[:, None], record=True)[:, -1]
            if i < k:
                token = logits.argmax(-1)
                if self.draft_token_ids is not None:
                    token = self.draft_token_ids[token]
                self.drafts[:, i] = token
        fed = torch.cat([self.cur[:, None], self.drafts], 1)
        best = t._forward(fed, record=True).argmax(-1)                    # (b, k + 1)
        if self.accept_prob is None:
            match = self.drafts == best[:, :k]
        else:
            match = torch.rand(self.batch_size, k, device=self.device) < self.accept_prob
        keep = match.long().cumprod(-1).sum(-1)                           # n_b in [0, k]
        for gen in (t, d):
            gen.cache.rollback(keep, k + 1)
            gen.cache.end.clamp_(max=gen.max_len - (k + 1))               # finished rows idle
        emitted = torch.where(self._steps < keep[:, None], torch.cat([self.drafts, best[:, :1]], 1), best)
        self.tokens.scatter_(1, (self.count[:, None] + self._steps).clamp(max=self.tokens.shape[1] - 1),
                             emitted)
        self.count.add_(keep + 1).clamp_(max=self.limit)
        self.accepted.add_(keep.sum())
        self.cur.copy_(best.gather(1, keep[:, None]).squeeze(1))

    def round(self) -> None:
        """One draft/verify round (graph replay on CUDA)."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._round()
        self.rounds += 1

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, *,
                 do_sample: bool = False, eos_token_id=None, pad_token_id=None, **unused):
        if do_sample:
            raise NotImplementedError("speculative decoding here is greedy only")
        width = input_ids.shape[1]
        if width + max_new_tokens > self.max_len:
            raise ValueError(f"{width} + {max_new_tokens} tokens exceed the cache ({self.max_len})")
        eos, pad = resolve_eos_and_pad(self.target.model, eos_token_id, pad_token_id, input_ids.device)
        first = self.target.prefill(input_ids, attention_mask).argmax(-1)
        self.draft.prefill(input_ids, attention_mask)
        self.tokens.fill_(pad)
        self.tokens[:, 0] = first
        self.cur.copy_(first)
        self.count.fill_(1)
        self.limit.fill_(max_new_tokens)
        self.accepted.zero_()
        self.rounds = 0
        cols = torch.arange(self.tokens.shape[1], device=self.device)
        while True:
            seen = cols < self.count[:, None]
            done = (self.count >= max_new_tokens) | (torch.isin(self.tokens, eos) & seen).any(1)
            if bool(done.all()):
                break
            self.round()
        return finish_rows(input_ids, self.tokens[:, :max_new_tokens], eos, pad)
