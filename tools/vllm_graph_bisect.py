"""Which part of vLLM's graph mode parts a hybrid from its reference? (CUDA diagnosis)

On the H100 (vLLM 0.26, 2026-12-07) `test_chunked_prefill_batch_matches_reference` failed in
graph mode for both variants (the 1-token prompt wrong from its first token) while eager
mode and graph mode under forced preemption passed. The likely cause, reproduced on the CPU
engine with a stale state block, is fixed in ``mamba_metadata.py``; this checks it on the
GPU. It runs that test's case (same checkpoints, prompts, engine settings, reference, and
Mamba state blocks filled with noise first) under one engine setting after another and
prints, for every prompt, where its greedy tokens leave the reference and how far its
prompt logprobs are off:

* ``eager`` / ``graphs``: the test's two modes;
* ``piecewise``, ``full-decode``, ``compile-only``: one of vLLM's CUDA-graph modes at a time
  (``cudagraph_mode`` PIECEWISE, FULL_DECODE_ONLY, NONE), torch.compile on;
* ``eager-clean``: eager, without the noise the others put into every Mamba state block
  before the first request (as CUDA-graph capture or earlier requests leave them): a path
  that reads state it should not diverges in the others, not here;
* ``graphs-trace``: graph mode, and the first Mamba layer's metadata of its first eager
  calls printed (decode/prefill split, state blocks, initial-state flags, and how far from
  zero the prefill rows' state blocks are before the step): what the mixer was told.

    python3 tools/vllm_graph_bisect.py --variants mamba1 --settings eager-clean graphs piecewise
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.model_executor import test_vllm_engine as engine_test  # noqa: E402
from tests.utils import first_difference  # noqa: E402

SETTINGS = {
    "eager": dict(enforce_eager=True),
    "eager-clean": dict(enforce_eager=True),
    "graphs": dict(enforce_eager=False),
    "piecewise": dict(enforce_eager=False, compilation_config={"cudagraph_mode": "PIECEWISE"}),
    "full-decode": dict(enforce_eager=False,
                        compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"}),
    "compile-only": dict(enforce_eager=False, compilation_config={"cudagraph_mode": "NONE"}),
    "graphs-trace": dict(enforce_eager=False),
}
TRACED_CALLS = 4


def trace_first_mixer(worker) -> int:
    """Runs in vLLM's worker: from now on, the first Mamba layer records what its first
    ``TRACED_CALLS`` eager calls were told (graph replays run no Python)."""
    from vllm_mamba_hybrid.model_executor import mixers

    cls = mixers._HybridMambaMixer
    original = cls._metadata
    cls.trace, first = [], []

    def as_list(t):
        return None if t is None else t.tolist()

    def traced(self):
        md = original(self)
        if md is not None and len(cls.trace) < TRACED_CALLS and first in ([], [self.prefix]):
            first[:] = [self.prefix]
            conv, ssm = self._states()
            rows = [] if md.state_indices_tensor_p is None else md.state_indices_tensor_p.tolist()
            cls.trace.append(dict(
                decodes=md.num_decodes, prefills=md.num_prefills,
                decode_tokens=md.num_decode_tokens, prefill_tokens=md.num_prefill_tokens,
                query_start_loc_p=as_list(md.query_start_loc_p),
                has_initial_states_p=as_list(md.has_initial_states_p),
                prep_initial_states=getattr(md, "prep_initial_states", None),
                state_blocks_p=rows, state_blocks_d=as_list(md.state_indices_tensor_d),
                state_abs_max_p=[(float(conv[i].abs().max()), float(ssm[i].abs().max()))
                                 for i in rows]))
        return md

    cls._metadata = traced
    return 1


def mixer_trace(worker) -> list[dict]:
    from vllm_mamba_hybrid.model_executor import mixers
    return mixers._HybridMambaMixer.trace


def run_setting(case: dict, setting: str) -> str:
    from vllm import LLM, SamplingParams

    llm = LLM(case["ckpt"], **engine_test.ENGINE_KW, **SETTINGS[setting])
    try:
        if setting != "eager-clean":
            assert llm.collective_rpc(engine_test.fill_mamba_state_with_noise)[0] > 0
        if setting == "graphs-trace":
            llm.collective_rpc(trace_first_mixer)
        inputs = [{"prompt_token_ids": p} for p in case["prompts"]]
        outs = llm.generate(inputs, SamplingParams(max_tokens=engine_test.NEW_TOKENS,
                                                   temperature=0, ignore_eos=True))
        if setting == "graphs-trace":
            for call in llm.collective_rpc(mixer_trace)[0]:
                print("  trace", call, flush=True)
        lp_outs = llm.generate(inputs, SamplingParams(max_tokens=1, temperature=0,
                                                      prompt_logprobs=0))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    cells = []
    for n, ref, out, ref_lp, lp_out, prompt in zip(engine_test.PROMPT_LENS, case["greedy"], outs,
                                                   case["logprobs"], lp_outs, case["prompts"]):
        got = list(out.outputs[0].token_ids)
        where = "=" if got == ref else f"@{first_difference(ref, got)}"
        lp = torch.tensor([pos[tok].logprob for pos, tok in zip(lp_out.prompt_logprobs[1:],
                                                                prompt[1:])])
        err = (lp - ref_lp).abs().max().item() if n > 1 else 0.0
        cells.append(f"{n}:{where}/{err:.0e}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=sorted(engine_test.VARIANTS),
                   default=sorted(engine_test.VARIANTS))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = p.parse_args(argv)
    print("per prompt: length:(= equal | @first differing token)/max prompt-logprob error",
          flush=True)
    for variant in args.variants:
        case = engine_test._reference_case(variant, Path(tempfile.mkdtemp()) / variant)
        for setting in args.settings:
            t0 = time.time()
            try:
                row = run_setting(case, setting)
            except Exception as e:  # one setting failing to start must not hide the others
                row = f"ERROR {type(e).__name__}: {str(e)[:300]}"
            print(f"{variant:<7} {setting:<13} {time.time() - t0:5.0f} s  {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
