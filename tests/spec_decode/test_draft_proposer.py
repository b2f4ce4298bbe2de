"""HybridDraftProposer's batching and prefix-keyed state, against the draft's own greedy
continuations (the reference model's ``generate``), without an engine: rows of
different lengths drafted as one batch, calls where the target accepts some drafts
and replaces the next, rows joining, leaving and swapping places, both variants."""
import types

import numpy as np
import pytest
import torch

from tests.utils import make_random_hybrid
from vllm_mamba_hybrid.modeling import HybridCache
from vllm_mamba_hybrid.spec_decode.draft_proposer import HybridDraftProposer

VOCAB = 96
K = 4


def _engine_config(k: int, max_model_len: int = 4096, schedule=None):
    """The fields of vLLM's VllmConfig the proposer reads."""
    return types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=k,
                                                 num_speculative_tokens_per_batch_size=schedule),
        model_config=types.SimpleNamespace(max_model_len=max_model_len,
                                           get_vocab_size=lambda: VOCAB),
        scheduler_config=types.SimpleNamespace(max_num_seqs=8),
        device_config=types.SimpleNamespace(device_type="cpu"))


@pytest.fixture(params=["mamba2", "mamba1"])
def draft(request, tmp_path):
    make_random_hybrid(tmp_path / "draft", request.param, num_layers=3, attn_layers=(1,),
                       vocab_size=VOCAB, hidden_size=64, scale=2.0, seed=3)
    proposer = HybridDraftProposer(_engine_config(K), draft_path=tmp_path / "draft")
    proposer.load_model()
    return proposer


def _greedy(model, ctx, n):
    out = model.generate(torch.tensor([ctx]), max_new_tokens=n, do_sample=False, eos_token_id=[])
    return out[0, len(ctx):].tolist()


def _call(proposer, contexts):
    width = max(len(c) for c in contexts)
    ids = np.zeros((len(contexts) + 1, width + 8), dtype=np.int32)  # a spare row, like vLLM's
    for i, c in enumerate(contexts):
        ids[i, :len(c)] = c
    return proposer.propose([[c[-1]] for c in contexts], [len(c) for c in contexts], ids)


def test_batched_drafts_equal_the_drafts_own_greedy_continuation(draft):
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 33, 70)]
    for step in range(6):
        drafts = _call(draft, contexts)
        for c, d in zip(contexts, drafts):
            assert d == _greedy(draft.model, c, K), (step, len(c))
        nxt = []
        for r, (c, d) in enumerate(zip(contexts, drafts)):
            accepted = (step + r) % (K + 1)             # 0..K drafts accepted ...
            target = int(torch.randint(3, VOCAB, (1,), generator=g))
            nxt.append(c + d[:accepted] + [target])       # ... then the target's own token
        if step == 2:   # a request finishes, a new one joins, rows change places
            nxt = [nxt[2], torch.randint(3, VOCAB, (5,), generator=g).tolist(), nxt[0], nxt[3]]
        contexts = nxt


def test_rows_at_the_length_limit_get_fewer_drafts(draft, tmp_path):
    draft.max_model_len = 20
    ctx = list(range(3, 20))                               # 17 tokens: room for 3
    drafts = _call(draft, [ctx, [5, 6, 7]])
    assert len(drafts[0]) == 3 and drafts[0] == _greedy(draft.model, ctx, 3)
    assert drafts[1] == _greedy(draft.model, [5, 6, 7], K)
    assert _call(draft, [list(range(3, 23))])[0] == []   # at the limit: no draft


def test_batch_size_schedule_sets_the_drafts_per_row(draft):
    """vLLM's num_speculative_tokens_per_batch_size: K drafts for 1-2 requests, 2 for 3,
    none from 4 on (no draft forward); rows that went without drafts (no snapshot of
    their latest tokens) still get their own greedy continuation when drafting resumes."""
    proposer = HybridDraftProposer(_engine_config(K, schedule=[[1, 2, K], [3, 3, 2], [4, 4, 0]]),
                                   draft_path=draft.draft_path)
    proposer.model = draft.model
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    contexts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 11, 30, 2, 17)]
    for rows, per_row in ((5, 0), (4, 0), (3, 2), (2, K), (5, 0), (1, K)):
        drafts = _call(proposer, contexts[:rows])
        for c, d in zip(contexts, drafts):
            assert d == (_greedy(draft.model, c, per_row) if per_row else []), (rows, len(c))
        contexts = [c + [int(torch.randint(3, VOCAB, (1,), generator=g))] for c in contexts]


def test_a_cut_head_drafts_the_greedy_continuation_among_its_tokens(draft, tmp_path):
    """With a draft_vocab.json the proposer drafts what the full draft's logits pick among
    the kept tokens (a plain forward of the whole context a token, as the reference)."""
    from vllm_mamba_hybrid.spec_decode.draft_proposer import load_draft_model
    from vllm_mamba_hybrid.spec_decode.draft_vocab import save_draft_vocab
    ids = sorted(torch.randperm(VOCAB)[:VOCAB // 3].tolist())
    save_draft_vocab(draft.draft_path, ids, VOCAB, [], 0)
    proposer = HybridDraftProposer(_engine_config(K), draft_path=draft.draft_path)
    proposer.load_model()
    assert proposer.model.lm_head.out_features == len(ids)
    full = load_draft_model(draft.draft_path)
    kept = torch.tensor(ids)

    def restricted_greedy(ctx, n):
        out = []
        with torch.no_grad():
            for _ in range(n):
                logits = full(input_ids=torch.tensor([ctx + out])).logits[0, -1]
                out.append(ids[int(logits[kept].argmax())])
        return out

    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    contexts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 13, 40)]
    for step in range(3):
        drafts = _call(proposer, contexts)
        for c, d in zip(contexts, drafts):
            assert d == restricted_greedy(c, K), (step, len(c))
        contexts = [c + d[:(step + r) % (K + 1)] + [int(torch.randint(3, VOCAB, (1,), generator=g))]
                    for r, (c, d) in enumerate(zip(contexts, drafts))]


def test_stacked_cache_decodes_each_row_at_its_own_position(draft):
    """HybridCache.stack / row: a left-padded batch step equals each row's own step."""
    model = draft.model
    rows = [[4, 5, 6], list(range(3, 30)), [7]]
    caches = []
    for r in rows:
        c = HybridCache(model.config)
        model(input_ids=torch.tensor([r]), past_key_values=c, use_cache=True)
        caches.append(c)
    batch, mask = HybridCache.stack(caches)
    step = torch.tensor([[8], [9], [10]])
    with torch.no_grad():
        got = model(input_ids=step, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                    past_key_values=batch, use_cache=True).logits[:, -1]
        for i, r in enumerate(rows):
            want = model(input_ids=torch.tensor([r + [int(step[i, 0])]])).logits[0, -1]
            assert torch.allclose(got[i], want, atol=1e-4, rtol=1e-4)
            pad = batch.seen_tokens - len(r) - 1
            assert batch.row(i, pad).seen_tokens == len(r) + 1
