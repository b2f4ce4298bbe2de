"""Speculative decoding of hybrid targets on the real vLLM engine (the CPU build in
CI; on the GPU machine the CUDA build with vLLM's defaults, graphs and compile on).

Greedy speculative outputs must equal plain greedy decoding, token for token, under
chunked prefill (64-token budget) and preemption (a cache too small for all eight
requests). On the CPU engine the bar is the reference model (tests/model_executor/test_vllm_engine.py
shows plain decoding equals it); on CUDA it is vLLM's own plain greedy output in the
same mode, since CUDA's kernels sum in other orders and may take the other side of a
close call than the float32 CPU reference. Every case runs one engine:

* n-gram proposals (vLLM's ``ngram``; ``ngram_gpu`` on CUDA) on tiny random targets of both variants,
  k = 2 and 4, prompts with repeats; a 64-token vocabulary makes greedy outputs
  fall into loops, so proposals get accepted at every draft position (partial
  acceptance exercises the rollback: start state / conv column a-1).
* vLLM's batch-size schedule (speculation only in a shrinking batch's tail), with
  n-gram and with the project's draft proposer.
* the project's draft proposer (``custom_class``) with the target itself as the
  draft (near-full acceptance: checks the proposer's prefix-keyed state), and
  on a SmolLM2-derived hybrid with a layer-subset draft of the teacher.
* ``mamba-hybrid serve`` with n-gram speculation and concurrent requests.
* the control: vLLM's own Llama (attention only) speculating equals its plain greedy output.
* vLLM 0.26's runner (no accepted-token counts on a step without drafts) put into the CPU
  engine's worker, and vLLM's graph-mode resolution with the hybrid's Mamba backend
  (``model_executor/mamba_metadata.py``, guards 2 and 3).
"""
from __future__ import annotations

import gc
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.model_executor.test_vllm_engine import (
    DEFAULT_MODE,
    ENGINE_KW,
    ENGINE_MODES,
    MODEL_KW,
    ON_CUDA,
    VARIANTS,
)
from tests.utils import (
    assert_greedy_equal,
    first_difference,
    make_random_hybrid,
    make_random_llama,
    running_server,
)
from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM

pytestmark = pytest.mark.vllm
# vLLM's n-gram proposer on the host needs numba; CUDA runs its GPU n-gram proposer.
NGRAM = "ngram_gpu" if ON_CUDA else "ngram"

VOCAB = 64
NEW_TOKENS = 64
# 90, 120, 230 and 500 cross a 128-token block boundary while decoding.
PROMPT_LENS = (3, 7, 20, 50, 90, 120, 230, 500)
DRAFT_CLASS = "vllm_mamba_hybrid.spec_decode.HybridDraftProposer"
# Long prompts first so the running requests grow into a full cache.
ORDER = (7, 6, 5, 4, 3, 2, 1, 0)
# Seeds/scales with no near-tie in the reference's greedy choices on these prompts.
TINY_VARIANTS = {"mamba2": dict(tie_word_embeddings=False, seed=10, scale=3.0),
                 "mamba1": dict(tie_word_embeddings=True, seed=9, scale=4.0)}


def _repeating_prompts(vocab: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in PROMPT_LENS:
        base = torch.randint(3, vocab, (max(2, n // 3),), generator=g).tolist()
        out.append((base * 4)[:n])
    return out


def _reference_greedy(ckpt, prompts, dtype=torch.float32, min_gap=1e-3):
    """Greedy continuations of the reference model; each is cut before the first
    near-tie (a top-2 logit gap < min_gap), where fp32 rounding may pick either."""
    ref = LlamaMambaHybridForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=[])[0]
            logits = ref(seq[None]).logits[0, len(p) - 1:-1].float()
            top2 = logits.topk(2, dim=-1).values
            ties = ((top2[:, 0] - top2[:, 1]) < min_gap).nonzero()
            cut = int(ties[0]) + 1 if len(ties) else NEW_TOKENS
            out.append(seq[len(p):len(p) + cut].tolist())
    del ref
    gc.collect()
    return out


def _run(ckpt, prompts, spec: dict | None, max_tokens=None, in_worker=None, **engine_kw):
    """Greedy outputs (prompt order), spec-decode metrics and preemption count;
    ``max_tokens``: one per prompt (default NEW_TOKENS each); ``in_worker``: (before,
    after) functions run in vLLM's worker around the generation, the second's result
    returned in the metrics as "worker". The metrics' "resumed" lists the requests
    resumed after preemption (see ``record_resumptions``), "steps" each step's Mamba rows
    (``record_steps``), "logprobs" each output token's log-probability."""
    from vllm import LLM, SamplingParams

    from vllm_mamba_hybrid.spec_decode import spec_decode_metrics

    max_tokens = max_tokens or [NEW_TOKENS] * len(prompts)
    # str: vLLM 0.26's LLM() takes no Path (0.32 does); a Path stopped every CUDA case.
    llm = LLM(str(ckpt), **{**ENGINE_KW, **ENGINE_MODES[DEFAULT_MODE], **engine_kw},
              speculative_config=spec)
    try:
        llm.collective_rpc(record_resumptions)
        llm.collective_rpc(record_steps)
        if in_worker:
            llm.collective_rpc(in_worker[0])
        outs = llm.generate([{"prompt_token_ids": prompts[i]} for i in ORDER],
                            [SamplingParams(max_tokens=max_tokens[i], temperature=0,
                                            ignore_eos=True, logprobs=0) for i in ORDER])
        greedy, logprobs = [None] * len(prompts), [None] * len(prompts)
        for i, o in zip(ORDER, outs):
            greedy[i] = list(o.outputs[0].token_ids)
            logprobs[i] = [lp[t].logprob for t, lp in zip(greedy[i], o.outputs[0].logprobs)]
        metrics = spec_decode_metrics(llm)
        metrics["logprobs"] = logprobs
        metrics["resumed"] = llm.collective_rpc(resumptions)[0]
        metrics["steps"], metrics["trace_error"] = llm.collective_rpc(recorded_steps)[0]
        if in_worker:
            metrics["worker"] = llm.collective_rpc(in_worker[1])[0]
        preemptions = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return greedy, metrics, preemptions


def record_resumptions(worker) -> None:
    """Runs in vLLM's worker: notes (prompt tokens, output tokens so far) of every request
    resumed after preemption, so that a divergence report shows whether a prompt left its
    reference where it was resumed (the 2026-12-07 H100 failures: docs/lab)."""
    runner = worker.model_runner
    inner, runner.resumptions = runner._update_states, []

    def _update_states(scheduler_output):
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids:
                runner.resumptions.append((len(runner.requests[req_id].prompt_token_ids),
                                           cached.num_output_tokens[i]))
        return inner(scheduler_output)

    runner._update_states = _update_states


def resumptions(worker) -> list[tuple[int, int]]:
    return worker.model_runner.resumptions


def record_steps(worker) -> None:
    """Runs in vLLM's worker: every step's rows as the Mamba metadata builder saw them, so
    that a divergence report shows the schedule around the diverging token (what a GPU run
    of minutes must answer at once). A row: (prompt tokens, tokens computed as the runner
    holds them, tokens scheduled, drafts or None, decode row, the accepted-token count the
    mixers read, run as a decode row without drafts). The counts stay on the device until
    the end: reading them per step would synchronise an async-scheduled runner. A hook
    that fails stops recording, not the engine (the 2026-12-07 H100 run lost its cases to
    graph-padded rows), and the report names its error."""
    from vllm_mamba_hybrid.model_executor.mamba_metadata import HybridMamba2MetadataBuilder

    runner = worker.model_runner
    builder_cls, inner = HybridMamba2MetadataBuilder, HybridMamba2MetadataBuilder.build
    runner.step_rows, runner.step_trace_error = [], None
    traced = []   # the one builder recorded (a builder per KV-cache group)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False, **kwargs):
        md = inner(self, common_prefix_len, common_attn_metadata, fast_build, **kwargs)
        if not traced:
            traced.append(self)
        if self is traced[0] and runner.step_trace_error is None:
            try:
                runner.step_rows.append(_step_rows(runner, md, common_attn_metadata, kwargs))
            except Exception as e:   # noqa: BLE001 - reported with the divergence
                runner.step_trace_error = repr(e)
        return md

    builder_cls.build = build


def _step_rows(runner, md, common_attn_metadata, kwargs) -> tuple[list[tuple], object]:
    """The scheduled requests' rows (graph padding left out) and the decode rows'
    accepted counts, still on the device."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs   # <= the metadata's rows, which a graph may pad
    query_lens = torch.diff(common_attn_metadata.query_start_loc_cpu[:num_reqs + 1]).tolist()
    drafts = kwargs.get("num_decode_draft_tokens_cpu")
    undrafted = set() if md.undrafted_rows is None else set(md.undrafted_rows.tolist())
    rows = [(len(runner.requests[batch.req_ids[i]].prompt_token_ids),
             int(batch.num_computed_tokens_cpu[i]), query_lens[i],
             None if drafts is None else int(drafts[i]), i < md.num_decodes, i in undrafted)
            for i in range(num_reqs)]
    accepted = (md.num_accepted_tokens[:md.num_decodes].clone()
                if md.num_accepted_tokens is not None and md.num_decodes else None)
    return rows, accepted


def recorded_steps(worker) -> tuple[list[list[tuple]], str | None]:
    """(every recorded step's rows with their accepted counts, the hook's error if any)."""
    runner, steps = worker.model_runner, []
    for rows, accepted in runner.step_rows:
        counts = [] if accepted is None else accepted.tolist()
        steps.append([(*row, counts[i] if i < len(counts) else None)
                      for i, row in enumerate(rows)])
    return steps, runner.step_trace_error


def _schedule_near(prompt_len: int, output: int, steps: list[list[tuple]], span: int = 12) -> str:
    """The steps that computed tokens of the ``prompt_len`` request within ``span`` tokens
    before its output ``output`` (and the one after)."""
    at = prompt_len + output   # that output's position in the sequence
    lines = []
    for s, rows in enumerate(steps):
        for n, computed, scheduled, drafts, decode, undrafted, accepted in rows:
            if n == prompt_len and at - span <= computed + scheduled and computed <= at + 1:
                lines.append(f"    step {s}: computed {computed}, +{scheduled} tokens, "
                             f"drafts {drafts}, {'decode' if decode else 'prefill'}, "
                             f"accepted {accepted}" + (", undrafted" if undrafted else ""))
    return "\n".join(lines)


def _logprob_drift(bar: list[float], got: list[float], upto: int) -> str:
    """|got - bar| of the same tokens' log-probabilities before output ``upto``: a drift
    that grows token by token is arithmetic, one that jumps at a step is a state error.
    Output 0 comes from the prompt's last prefill chunk, the rest from decode steps, so it
    is shown apart (on 2026-12-07 the H100 reports had it inside a maximum)."""
    drift = [abs(a - b) for a, b in zip(bar[:upto], got[:upto])]
    if not drift:
        return "nothing before the divergence"
    head, tail = drift[1:-8], drift[max(1, len(drift) - 8):]
    return (f"output 0 (prefill) {drift[0]:.1e}"
            + (f"; max {max(head):.1e} over outputs 1-{len(head)}" if head else "")
            + (f"; then {', '.join(f'{d:.1e}' for d in tail)}" if tail else ""))


def test_logprob_drift_shows_the_prefill_output_apart():
    bar = [-1.0] * 12
    got = [-1.5] + [-1.0 - 1e-3 * i for i in range(1, 12)]
    assert _logprob_drift(bar, got, 12) == (
        "output 0 (prefill) 5.0e-01; max 3.0e-03 over outputs 1-3; then "
        + ", ".join(f"{1e-3 * i:.1e}" for i in range(4, 12)))
    assert _logprob_drift(bar, got, 3) == "output 0 (prefill) 5.0e-01; then 1.0e-03, 2.0e-03"
    assert _logprob_drift(bar, got, 0) == "nothing before the divergence"


def _assert_matches(tiny, got, label, metrics, max_tokens=None):
    """``got`` equals the fixture's bar (``tiny["ref"]``); a failure names the requests
    resumed after preemption, the schedule near each divergence and, where the bar has
    log-probabilities (vLLM's plain run, on CUDA), their drift before it."""
    ref, ref_logprobs = tiny["ref"], tiny.get("ref_logprobs")
    resumed = ", ".join(f"{n} tokens after {out}" for n, out in metrics["resumed"])
    want = max_tokens or [NEW_TOKENS] * len(ref)
    try:
        assert_greedy_equal(f"{label} (resumed after preemption: {resumed or 'none'})",
                            PROMPT_LENS, ref, got, want_lens=want)
    except AssertionError as failure:
        near = ""
        for i, (n, r, g, w) in enumerate(zip(PROMPT_LENS, ref, got, want)):
            if g == r[:w]:
                continue
            at = first_difference(r[:w], g)
            near += f"\n  {n} tokens, the steps before output {at}:\n" + _schedule_near(
                n, at, metrics["steps"])
            if ref_logprobs is not None:
                near += "\n    logprob drift: " + _logprob_drift(ref_logprobs[i],
                                                                metrics["logprobs"][i], at)
        stopped = (f" (recording stopped at step {len(metrics['steps'])}: "
                   f"{metrics['trace_error']})" if metrics["trace_error"] else "")
        raise AssertionError(f"{failure}\nSchedule near each divergence{stopped}:{near}") from None


_PROMPTS = _repeating_prompts(VOCAB)


def _blocks(k: int) -> int:
    """Cache blocks (128 tokens) for the two longest requests as admitted (4 + 2
    attention blocks, 1+k Mamba blocks each) plus one: both cross a block boundary
    while decoding, so the second must be preempted."""
    return 2 * (1 + k) + 4 + 2 + 1


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    variant = request.param
    ckpt = tmp_path_factory.mktemp(f"spec_{variant}")
    make_random_hybrid(ckpt, variant, **{**MODEL_KW, "vocab_size": VOCAB},
                       **TINY_VARIANTS[variant])
    ref = _reference_greedy(ckpt, _PROMPTS)
    assert all(len(r) == NEW_TOKENS for r in ref), "tiny reference has a near-tie"
    bar = dict(variant=variant, ckpt=str(ckpt), ref=ref)
    if ON_CUDA:
        bar["ref"], m, _ = _run(ckpt, _PROMPTS, None)
        bar["ref_logprobs"] = m["logprobs"]
    return bar


def _plain_greedy(ckpt, prompts, **engine_kw) -> list[list[int]]:
    """vLLM's greedy outputs without speculation (the bar on CUDA, see module doc)."""
    return _run(ckpt, prompts, None, **engine_kw)[0]


def test_speculative_engine_that_never_drafts_matches_plain_greedy(tiny):
    """A speculative engine whose batch-size schedule drafts at no batch size decodes as
    plain decoding does: the widened conv state, the speculative metadata path (guards 2
    and 3), the graph mode speculation selects and forced preemption, with no draft ever
    verified. On CUDA, where the drafting cases with several requests at once part from
    plain decoding (2026-12-07, docs/lab/2026-12-07-vllm-cuda-8.md), this tells the
    speculative machinery's fault from the drafts' rollback."""
    spec = {"method": NGRAM, "num_speculative_tokens": 2, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1, "num_speculative_tokens_per_batch_size": [[1, 8, 0]]}
    greedy, m, _ = _run(tiny["ckpt"], _PROMPTS, spec, num_gpu_blocks_override=_blocks(2))
    _assert_matches(tiny, greedy, f"{tiny['variant']} speculative engine, no drafts", m)
    assert m["num_drafts"] == 0, m


# 128-token blocks for the control's Llama: the longest request fits alone (5), all eight
# at once do not (16), so requests are preempted.
_LLAMA_BLOCKS = 9


@pytest.mark.parametrize("preempt", [False, True], ids=["roomy", "preempting"])
def test_vllm_llama_speculates_like_its_plain_greedy(tmp_path, preempt):
    """The control for the hybrid cases: vLLM's own Llama (a random teacher of the tiny
    targets' shape, attention only, not the plugin) with n-gram k = 4, the eight prompts at
    once, with and without forced preemption, equals its own plain greedy output. Where a
    hybrid case fails and this passes, the fault is the hybrid's; where this fails too,
    vLLM's speculation itself parts from plain decoding on this machine."""
    ckpt = tmp_path / "llama"
    make_random_llama(ckpt, tokenizer=False, seed=9, scale=4.0,
                      **{**MODEL_KW, "vocab_size": VOCAB, "tie_word_embeddings": True})
    spec = {"method": NGRAM, "num_speculative_tokens": 4, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    cache = {"num_gpu_blocks_override": _LLAMA_BLOCKS} if preempt else {}
    plain = _plain_greedy(ckpt, _PROMPTS, **cache)
    greedy, m, preemptions = _run(ckpt, _PROMPTS, spec, **cache)
    assert m["num_accepted_tokens"] > 0, m
    assert (preemptions > 0) == preempt, preemptions
    try:
        assert_greedy_equal("vLLM's Llama, ngram k=4", PROMPT_LENS, plain, greedy)
    except AssertionError as failure:   # a near-tie flip, or a real fault?
        raise AssertionError(f"{failure}\n{_llama_margins(ckpt, plain, greedy)}") from None


def _llama_margins(ckpt, plain, greedy) -> str:
    """For each prompt the two runs part on: the float32 Llama's logit of plain decoding's
    token minus that of the speculative run's, where they part."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    lines = []
    with torch.no_grad():
        for n, prompt, p, g in zip(PROMPT_LENS, _PROMPTS, plain, greedy):
            if p == g:
                continue
            at = first_difference(p, g)
            if at >= min(len(p), len(g)):
                lines.append(f"  {n} tokens: {len(p)} plain outputs, {len(g)} speculative")
                continue
            logits = model(torch.tensor([prompt + p[:at]])).logits[0, -1]
            lines.append(f"  {n} tokens at output {at}: plain's token leads by "
                         f"{float(logits[p[at]] - logits[g[at]]):.3g} logits")
    return "reference margins:\n" + "\n".join(lines)


@pytest.mark.parametrize("k", [2, 4])
def test_ngram_matches_plain_greedy(tiny, k):
    spec = {"method": NGRAM, "num_speculative_tokens": k, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    greedy, m, preemptions = _run(tiny["ckpt"], _PROMPTS, spec, num_gpu_blocks_override=_blocks(k))
    _assert_matches(tiny, greedy, f"{tiny['variant']} ngram k={k}", m)
    assert preemptions >= 1, "the small cache did not force a preemption"
    assert 0 < m["acceptance_rate"] < 1, m
    if tiny["variant"] == "mamba1":  # its outputs loop: drafts accepted at every position
        assert len(m["accepted_per_position"]) == k and min(m["accepted_per_position"]) > 0, m


def drop_counts_on_steps_without_drafts(worker) -> None:
    """Runs in vLLM's worker: from now on the Mamba builder gets the accepted-token counts
    only on steps where some request has drafts, as vLLM 0.26's runner passes them (0.32,
    the CPU engine, on every step); steps without counts after an acceptance are counted."""
    from vllm_mamba_hybrid.model_executor.mamba_metadata import HybridMamba2MetadataBuilder

    builder_cls, inner = HybridMamba2MetadataBuilder, HybridMamba2MetadataBuilder.build
    builder_cls.dropped_after_acceptance = 0

    # vLLM 0.26's runner passes every argument by keyword: keep vLLM's parameter names.
    def build(self, common_prefix_len, common_attn_metadata, fast_build=False, **kwargs):
        num_reqs = common_attn_metadata.num_reqs
        drafts = kwargs.get("num_decode_draft_tokens_cpu")   # 0.26: none on such steps either
        if drafts is None or not bool((drafts[:num_reqs] > 0).any()):   # no drafts at all
            accepted = kwargs.pop("num_accepted_tokens", None)
            if accepted is None:   # vLLM 0.26 itself: the counts the guard keeps
                accepted = self._accepted_buffer
            if accepted is not None:
                builder_cls.dropped_after_acceptance += bool((accepted[:num_reqs] > 1).any())
        return inner(self, common_prefix_len, common_attn_metadata, fast_build, **kwargs)

    builder_cls.build = build


def steps_dropped_after_acceptance(worker) -> int:
    from vllm_mamba_hybrid.model_executor.mamba_metadata import HybridMamba2MetadataBuilder

    return HybridMamba2MetadataBuilder.dropped_after_acceptance


def test_ngram_steps_without_drafts_resume_from_accepted_state(tiny):
    """A step where no request has drafts, right after one that accepted some: the Mamba
    layers must resume from the last accepted token's state (vLLM 0.26's runner passes no
    accepted counts on such steps; mamba_metadata.py, guard 3). The CPU engine runs 0.32's
    runner, so the 0.26 behaviour is put into its worker."""
    k = 4
    spec = {"method": NGRAM, "num_speculative_tokens": k, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    # One request a step: a step has no drafts whenever its n-gram lookup finds no match.
    greedy, m, _ = _run(tiny["ckpt"], _PROMPTS, spec, max_num_seqs=1, in_worker=(
        drop_counts_on_steps_without_drafts, steps_dropped_after_acceptance))
    assert m["worker"] > 0, "no step without drafts followed an acceptance: nothing was checked"
    _assert_matches(tiny, greedy, f"{tiny['variant']} ngram k={k}, 0.26 runner", m)


def count_undrafted_rows(worker) -> None:
    """Runs in vLLM's worker: counts the steps whose Mamba metadata carries recompute
    chunks run as decode rows without drafts (mamba_metadata.py, guard 4)."""
    from vllm_mamba_hybrid.model_executor.mamba_metadata import HybridMamba2MetadataBuilder

    builder_cls, inner = HybridMamba2MetadataBuilder, HybridMamba2MetadataBuilder.build
    builder_cls.undrafted_steps = 0

    def build(self, *args, **kwargs):
        md = inner(self, *args, **kwargs)
        builder_cls.undrafted_steps += md.undrafted_rows is not None
        return md

    builder_cls.build = build


def undrafted_steps(worker) -> int:
    from vllm_mamba_hybrid.model_executor.mamba_metadata import HybridMamba2MetadataBuilder

    return HybridMamba2MetadataBuilder.undrafted_steps


@pytest.mark.parametrize("outputs", [2, 4])
def test_recompute_tail_resumes_from_its_last_token(tiny, outputs):
    """A request preempted after ``outputs`` tokens recomputes prompt + outputs; with the
    prompt exactly one chunk, its outputs form a chunk of 2..1+k tokens past the prompt,
    which vLLM runs as a decode row without drafts: the next step must resume from the
    chunk's last token (mamba_metadata.py, guard 4; without it the output repeats a token
    right after the resumption). Preemption is forced by resetting the running requests."""
    from vllm import LLM, SamplingParams

    k, new = 4, 24
    prompt = _PROMPTS[-1][:ENGINE_KW["max_num_batched_tokens"]]
    # The reference model, cut before its first near-tie (on CUDA too: one prompt only).
    ref = _reference_greedy(tiny["ckpt"], [prompt])[0][:new]
    spec = {"method": NGRAM, "num_speculative_tokens": k, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    llm = LLM(tiny["ckpt"], **{**ENGINE_KW, **ENGINE_MODES[DEFAULT_MODE]}, speculative_config=spec)
    try:
        llm.collective_rpc(count_undrafted_rows)
        engine = llm.llm_engine
        engine.add_request("r", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=len(ref), temperature=0, ignore_eos=True))
        got, resumed_after = [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                got = list(out.outputs[0].token_ids)
            if resumed_after is None and len(got) >= outputs:
                resumed_after = len(got)
                llm.reset_prefix_cache(reset_running_requests=True)   # preempt it now
        steps = llm.collective_rpc(undrafted_steps)[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    assert 2 <= resumed_after <= 1 + k, f"preempted after {resumed_after} outputs, not 2..1+k"
    assert steps > 0, "no recompute chunk ran as a decode row: nothing was checked"
    assert_greedy_equal(f"{tiny['variant']} resumed after {resumed_after} outputs", [len(prompt)],
                        [ref], [got])


@pytest.mark.parametrize("method", [NGRAM, "custom_class"])
def test_batch_size_schedule_matches_plain_greedy(tiny, method, monkeypatch):
    """vLLM's dynamic speculation (``num_speculative_tokens_per_batch_size``): k = 4
    while at most 3 requests are scheduled, none above; vLLM's n-gram proposer and the
    project's draft proposer (the target as its own draft: drafts accepted) both follow
    it. The requests stop at different lengths, so the batch shrinks and rows that
    decoded without drafts go on with them: the mixers' state must carry over."""
    spec = {"method": method, "num_speculative_tokens": 4,
            "num_speculative_tokens_per_batch_size": [[1, 3, 4], [4, 8, 0]]}
    if method == NGRAM:
        spec.update(prompt_lookup_max=3, prompt_lookup_min=1)
    else:
        spec["model"] = DRAFT_CLASS
        monkeypatch.setenv("VLLM_MAMBA_HYBRID_DRAFT", tiny["ckpt"])
    max_tokens = [NEW_TOKENS - 7 * i for i in range(len(_PROMPTS))]
    greedy, m, _ = _run(tiny["ckpt"], _PROMPTS, spec, max_tokens=max_tokens)
    _assert_matches(tiny, greedy, f"{tiny['variant']} {method} by batch size", m,
                    max_tokens)
    assert m["num_drafts"] > 0, m   # the batch's tail speculated
    if method == "custom_class":    # its own greedy: every draft accepted
        assert m["acceptance_rate"] == 1.0, m
    elif tiny["variant"] == "mamba1":  # its outputs loop: drafts are accepted
        assert m["acceptance_rate"] > 0, m


def test_draft_proposer(tiny, tmp_path, monkeypatch):
    """mamba2: a slightly perturbed copy of the target as draft, so drafts are accepted
    and rejected at every position (the mixers' rollback); mamba1: the target itself,
    so near-full acceptance checks the proposer's prefix-keyed draft state."""
    variant = tiny["variant"]
    k = 4 if variant == "mamba2" else 3
    draft = tiny["ckpt"]
    if variant == "mamba2":
        draft = tmp_path / "draft"
        kw = dict(TINY_VARIANTS[variant])
        kw["scale"] *= 0.97
        make_random_hybrid(draft, variant, **{**MODEL_KW, "vocab_size": VOCAB}, **kw)
    monkeypatch.setenv("VLLM_MAMBA_HYBRID_DRAFT", str(draft))
    spec = {"method": "custom_class", "model": DRAFT_CLASS, "num_speculative_tokens": k}
    greedy, m, preemptions = _run(tiny["ckpt"], _PROMPTS, spec, num_gpu_blocks_override=_blocks(k))
    _assert_matches(tiny, greedy, f"{variant} draft k={k}", m)
    assert preemptions >= 1, "the small cache did not force a preemption"
    if variant == "mamba2":
        assert 0 < m["acceptance_rate"] < 1, m
        assert len(m["accepted_per_position"]) == k and min(m["accepted_per_position"]) > 0, m
    else:  # every draft is right unless the proposer resumed from a wrong state
        assert m["acceptance_rate"] > 0.95, m
        assert m["mean_accepted_length"] > k, m


# ---- SmolLM2-derived hybrid with a layer-subset draft of the teacher ---------------------
@pytest.fixture(scope="module")
def smollm2_pair(smollm2_teacher, shared_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from vllm_mamba_hybrid.conversion.draft import make_layer_subset_draft
    from vllm_mamba_hybrid.conversion.init import (
        hybrid_config_from_teacher,
        init_hybrid_from_teacher,
        save_hybrid,
    )
    from vllm_mamba_hybrid.conversion.teacher import load_teacher
    from vllm_mamba_hybrid.spec_decode.draft_vocab import make_draft_vocab

    root = tmp_path_factory.mktemp("smollm2_spec")
    teacher = load_teacher(smollm2_teacher)
    n = teacher.config.num_hidden_layers
    cfg = hybrid_config_from_teacher(teacher.config, variant="mamba2",
                                     attn_layers=list(range(1, n, 2)))
    torch.manual_seed(0)
    hybrid = init_hybrid_from_teacher(teacher, cfg)
    target = save_hybrid(hybrid.to(torch.bfloat16), root / "target", tokenizer_dir=smollm2_teacher)
    del teacher, hybrid
    draft = make_layer_subset_draft(smollm2_teacher, root / "draft", layers=[0, 1, 2, 29])
    cut = root / "draft-cut"   # the same draft, its head cut to the essays' 4096 commonest tokens
    shutil.copytree(draft, cut)
    make_draft_vocab(cut, 4096, [str(shared_dir / "data" / "essays")])
    tok = AutoTokenizer.from_pretrained(smollm2_teacher)
    text = (shared_dir / "data" / "essays").glob("*.txt")
    words = " ".join(p.read_text(encoding="utf-8") for p in sorted(text)[:2]).split()
    prompts, start = [], 0
    for n_words in (2, 5, 12, 30, 60, 90, 150, 240):
        prompts.append(tok(" ".join(words[start:start + n_words]))["input_ids"])
        start += n_words
    ref = _reference_greedy(target, prompts, min_gap=2e-3)
    if ON_CUDA:
        ref = [plain[:len(r)] for r, plain in zip(ref, _plain_greedy(target, prompts,
                                                                     max_model_len=512))]
    return dict(target=str(target), draft=str(draft), cut=str(cut), prompts=prompts, ref=ref)


@pytest.mark.parametrize("head", ["draft", "cut"])
def test_smollm2_hybrid_with_layer_subset_draft(smollm2_pair, head, monkeypatch):
    """The full head, and the head cut by draft_vocab.json: both plain greedy's tokens."""
    k = 4
    monkeypatch.setenv("VLLM_MAMBA_HYBRID_DRAFT", smollm2_pair[head])
    spec = {"method": "custom_class", "model": DRAFT_CLASS, "num_speculative_tokens": k}
    greedy, m, _ = _run(smollm2_pair["target"], smollm2_pair["prompts"], spec,
                        max_model_len=512)
    for i, (r, g) in enumerate(zip(smollm2_pair["ref"], greedy)):
        assert g[:len(r)] == r, f"prompt {i} diverged:\nref  {r}\nspec {g}"
    assert sum(len(r) for r in smollm2_pair["ref"]) > 4 * NEW_TOKENS, "too many near-ties"
    assert m["num_drafts"] > 0 and m["num_accepted_tokens"] > 0, m


# ---- server ---------------------------------------------------------------------------
def test_server_with_ngram_speculation_answers_concurrent_requests(tmp_path):
    ckpt = tmp_path / "served"
    make_random_hybrid(ckpt, "mamba2", **MODEL_KW, **VARIANTS["mamba2"], tokenizer=True)
    prompts = _repeating_prompts(MODEL_KW["vocab_size"], seed=9)
    ref = _reference_greedy(ckpt, prompts)
    if ON_CUDA:
        ref = _plain_greedy(ckpt, prompts)
    spec = {"method": NGRAM, "num_speculative_tokens": 3, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1}
    eager = ["--enforce-eager"] if ENGINE_MODES[DEFAULT_MODE]["enforce_eager"] else []
    with running_server(ckpt, tmp_path / "server.log", "--dtype", "float32", *eager,
                        "--gpu-memory-utilization", "0.2", "--max-model-len", "1024",
                        "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--block-size", "128",
                        "--served-model-name", "hybrid", "--speculative-config", json.dumps(spec)) as base:
        def complete(p):
            r = httpx.post(f"{base}/v1/completions", timeout=300, json={
                "model": "hybrid", "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True})
            r.raise_for_status()
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(complete, prompts))
        for p, r, got in zip(prompts, ref, answers):
            assert got[:len(r)] == r, f"prompt of {len(p)} tokens:\nref  {r}\nspec {got}"
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        accepted = [line for line in metrics.splitlines()
                    if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) >= 0


# ---- refused setups ---------------------------------------------------------------------
def test_draft_model_method_is_refused_with_a_pointer_to_the_own_proposer(tmp_path):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    make_random_hybrid(tmp_path, "mamba2", **MODEL_KW)
    args = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32",
                      enforce_eager=True, max_model_len=256,
                      speculative_config={"method": "draft_model", "model": str(tmp_path),
                                          "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="HybridDraftProposer"):
        args.create_engine_config()


# ---- CUDA graphs --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
def test_speculation_keeps_the_mixers_out_of_full_graphs(tmp_path, k):
    """vLLM's graph-mode resolution with the hybrid's Mamba backend (mamba_metadata.py,
    guard 2): full decode graphs without speculation; with it, piecewise graphs only (a
    prompt chunk of 1 + k tokens would replay the decode graph and skip its prefill)."""
    from vllm.config import CompilationConfig, CUDAGraphMode
    from vllm.config.compilation import CompilationMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from vllm_mamba_hybrid.model_executor.mamba_metadata import HybridMamba2MetadataBuilder

    load_general_plugins()   # adds the mixers' ops to vLLM's graph split points
    make_random_hybrid(tmp_path, "mamba2", **MODEL_KW)
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3,
            "prompt_lookup_min": 1} if k else None
    vllm_config = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, dtype="float32",
                             enforce_eager=True, max_model_len=256,
                             speculative_config=spec).create_engine_config()
    support = HybridMamba2MetadataBuilder.get_cudagraph_support(vllm_config, None)
    # What vLLM resolves on CUDA, where its default mode splits the graph at these ops.
    compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                                    cudagraph_mode="FULL_AND_PIECEWISE",
                                    splitting_ops=list(CompilationConfig._attention_ops))
    mode = compilation.resolve_cudagraph_mode_and_sizes(support, "HybridMamba2Backend", 1 + k)
    assert mode == (CUDAGraphMode.PIECEWISE if k else CUDAGraphMode.FULL_AND_PIECEWISE)
