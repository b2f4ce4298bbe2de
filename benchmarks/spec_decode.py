"""Speculative decoding of a SmolLM2-derived hybrid on the vLLM CPU engine.

Runs the same greedy batch several ways, each in a fresh engine: plain decoding,
plain decoding without async scheduling (``plain-sync``: vLLM turns async scheduling
off for n-gram and ``custom_class`` speculation, so this isolates what that costs),
n-gram speculation, n-gram speculation only while at most ``--spec-max-batch``
requests are scheduled (``ngram-sched``: vLLM's ``num_speculative_tokens_per_batch_size``;
verifying k extra tokens a row costs more than it saves once the cores are busy) and
the project's draft-model proposer (a layer subset of the teacher,
``conversion.draft.make_layer_subset_draft``). Reports output tokens/s, speed-up over
plain, acceptance rate, mean accepted length (tokens per verify step, bonus included)
and whether the outputs equal plain decoding's. ``--staggered`` gives request i of B
``max_tokens * (i + 1) / B`` tokens, so the batch shrinks as requests finish (a server's
batch is rarely constant).

Target: the distilled demo hybrid (runs/demo-distill/export) when present, else a
50% Mamba2 hybrid initialised from the teacher (undistilled: low acceptance).

Usage: python benchmarks/spec_decode.py --out results.json [--k 4] [--max-tokens 128]
       [--num-prompts 8 (= batch)] [--draft DIR]
       [--modes plain,plain-sync,ngram,ngram-sched,draft]
       [--spec-max-batch 2] [--staggered]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from distillation.paths import default_data_dir

REPO = Path(__file__).resolve().parents[1]
DATA = default_data_dir()
DEMO = REPO / "runs" / "demo-distill"
MODES = ("plain", "plain-sync", "ngram", "ngram-sched", "draft")


def prepare(work: Path, target: str | None, teacher: str | None, layers: list[int],
            draft: str | None = None):
    """(target dir, draft dir, teacher dir), building what is missing under work."""
    from vllm_mamba_hybrid.conversion.draft import make_layer_subset_draft
    from vllm_mamba_hybrid.conversion.teacher import import_teacher

    if teacher is None:
        teacher = DEMO / "teacher" if (DEMO / "teacher" / "config.json").exists() else None
    if teacher is None:
        teacher = work / "teacher"
        if not (teacher / "config.json").exists():
            import_teacher(None, teacher)
    if target is None and (DEMO / "export" / "config.json").exists():
        target = DEMO / "export"
    if target is None:
        target = work / "target"
        if not (target / "config.json").exists():
            import torch

            from vllm_mamba_hybrid.conversion.init import (
                hybrid_config_from_teacher,
                init_hybrid_from_teacher,
                save_hybrid,
            )
            from vllm_mamba_hybrid.conversion.teacher import load_teacher
            t = load_teacher(teacher)
            n = t.config.num_hidden_layers
            torch.manual_seed(0)
            cfg = hybrid_config_from_teacher(t.config, variant="mamba2",
                                             attn_layers=list(range(1, n, 2)))
            save_hybrid(init_hybrid_from_teacher(t, cfg), target, tokenizer_dir=teacher)
    if draft is not None:
        return Path(target), Path(draft), Path(teacher)
    draft = work / ("draft-" + "-".join(map(str, layers)))
    if not (draft / "config.json").exists():
        make_layer_subset_draft(teacher, draft, layers)
    return Path(target), draft, Path(teacher)


def prompts(tokenizer_dir: Path, n: int) -> list[list[int]]:
    """Chat-formatted AlpacaEval instructions as token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in
            (DATA / "alpaca_eval_prompts.jsonl").read_text().splitlines()[:n]]
    return [tok.apply_chat_template([{"role": "user", "content": r["instruction"]}],
                                    add_generation_prompt=True, tokenize=True, return_dict=False)
            for r in rows]


def max_tokens_per_request(max_tokens: int, n: int, staggered: bool) -> list[int]:
    """Each request's length: all ``max_tokens``, or staggered so the batch shrinks."""
    return [max(1, max_tokens * (i + 1) // n) if staggered else max_tokens for i in range(n)]


def run(mode: str, target: Path, draft: Path, batch: list[list[int]], k: int,
        max_tokens: list[int], dtype: str = "float32", spec_max_batch: int = 2) -> dict:
    from vllm import LLM, SamplingParams

    from vllm_mamba_hybrid.spec_decode import spec_decode_metrics

    spec = None
    if mode in ("ngram", "ngram-sched"):
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
        if mode == "ngram-sched":
            # vLLM carries the last range's k on to every larger batch
            spec["num_speculative_tokens_per_batch_size"] = [
                [1, spec_max_batch, k], [spec_max_batch + 1, spec_max_batch + 1, 0]]
    elif mode == "draft":
        os.environ["VLLM_MAMBA_HYBRID_DRAFT"] = str(draft)
        spec = {"method": "custom_class", "num_speculative_tokens": k,
                "model": "vllm_mamba_hybrid.spec_decode.HybridDraftProposer"}
    sync = {"async_scheduling": False} if mode == "plain-sync" else {}
    llm = LLM(str(target), dtype=dtype, enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=1024, max_num_seqs=len(batch), enable_prefix_caching=False,
              disable_log_stats=False, skip_tokenizer_init=True, speculative_config=spec, **sync)
    try:
        params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in max_tokens]
        llm.generate([{"prompt_token_ids": batch[0]}], SamplingParams(max_tokens=8,
                                                                      temperature=0))  # warm-up
        before = spec_decode_metrics(llm)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
        seconds = time.perf_counter() - t0
        after = spec_decode_metrics(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    drafts = after["num_drafts"] - before["num_drafts"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    return {
        "mode": mode, "k": k if spec else 0, "seconds": seconds,
        "output_tokens": sum(map(len, tokens)),
        "tokens_per_s": sum(map(len, tokens)) / seconds,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/mamba_hybrid_spec_bench")
    ap.add_argument("--target")
    ap.add_argument("--teacher")
    ap.add_argument("--draft", help="draft dir (default: a layer subset of the teacher)")
    ap.add_argument("--draft-layers", default="0,1,2,29")
    ap.add_argument("--modes", default="plain,ngram,draft",
                    help="plain must come first; also plain-sync, ngram-sched")
    ap.add_argument("--spec-max-batch", type=int, default=2,
                    help="ngram-sched: speculate while at most this many requests are scheduled")
    ap.add_argument("--staggered", action="store_true",
                    help="request i of B gets max_tokens * (i + 1) / B tokens")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown or modes[0] != "plain":
        ap.error(f"--modes: plain first, then any of {', '.join(MODES)} (got {args.modes})")
    if args.spec_max_batch < 1:
        ap.error(f"--spec-max-batch must be at least 1, got {args.spec_max_batch}")
    layers = [int(i) for i in args.draft_layers.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    target, draft, teacher = prepare(work, args.target, args.teacher, layers, args.draft)
    batch = prompts(teacher, args.num_prompts)
    max_tokens = max_tokens_per_request(args.max_tokens, len(batch), args.staggered)
    results = [run(mode, target, draft, batch, args.k, max_tokens, args.dtype, args.spec_max_batch)
               for mode in modes]
    plain = results[0]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
        r["same_outputs_as_plain"] = r["tokens"] == plain["tokens"]
    cores = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "default")
    header = (f"target {target}  draft {draft}  {len(batch)} prompts x "
              f"{'up to ' if args.staggered else ''}{args.max_tokens} tokens, "
              f"vllm-cpu {args.dtype}, batch {len(batch)}, reserved CPUs {cores}")
    print(header)
    print(f"{'mode':<12}{'k':>3}{'tok/s':>9}{'speedup':>9}{'accept':>8}{'mean len':>10}"
          f"{'same as plain':>15}")
    for r in results:
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        mal = "-" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        print(f"{r['mode']:<12}{r['k']:>3}{r['tokens_per_s']:>9.1f}{r['speedup']:>9.2f}"
              f"{acc:>8}{mal:>10}{str(r['same_outputs_as_plain']):>15}")
    Path(args.out).write_text(json.dumps({
        "target": str(target), "draft": str(draft), "draft_layers": None if args.draft else layers,
        "dtype": args.dtype, "reserved_cpus": cores, "cpus": os.cpu_count(),
        "num_prompts": len(batch), "max_tokens": args.max_tokens, "staggered": args.staggered,
        "spec_max_batch": args.spec_max_batch,
        "results": [{k: v for k, v in r.items() if k != "tokens"} for r in results]}, indent=2))


if __name__ == "__main__":
    main()
