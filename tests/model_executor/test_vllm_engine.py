"""vLLM (real engine, real plugin) against the reference hybrid model, both variants.

Runs on whichever vLLM is installed: the CPU build in CI (eager), the CUDA build on
the GPU machine (eager, and vLLM's defaults: torch.compile + CUDA graphs).
One engine per case serves several checks: greedy continuations of 8 prompts of very
different lengths submitted together, with a token budget that splits long prompts
across chunked-prefill steps, then prompt logprobs; a second engine with a cache too
small for all sequences, which must preempt (recompute) and still match.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.utils import DAMAGES, assert_greedy_equal, damaged_copy, make_random_hybrid
from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM

pytestmark = pytest.mark.vllm

# Lengths cross the 128-token attention block boundary while decoding, so a small cache
# must preempt; 901 tokens need 15 prefill steps at 64 tokens per step.
PROMPT_LENS = (1, 6, 23, 90, 120, 230, 500, 901)
NEW_TOKENS = 48
VOCAB = 512
MODEL_KW = dict(hidden_size=128, heads=4, kv_heads=2, intermediate_size=256, vocab_size=VOCAB)
# block_size: the CPU engine's default, fixed so the cache budgets below (in blocks) mean
# the same on CUDA, where vLLM would size a hybrid's blocks to its Mamba state.
ENGINE_KW = dict(skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.2,
                 max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=64,
                 block_size=128, disable_log_stats=False)
ON_CUDA = torch.cuda.is_available()
# Compiled graphs are what CUDA users run (vLLM's default); the CPU engine runs eager.
ENGINE_MODES = {"eager": dict(enforce_eager=True),
                **({"graphs": dict(enforce_eager=False)} if ON_CUDA else {})}
# Diagnosis on the GPU machine (tools/gpu_jobs.py, job spec-bisect): MAMBA_HYBRID_TEST_MODE
# sets the mode of the tests that run one (speculative decoding, TP), and
# MAMBA_HYBRID_TEST_ENGINE_KW, a JSON object, adds arguments to every LLM() these tests start
# (e.g. '{"async_scheduling": false}').
DEFAULT_MODE = os.environ.get("MAMBA_HYBRID_TEST_MODE", "graphs" if ON_CUDA else "eager")
if DEFAULT_MODE not in ENGINE_MODES:
    raise ValueError(f"MAMBA_HYBRID_TEST_MODE={DEFAULT_MODE!r}: this machine runs "
                     f"{sorted(ENGINE_MODES)}")


def engine_kw_from_env(text: str) -> dict:
    """MAMBA_HYBRID_TEST_ENGINE_KW's engine arguments, refused by name if not a JSON object."""
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"MAMBA_HYBRID_TEST_ENGINE_KW is not JSON ({e}): {text!r}") from None
    if not isinstance(kw, dict):
        raise ValueError(f"MAMBA_HYBRID_TEST_ENGINE_KW must be a JSON object of engine "
                         f"arguments, not {text!r}")
    return kw


ENGINE_KW.update(engine_kw_from_env(os.environ.get("MAMBA_HYBRID_TEST_ENGINE_KW", "{}")))
# Prompt logprobs against the float32 reference (on CUDA with Triton's dots in IEEE
# float32, see conftest.py; in TF32 they were 2.7e-3 off on an H100).
LOGPROB_ATOL = 1e-3
# Tied embeddings for mamba1, an lm_head of its own for mamba2. Seeds and weight scales
# picked so that no greedy decision is a near-tie (checked below).
VARIANTS = {
    "mamba2": dict(tie_word_embeddings=False, seed=7, scale=3.0),
    "mamba1": dict(tie_word_embeddings=True, seed=8, scale=4.0),
}
# 11 cache blocks of 128 tokens: one request of 949 tokens fits (8 attention + 1 Mamba
# block), the eight together do not. Prompts that cross a block boundary while decoding
# go first, so running requests must grow into a full cache and get preempted (and
# recomputed later).
PREEMPT = dict(order=(6, 5, 4, 3, 7, 2, 1, 0), num_gpu_blocks_override=11)
# collective_rpc with a function (the noise below) pickles it for vLLM's worker.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def fill_mamba_state_with_noise(worker) -> int:
    """Runs in vLLM's worker: every Mamba layer's conv and SSM state blocks get noise, as
    earlier requests or CUDA-graph capture leave them (vLLM zeroes no Mamba block): no
    request may read a block's state before writing it. A new one-token prompt is the case
    that did (mamba_metadata.py)."""
    from vllm.model_executor.layers.mamba.abstract import MambaBase

    layers = [m for m in worker.model_runner.compilation_config.static_forward_context.values()
              if isinstance(m, MambaBase)]
    for layer in layers:
        for state in layer.kv_cache:
            state.copy_((torch.randn(state.shape, device=state.device) * 3).to(state.dtype))
    return len(layers)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


_CASES: dict[str, dict] = {}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def case(request, tmp_path_factory):
    """Checkpoint dir + the reference model's greedy tokens and prompt logprobs; built
    once per session (test_vllm_tp.py uses the same cases)."""
    variant = request.param
    if variant not in _CASES:
        _CASES[variant] = _reference_case(variant, tmp_path_factory.mktemp(f"hybrid_{variant}"))
    return _CASES[variant]


def _reference_case(variant: str, ckpt, **hybrid_kw) -> dict:
    make_random_hybrid(ckpt, variant, **MODEL_KW, **{**VARIANTS[variant], **hybrid_kw})
    ref = LlamaMambaHybridForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompts = _prompts()
    greedy, logprobs = [], []
    with torch.no_grad():
        for p in prompts:
            seq = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=[])[0]
            greedy.append(seq[len(p):].tolist())
            logits = ref(seq[None]).logits[0].float()
            # Greedy decisions must not be near-ties, or the comparison is meaningless.
            top2 = logits[len(p) - 1:-1].topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "reference has a near-tie"
            lp = torch.log_softmax(logits[:len(p) - 1], dim=-1)
            logprobs.append(lp.gather(1, torch.tensor(p[1:])[:, None])[:, 0])
    del ref
    return dict(variant=variant, ckpt=str(ckpt), prompts=prompts, greedy=greedy,
                logprobs=logprobs)


def _run_engine(case, mode, order=tuple(range(len(PROMPT_LENS))), **engine_kw):
    """Greedy outputs (in prompt order), prompt logprobs and preemption count of one
    engine instance in ``mode`` (ENGINE_MODES); prompts are submitted in ``order``, on
    state blocks filled with noise first."""
    from vllm import LLM, SamplingParams

    llm = LLM(case["ckpt"], **ENGINE_KW, **ENGINE_MODES[mode], **engine_kw)
    try:
        assert llm.collective_rpc(fill_mamba_state_with_noise)[0] > 0
        # vLLM enables prefix caching by default; the plugin must have turned it off.
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        inputs = [{"prompt_token_ids": p} for p in case["prompts"]]
        outs = llm.generate([inputs[i] for i in order],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
        greedy = [None] * len(order)
        for i, o in zip(order, outs):
            greedy[i] = list(o.outputs[0].token_ids)
        preemptions = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        lp_outs = llm.generate(inputs, SamplingParams(max_tokens=1, temperature=0,
                                                      prompt_logprobs=0))
        prompt_logprobs = [
            torch.tensor([pos[tok].logprob for pos, tok in zip(o.prompt_logprobs[1:], p[1:])])
            for o, p in zip(lp_outs, case["prompts"])]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return greedy, prompt_logprobs, preemptions


def _assert_logprobs_close(case, prompt_logprobs):
    for n, ref, got in zip(PROMPT_LENS, case["logprobs"], prompt_logprobs):
        assert got.shape == ref.shape
        if n > 1:
            err = (got - ref).abs().max().item()
            assert err < LOGPROB_ATOL, (f"{case['variant']}: prompt logprobs of {n}-token prompt "
                                        f"off by {err}")


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_chunked_prefill_batch_matches_reference(case, mode):
    greedy, prompt_logprobs, _ = _run_engine(case, mode)
    assert_greedy_equal(case["variant"], PROMPT_LENS, case["greedy"], greedy)
    _assert_logprobs_close(case, prompt_logprobs)


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_preemption_matches_reference(case, mode):
    greedy, _, preemptions = _run_engine(case, mode, **PREEMPT)
    assert preemptions >= 1, "the small cache did not force a preemption"
    assert_greedy_equal(case["variant"], PROMPT_LENS, case["greedy"], greedy)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_several_mamba_cache_groups_match_reference(variant, tmp_path):
    """Three Mamba layers to one attention layer: vLLM gives each Mamba layer a KV-cache
    group of its own and derives the later groups' metadata from the first's
    (``update_block_table``, no ``build``). A new one-token prompt runs from zeroed state
    blocks (mamba_metadata.py, guard 1) in every group, not only the first: on blocks
    that hold noise its output would otherwise start wrong."""
    case = _reference_case(variant, tmp_path / "ckpt", attn_layers=(1,))
    greedy, _, _ = _run_engine(case, DEFAULT_MODE)
    assert_greedy_equal(f"{variant}, three Mamba cache groups", PROMPT_LENS, case["greedy"],
                        greedy)


@pytest.mark.parametrize("text,message", [
    ("{async_scheduling: false}", "is not JSON"), ('["enforce_eager"]', "must be a JSON object")])
def test_bad_engine_kw_override_is_refused_naming_the_variable(text, message):
    with pytest.raises(ValueError, match=message) as err:
        engine_kw_from_env(text)
    assert "MAMBA_HYBRID_TEST_ENGINE_KW" in str(err.value)
    assert engine_kw_from_env('{"async_scheduling": false}') == {"async_scheduling": False}


# ---- strict weight loading ---------------------------------------------------------
_LOAD = textwrap.dedent("""
    import sys
    from vllm import LLM
    if __name__ == "__main__":
        LLM(sys.argv[1], skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
            gpu_memory_utilization=0.2, max_model_len=256)
""")


@pytest.fixture(scope="module")
def mamba1_ckpt(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("load_mamba1")
    make_random_hybrid(ckpt, "mamba1", hidden_size=128, heads=4, kv_heads=2,
                       intermediate_size=256)
    return ckpt


def _load_error(ckpt) -> str:
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(ckpt)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, "loading a broken checkpoint succeeded"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("damage", DAMAGES)
def test_broken_checkpoint_names_the_tensor(mamba1_ckpt, tmp_path, damage):
    """vLLM's load path: one error naming the tensor and its file (issue: a NaN weight
    used to give token 0 with NaN logprobs)."""
    expect = damaged_copy(mamba1_ckpt, tmp_path / "broken", damage,
                          "model.layers.2.mamba.dt_proj.bias")
    error = _load_error(tmp_path / "broken")
    assert all(piece in error for piece in expect), (expect, error[-3000:])
