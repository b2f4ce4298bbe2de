"""Fast-generation runtime on CPU: static cache + reference layers, Triton kernels under
the interpreter, speculative decoding; everything compared with the reference model."""
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.modeling.test_model import VARIANTS, tiny_hybrid
from tests.utils import _sharpen, run_under_triton_interpreter, tiny_llama_config
from vllm_mamba_hybrid.runtime import FastGenerator, SpeculativeGenerator, fast_generate


def left_padded(lengths, vocab=512):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,))
        mask[i, width - n:] = 1
    return ids, mask


def sharp_hybrid(variant, **kw):
    model = tiny_hybrid(variant, **kw)
    _sharpen(model, 2.0)   # confident argmaxes: token equality is then a fair test
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_and_logits_equal_reference(variant):
    model = sharp_hybrid(variant)
    ids, mask = left_padded([5, 17, 9])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    out, logits = FastGenerator(model, 3, 32).generate(ids, mask, 10, eos_token_id=[], return_logits=True)
    assert torch.equal(out, ref)
    full = model(ref[:, :-1], attention_mask=torch.cat([mask, torch.ones_like(ref[:, 17:-1])], 1)).logits
    expect = full[:, 16:].float()
    assert ((logits - expect).norm() / expect.norm()).item() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_eos_and_sampling_match_reference(variant):
    model = sharp_hybrid(variant)
    ids, mask = left_padded([4, 11])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 11 + 3])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(fast_generate(model, ids, mask, 12, eos_token_id=eos, pad_token_id=0), ref)
    sample = dict(do_sample=True, temperature=0.9, top_k=50, eos_token_id=[])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8,
                         generator=torch.Generator().manual_seed(3), **sample)
    out = fast_generate(model, ids, mask, 8, generator=torch.Generator().manual_seed(3), **sample)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_speculative_greedy_equals_plain(variant):
    target = sharp_hybrid(variant)
    other = "mamba1" if variant == "mamba2" else "mamba2"
    draft = sharp_hybrid(other, attn_layers=(1,), num_layers=2)
    ids, mask = left_padded([6, 13, 2])
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=[])
    for d in (draft, target):   # a poor draft (rollbacks) and a perfect one (all accepted)
        spec = SpeculativeGenerator(target, d, 3, 40, num_draft_tokens=3)
        assert torch.equal(spec.generate(ids, mask, 14, eos_token_id=[]), ref)
    assert spec.accepted.item() > 0
    eos = int(ref[1, 13 + 5])
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=eos, pad_token_id=0)
    spec = SpeculativeGenerator(target, draft, 3, 40, num_draft_tokens=3)
    assert torch.equal(spec.generate(ids, mask, 14, eos_token_id=eos, pad_token_id=0), ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_speculative_draft_with_a_cut_head(variant):
    """A draft head cut to fewer tokens (draft_token_ids): still plain greedy's output; the
    target as its own draft, cut to a set holding every token it emits plus random others,
    is accepted as often as with its full head (a wrong id mapping would reject it)."""
    target = sharp_hybrid(variant)
    ids, mask = left_padded([6, 13, 2])
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=14, eos_token_id=[])
    vocab = target.config.vocab_size
    # the last round drafts up to k tokens past the 14th: keep those too
    longer = target.generate(ids, attention_mask=mask, max_new_tokens=14 + 3, eos_token_id=[])
    kept = torch.unique(torch.cat([longer[:, ids.shape[1]:].flatten(),
                                   torch.randperm(vocab)[:vocab // 4]]))
    full = SpeculativeGenerator(target, target, 3, 40, num_draft_tokens=3)
    assert torch.equal(full.generate(ids, mask, 14, eos_token_id=[]), ref)
    cut = SpeculativeGenerator(target, target, 3, 40, num_draft_tokens=3, draft_token_ids=kept)
    assert torch.equal(cut.generate(ids, mask, 14, eos_token_id=[]), ref)
    assert cut.accepted.item() == full.accepted.item() > 0
    draft = sharp_hybrid("mamba1" if variant == "mamba2" else "mamba2", attn_layers=(1,), num_layers=2)
    few = torch.randperm(vocab)[:vocab // 8]
    out = fast_generate(target, ids, mask, 14, draft_model=draft, draft_token_ids=few, eos_token_id=[])
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match=r"draft_token_ids must be ids in \[0, "):
        SpeculativeGenerator(target, draft, 3, 40, draft_token_ids=torch.tensor([0, vocab]))


def test_llama_teacher_runs_through_the_runtime():
    teacher = LlamaForCausalLM(tiny_llama_config(num_layers=3)).eval()
    _sharpen(teacher, 2.0)
    ids = torch.randint(3, 512, (2, 7))
    ref = teacher.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(fast_generate(teacher, ids, None, 10, eos_token_id=[]), ref)


_INTERPRETED = r"""
import torch
from tests.modeling.test_model import tiny_hybrid
from tests.runtime.test_runtime import left_padded, sharp_hybrid
from vllm_mamba_hybrid.runtime import FastGenerator, SpeculativeGenerator
torch.manual_seed(1)
for variant in ("mamba1", "mamba2"):
    model = sharp_hybrid(variant)
    ids, mask = left_padded([3, 8])
    ref, ref_logits = FastGenerator(model, 2, 16, use_triton=False).generate(
        ids, mask, 3, eos_token_id=[], return_logits=True)
    fast = FastGenerator(model, 2, 16, use_triton=True)
    assert fast.use_triton
    out, logits = fast.generate(ids, mask, 3, eos_token_id=[], return_logits=True)
    assert torch.equal(out, ref), variant
    err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert err < 1e-5, (variant, err)
    spec = SpeculativeGenerator(model, model, 2, 16, num_draft_tokens=2, use_triton=True)
    assert torch.equal(spec.generate(ids, mask, 3, eos_token_id=[]), ref), variant
print("ok")
"""


def test_triton_kernels_under_interpreter():
    """The Triton path (fused kernels, split-K attention, multi-token verify) on CPU."""
    run_under_triton_interpreter(_INTERPRETED, "ok", timeout=300)
