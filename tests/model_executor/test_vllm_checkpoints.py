"""vLLM serves real checkpoints exactly like the reference model: a hybrid initialised
from the real SmolLM2 teacher, and checkpoints converted from the paper's format."""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoTokenizer

from tests.utils import SHARED, make_random_hybrid, write_paper_checkpoint
from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher, init_hybrid_from_teacher,
                                               save_hybrid)
from vllm_mamba_hybrid.conversion.paper import convert_paper
from vllm_mamba_hybrid.conversion.teacher import load_teacher

pytestmark = pytest.mark.vllm
NEW_TOKENS = 48
NEAR_TIE = 1e-4   # logit gap below which fp32 kernels may legitimately pick either token


def reference_greedy(model, prompts):
    """Greedy continuations and, per prompt, how many leading tokens are decided by a
    margin larger than NEAR_TIE (beyond that the comparison would be meaningless)."""
    greedy, decided = [], []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, eos_token_id=[])[0]
            top2 = model(seq[None]).logits[0, len(p) - 1:-1].float().topk(2, -1).values
            ties = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).nonzero()
            greedy.append(seq[len(p):].tolist())
            decided.append(int(ties[0]) if len(ties) else NEW_TOKENS)
    return greedy, decided


def vllm_greedy(model_dir, prompts, **engine_kw):
    from vllm import LLM, SamplingParams
    llm = LLM(str(model_dir), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.2, max_model_len=1024, max_num_seqs=8,
              max_num_batched_tokens=128, **engine_kw)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


# Mamba1 at d_state = head_dim (64): the quality study's Mamba1 student
@pytest.mark.parametrize("variant,d_state", [("mamba2", None), ("mamba1", 64)])
def test_smollm2_hybrid_in_vllm_matches_reference(smollm2_teacher, tmp_path, variant, d_state):
    teacher = load_teacher(smollm2_teacher, dtype=torch.float32)
    cfg = hybrid_config_from_teacher(teacher.config, variant=variant, attn_fraction=0.5,
                                     d_state=d_state)
    hybrid = init_hybrid_from_teacher(teacher, cfg, seed=1)
    save_hybrid(hybrid, tmp_path / "hybrid", tokenizer_dir=smollm2_teacher)
    hybrid.eval()
    tok = AutoTokenizer.from_pretrained(smollm2_teacher)
    essay = (SHARED / "data" / "essays" / "avg.txt").read_text(encoding="utf-8")
    texts = ["Paris", "The capital of France is", essay[:300], essay[1000:3000], essay[:200] * 2,
             "def fibonacci(n):", essay[4000:4800], "Name three primary colors."]
    prompts = [tok(t)["input_ids"][:600] for t in texts]
    ref, decided = reference_greedy(hybrid, prompts)
    got = vllm_greedy(tmp_path / "hybrid", prompts)
    for p, r, g, n in zip(prompts, ref, got, decided):
        assert n >= 8, f"reference near-tie after {n} tokens: too weak a check"
        assert g[:n] == r[:n], f"prompt of {len(p)} tokens diverged:\nref  {r}\nvllm {g}"


@pytest.mark.parametrize("variant", ["mamba1", "mamba2"])
def test_paper_checkpoint_converted_and_served_matches_original(tmp_path, variant):
    original = make_random_hybrid(tmp_path / "orig", variant, hidden_size=128, heads=4, kv_heads=2,
                                  intermediate_size=256, seed=11, scale=3.0).eval()
    paper = write_paper_checkpoint(original, tmp_path / "paper", fmt="bin")
    converted = convert_paper(paper, tmp_path / "converted")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (2, 17, 64, 300)]
    ref, decided = reference_greedy(original, prompts)
    got = vllm_greedy(converted, prompts)
    for p, r, o, n in zip(prompts, ref, got, decided):
        assert n >= 24, f"reference near-tie after {n} tokens"
        assert o[:n] == r[:n], f"{variant}: prompt of {len(p)} tokens diverged"
