"""Fast-generation runtime on CUDA: Triton kernels and CUDA graphs vs the reference model."""
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.modeling.test_model import VARIANTS
from tests.runtime.test_runtime import left_padded, sharp_hybrid
from tests.utils import _sharpen, tiny_llama_config
from vllm_mamba_hybrid.runtime import FastGenerator, SpeculativeGenerator, fast_generate

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("graph", [False, True])
def test_fp32_greedy_equals_reference(variant, graph):
    model = sharp_hybrid(variant).cuda()
    ids, mask = left_padded([5, 17, 9, 1])
    ids, mask = ids.cuda(), mask.cuda()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    gen = FastGenerator(model, 4, 48, use_cuda_graph=graph)
    assert gen.use_triton and gen.use_graph == graph
    out, logits = gen.generate(ids, mask, 16, eos_token_id=[], return_logits=True)
    assert torch.equal(out, ref)
    full = model(ref[:, :-1], attention_mask=torch.cat([mask, torch.ones_like(ref[:, 17:-1])], 1)).logits
    expect = full[:, 16:].float()
    assert ((logits - expect).norm() / expect.norm()).item() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_logits_close_to_reference(variant):
    model = sharp_hybrid(variant, hidden_size=256, heads=4, kv_heads=2, intermediate_size=512).cuda()
    ids, mask = left_padded([40, 23])
    ids, mask = ids.cuda(), mask.cuda()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    fp32_logits = model(ref[:, :-1], attention_mask=torch.cat([mask, torch.ones_like(ref[:, 40:-1])], 1)
                        ).logits[:, 39:].float()
    model.to(torch.bfloat16)
    gen = FastGenerator(model, 2, 64)
    # teacher-force the fp32 reference tokens through the bf16 graph path
    logits = [gen.prefill(ids, mask).float()]
    for step in range(7):
        logits.append(gen.forward(ref[:, 40 + step, None])[:, -1].float())
    logits = torch.stack(logits, 1)
    assert ((logits - fp32_logits).norm() / fp32_logits.norm()).item() < 3e-2


@pytest.mark.parametrize("variant", VARIANTS)
def test_speculative_graph_equals_plain(variant):
    target = sharp_hybrid(variant).cuda()
    draft = sharp_hybrid("mamba2", attn_layers=(1,), num_layers=2).cuda()
    ids, mask = left_padded([6, 13, 2])
    ids, mask = ids.cuda(), mask.cuda()
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    for d in (draft, target):
        spec = SpeculativeGenerator(target, d, 3, 48, num_draft_tokens=4)
        assert spec.use_graph
        assert torch.equal(spec.generate(ids, mask, 20, eos_token_id=[]), ref)
    cut = torch.randperm(target.config.vocab_size, device="cuda")[:100]   # a cut draft head
    spec_cut = SpeculativeGenerator(target, draft, 3, 48, num_draft_tokens=4, draft_token_ids=cut)
    assert torch.equal(spec_cut.generate(ids, mask, 20, eos_token_id=[]), ref)
    eos = int(ref[2, 13 + 4])
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(spec.generate(ids, mask, 20, eos_token_id=eos, pad_token_id=0), ref)


def test_teacher_on_gpu():
    teacher = LlamaForCausalLM(tiny_llama_config(num_layers=3)).cuda().eval()
    _sharpen(teacher, 2.0)
    ids = torch.randint(3, 512, (2, 7), device="cuda")
    ref = teacher.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(fast_generate(teacher, ids, None, 12, eos_token_id=[]), ref)


def test_teacher_samples_on_gpu():
    """Sampling as the GPU pseudo-label engine uses it (top-p, EOS, seed): the tokens
    follow the teacher's top-p set, each row stops at its first EOS, a seed repeats a draw."""
    from distillation.generation import generate_answers
    teacher = LlamaForCausalLM(tiny_llama_config(num_layers=3)).cuda().eval()
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (5, 11, 3, 8)]
    kw = dict(eos_id=2, pad_id=0, max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.5)
    first = generate_answers(teacher, prompts, seed=1, **kw)
    assert generate_answers(teacher, prompts, seed=1, **kw) == first
    assert generate_answers(teacher, prompts, seed=2, **kw) != first
    for p, a in zip(prompts, first):
        assert 0 < len(a) <= 24 and (2 not in a[:-1])
        with torch.no_grad():
            probs = teacher(torch.tensor([p + a], device="cuda")).logits[0, len(p) - 1:-1].softmax(-1)
        for t, tok in enumerate(a):  # the chosen token lies inside the top-p nucleus
            sorted_p, order = probs[t].sort(descending=True)
            inside = order[: int((sorted_p.cumsum(0) - sorted_p <= 0.5).sum())]
            assert tok in inside.tolist(), (t, tok)
