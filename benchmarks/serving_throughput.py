"""Serving throughput in vLLM: a Llama teacher against its Mamba hybrids, one run.

Every model (the teacher; 50% and 25% attention hybrids, Mamba2 and Mamba1) gets one
engine in its own subprocess with the same settings and the same KV-cache budget in
bytes. For every context length L:

* TTFT: one L-token request alone, seconds to its first token (after an untimed
  warm-up of two L-token requests, so first-use kernel compiles stay out);
* the batch: as many L-token requests as the largest offered batch, or as vLLM says
  fit the budget at that length if fewer ("fit" column), or as ``--max-prefill-tokens``
  allows (a bound on run time), added at once ("running" column). Prefill:
  seconds until all have their first token, and prompt tokens/s over that time.
  Decode: output tokens/s over steps where every request decodes (after the last first
  token), measured at the largest batch, then again after aborting requests down to
  each smaller offered batch (the contexts stay ~L: one prefill serves every batch).

``--profile CTX:BATCH``: after that cell's timed decode, a few more decode steps run under
the torch profiler inside vLLM's worker, and the device time per step is split into
attention, Mamba scan / state update, conv, GEMM and other kernels (on the CPU engine: op
self time), with the top kernels: where a hybrid's decode step spends what it saves.

Prompts are bytes of the shared essays as token ids (real text, real lengths).
Shapes: ``smollm2`` (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, vocab 49152) and
``llama3-8b`` (32 layers, hidden 4096, 32/8 heads, MLP 14336, vocab 128256). Weights:
with ``--teacher DIR`` the real teacher and hybrids initialised from it (attention ->
Mamba); otherwise random bf16, drawn by vLLM's dummy loader on the device (no files).

    python benchmarks/serving_throughput.py --out R.json             # CPU engine, eager
    python3 benchmarks/serving_throughput.py --shape llama3-8b \\
        --contexts 1024 8192 32768 --batches 1 16 64 256 --out R.json # CUDA, graphs
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from distillation.paths import default_data_dir

DATA = default_data_dir()
SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, max_position_embeddings=65536, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=65536, tie_word_embeddings=False,
                      rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2),
}
MODELS = {  # name -> (mamba variant, attention fraction); None = the teacher
    "teacher": None,
    "mamba2-50%": ("mamba2", 0.5),
    "mamba2-25%": ("mamba2", 0.25),
    "mamba1-50%": ("mamba1", 0.5),
    "mamba1-25%": ("mamba1", 0.25),
}
WARM_STEPS, TIMED_STEPS = 4, 32  # decode steps skipped / timed at each batch size


# ---- checkpoints -----------------------------------------------------------------
def hybrid_config(name: str, base: dict):
    from vllm_mamba_hybrid import LlamaMambaHybridConfig
    from vllm_mamba_hybrid.config import paper_attention_layers

    variant, fraction = MODELS[name]
    return LlamaMambaHybridConfig(
        **base, mamba_variant=variant,
        attn_layers=paper_attention_layers(base["num_hidden_layers"], fraction))


def build_checkpoint(name: str, root: Path, shape: dict, teacher: Path | None,
                     weights: bool) -> Path:
    """The model directory for ``name`` under root (reused when already there): the
    real teacher / hybrids initialised from it, random bf16 weights, or (``weights``
    False) config.json alone for vLLM's dummy loader."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / name.replace("%", "")
    if (out / "config.json").exists():
        return out
    if teacher is not None:
        from vllm_mamba_hybrid.conversion.init import (
            hybrid_config_from_teacher,
            init_hybrid_from_teacher,
            save_hybrid,
        )
        from vllm_mamba_hybrid.conversion.teacher import load_teacher
        if MODELS[name] is None:
            return teacher
        model = load_teacher(teacher)
        variant, fraction = MODELS[name]
        cfg = hybrid_config_from_teacher(model.config, variant=variant, attn_fraction=fraction)
        torch.manual_seed(0)
        hybrid = init_hybrid_from_teacher(model, cfg)
        return save_hybrid(hybrid.to(torch.bfloat16), out, tokenizer_dir=teacher)
    config = LlamaConfig(**shape) if MODELS[name] is None else hybrid_config(name, shape)
    if not weights:
        out.mkdir(parents=True)
        config.torch_dtype = "bfloat16"
        config.save_pretrained(out)
        return out
    torch.manual_seed(0)
    if MODELS[name] is None:
        model = LlamaForCausalLM(config)
    else:
        from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM
        model = LlamaMambaHybridForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def exact_cache_bytes(model_dir: Path, context: int) -> int:
    """KV bytes of the attention layers + Mamba state bytes (bf16 KV/conv, fp32 SSM)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_per_token = 2 * cfg["num_key_value_heads"] * head_dim * 2
    if cfg.get("model_type") != "llama_mamba_hybrid":
        return layers * kv_per_token * context
    attn = len(cfg["attn_layers"])
    conv_dim = (cfg["d_inner"] + 2 * cfg["d_xb"] if cfg["mamba_variant"] == "mamba2"
                else (cfg["d_inner"] if cfg["repeat_kv_before_conv"] else cfg["d_xb"]))
    conv = (cfg["d_conv"] - 1) * conv_dim * 2
    ssm = cfg["d_inner"] * cfg["d_state"] * 4
    return attn * kv_per_token * context + (layers - attn) * (conv + ssm)


def essay_prompts(batch: int, context: int, vocab: int) -> list[list[int]]:
    """``batch`` different essay passages of ``context`` tokens. Random-weight models have
    no tokenizer, so a token is a byte of the text (ids 3..258): real text, real length.
    Longer than the essays, a passage wraps around."""
    text = "\n\n".join(p.read_text(encoding="utf-8")
                       for p in sorted((DATA / "essays").glob("*.txt")))
    data = text.encode("utf-8")
    assert vocab > 259, "the vocabulary must hold the 256 byte ids"
    step = max(1, len(data) // batch)
    return [[3 + data[(i * step + j) % len(data)] for j in range(context)] for i in range(batch)]


# ---- one model (subprocess) ------------------------------------------------------------
def _max_concurrency(worker, lengths: list[int]) -> dict[int, float]:
    """Runs in vLLM's worker: how many requests of each length fit its KV cache, by
    vLLM's own rule (the number it logs for max_model_len)."""
    import copy

    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    out = {}
    for length in lengths:
        config = copy.copy(worker.vllm_config)
        config.model_config = copy.copy(config.model_config)
        config.model_config.max_model_len = length
        out[length] = get_max_concurrency_for_kv_cache_config(
            config, worker.model_runner.kv_cache_config)
    return out


# Kernel / op name -> what it does; first match wins (names of vLLM 0.26-0.32, cuBLAS, torch).
PROFILE_CATEGORIES = (
    ("mamba", re.compile(r"selective_state_update|selective_scan|ssd|chunk_scan|chunk_state|"
                         r"state_passing|bmm_chunk|chunk_cumsum|mamba|ssm|softplus", re.I)),
    ("conv", re.compile(r"causal_conv1d|conv1d|short_conv", re.I)),
    ("attention", re.compile(r"attn|attention|flash|fmha|paged|reshape_and_cache|kv_cache", re.I)),
    ("gemm", re.compile(r"gemm|matmul|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|linear)$|"
                        r"onednn|mkl", re.I)),
)
PROFILE_STEPS = 8


def profile_category(name: str) -> str:
    return next((cat for cat, rx in PROFILE_CATEGORIES if rx.search(name)), "other")


def _profile_start(worker) -> None:
    """Runs in vLLM's worker: a torch profiler around the next engine steps."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    worker._serving_profile = torch.profiler.profile(activities=activities)
    worker._serving_profile.__enter__()


def _profile_stop(worker, steps: int) -> dict:
    """Runs in vLLM's worker: device time per step by category (CPU engine: op self
    time of the innermost ops), and the top 12 kernels / ops."""
    import torch

    prof = worker._serving_profile
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.__exit__(None, None, None)
    del worker._serving_profile
    cuda = torch.cuda.is_available()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if us > 0 and (not cuda or evt.device_type == torch.autograd.DeviceType.CUDA):
            totals[evt.key] = totals.get(evt.key, 0.0) + us
    by_cat: dict[str, float] = {}
    for name, us in totals.items():
        cat = profile_category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e3 / steps
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
    return {"timer": "device" if cuda else "cpu op self", "steps": steps,
            "ms_per_step": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            "total_ms_per_step": sum(by_cat.values()),
            "top": [[name[:120], us / 1e3 / steps, profile_category(name)] for name, us in top]}


class _Stepper:
    """Drives ``llm.llm_engine`` step by step, timing every step and counting tokens."""

    def __init__(self, llm):
        self.engine = llm.llm_engine
        self.lengths: dict[str, int] = {}
        self.next_id = 0

    def add(self, prompts, params) -> list[str]:
        ids = []
        for p in prompts:
            rid = str(self.next_id)
            self.next_id += 1
            self.engine.add_request(rid, {"prompt_token_ids": p}, params)
            self.lengths[rid] = 0
            ids.append(rid)
        return ids

    def step(self) -> int:
        """One engine step; returns the tokens it produced."""
        if not self.engine.has_unfinished_requests():  # step() would wait forever
            raise RuntimeError("no request left to step: raise --max-new")
        new = 0
        for out in self.engine.step():
            n = len(out.outputs[0].token_ids)
            new += n - self.lengths.get(out.request_id, 0)
            self.lengths[out.request_id] = n
            if out.finished:
                self.lengths.pop(out.request_id, None)
        return new

    def abort(self, ids) -> None:
        if ids:
            self.engine.abort_request(list(ids))
        for rid in ids:
            self.lengths.pop(rid, None)


def worker(args) -> None:
    from vllm import LLM, SamplingParams

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    cuda = _on_cuda()
    engine_kw = dict(
        skip_tokenizer_init=True, dtype="bfloat16", enable_prefix_caching=False,
        max_model_len=max(args.contexts) + args.max_new, max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.batched_tokens, kv_cache_memory_bytes=args.kv_bytes,
        enforce_eager=not (cuda and args.graphs), disable_log_stats=True, seed=0)
    if args.dummy:
        engine_kw["load_format"] = "dummy"
    if cuda and args.graphs:  # capture the batch sizes measured, not vLLM's 60-odd
        sizes = sorted({1, 2, 4, 8, *(b for b in args.batches), *range(16, max(args.batches) + 1, 16)})
        engine_kw["compilation_config"] = {"cudagraph_capture_sizes": sizes}
    t0 = time.time()
    llm = LLM(args.model, **engine_kw)
    startup_s = time.time() - t0
    fit = llm.collective_rpc(_max_concurrency, args=(args.contexts,))[0]
    run = _Stepper(llm)
    params = SamplingParams(max_tokens=args.max_new, temperature=0, ignore_eos=True)
    run.add([essay_prompts(1, 16, cfg["vocab_size"])[0]], SamplingParams(max_tokens=8))
    while llm.llm_engine.has_unfinished_requests():   # warm-up
        run.step()
    results = {}
    for ctx in args.contexts:
        prompts = essay_prompts(max(args.batches), ctx, cfg["vocab_size"])
        r = {"fit": fit[ctx]}
        # warm-up at this length (first-use kernel compiles stay out of the timings)
        run.add(prompts[-2:], SamplingParams(max_tokens=2))
        while llm.llm_engine.has_unfinished_requests():
            run.step()
        # TTFT: one request alone
        t = time.perf_counter()
        (rid,) = run.add(prompts[:1], params)
        while run.lengths.get(rid, 0) == 0:
            run.step()
        r["ttft_s"] = time.perf_counter() - t
        run.abort([rid])
        # the batch: prefill, then decode at each offered batch size, largest first
        n = min(max(args.batches), int(fit[ctx]), max(1, args.max_prefill_tokens // ctx))
        t = time.perf_counter()
        ids = run.add(prompts[:n], params)
        while any(run.lengths.get(i, 0) == 0 for i in ids):
            run.step()
        prefill = time.perf_counter() - t
        r.update(running_max=n, prefill_s=prefill, prefill_tok_s=n * ctx / prefill, decode={})
        for b in sorted(args.batches, reverse=True):
            keep = min(b, n)
            run.abort(ids[keep:])
            ids = ids[:keep]
            for _ in range(WARM_STEPS):
                run.step()
            t, tokens = time.perf_counter(), 0
            for _ in range(TIMED_STEPS):
                tokens += run.step()
            r["decode"][str(b)] = {"running": keep,
                                   "tok_s": tokens / (time.perf_counter() - t)}
            if (ctx, b) in args.profile:
                llm.collective_rpc(_profile_start)
                for _ in range(PROFILE_STEPS):
                    run.step()
                r["decode"][str(b)]["profile"] = llm.collective_rpc(
                    _profile_stop, args=(PROFILE_STEPS,))[0]
        run.abort(ids)
        results[str(ctx)] = r
        print(f"  {ctx}: {json.dumps(r)}", flush=True)
    print("RESULT " + json.dumps({"startup_s": startup_s, "contexts": results}), flush=True)


def _on_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def measure(model_dir: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model_dir),
           "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches),
           "--max-new", str(args.max_new), "--batched-tokens", str(args.batched_tokens),
           "--kv-bytes", str(args.kv_bytes), "--max-prefill-tokens", str(args.max_prefill_tokens)]
    cmd += ["--graphs"] if args.graphs else []
    cmd += ["--profile", *(f"{c}:{b}" for c, b in args.profile)] if args.profile else []
    cmd += ["--dummy"] if args.dummy else []
    t0 = time.time()
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    log = proc.stdout + proc.stderr
    result = re.search(r"^RESULT (.*)$", log, re.M)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"benchmark worker failed for {model_dir}:\n{log[-6000:]}")
    out = json.loads(result.group(1))
    for ctx, r in out["contexts"].items():
        r["exact_cache_bytes_per_seq"] = exact_cache_bytes(model_dir, int(ctx) + args.max_new)
    out["wall_s"] = time.time() - t0
    return out


def print_table(results: dict, args) -> None:
    """One row per (model, context, offered batch); "x": the ratio to the teacher."""
    head = (f"{'model':<11}{'ctx':>6}{'batch':>6}{'running':>8}{'decode tok/s':>13}{'x':>6}"
            f"{'prefill tok/s':>14}{'x':>6}{'TTFT s':>8}{'x':>6}{'fit':>8}{'x':>6}")
    print(head)
    print("-" * len(head))
    teacher = results.get("teacher")

    def ratio(value: float, ref: float | None) -> str:
        return f"{value / ref:>6.2f}" if ref else f"{'':>6}"

    for ctx in map(str, args.contexts):
        for name, res in results.items():
            r = res["contexts"][ctx]
            t = teacher["contexts"][ctx] if teacher else None
            for b in map(str, sorted(args.batches)):
                d = r["decode"][b]
                print(f"{name:<11}{ctx:>6}{b:>6}{d['running']:>8}{d['tok_s']:>13.1f}"
                      f"{ratio(d['tok_s'], t and t['decode'][b]['tok_s'])}"
                      f"{r['prefill_tok_s']:>14.0f}{ratio(r['prefill_tok_s'], t and t['prefill_tok_s'])}"
                      f"{r['ttft_s']:>8.3f}{ratio(r['ttft_s'], t and t['ttft_s'])}"
                      f"{r['fit']:>8.1f}{ratio(r['fit'], t and t['fit'])}")
    for name, res in results.items():
        for ctx, r in res["contexts"].items():
            for b, d in r["decode"].items():
                if "profile" in d:
                    prof = d["profile"]
                    split = "  ".join(f"{k} {v:.3f}" for k, v in prof["ms_per_step"].items())
                    print(f"profile {name} ctx {ctx} batch {b}, {prof['timer']} ms per step: {split}")


def parse_cell(cell: str, args, parser) -> tuple[int, int]:
    """'CTX:BATCH' of --profile, one of the measured contexts and batch sizes."""
    try:
        ctx, batch = (int(v) for v in cell.split(":"))
    except ValueError:
        parser.error(f"--profile {cell!r}: expected CTX:BATCH, e.g. 8192:64")
    if ctx not in args.contexts or batch not in args.batches:
        parser.error(f"--profile {cell}: {ctx} must be one of --contexts {args.contexts} and "
                     f"{batch} one of --batches {args.batches}")
    return ctx, batch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--teacher", type=Path, help="a real teacher directory (its shape is used)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--layers", type=int, help="override the shape's layer count (smoke runs)")
    p.add_argument("--max-new", type=int, default=512,
                   help="max_tokens of every request (aborted once timed); at least "
                        f"{WARM_STEPS + TIMED_STEPS} per offered batch size")
    p.add_argument("--batched-tokens", type=int, default=8192,
                   help="max_num_batched_tokens (prefill chunk) of every engine")
    p.add_argument("--kv-bytes", type=float, default=2 * 1024**3,
                   help="KV-cache budget of every engine in bytes (kv_cache_memory_bytes)")
    p.add_argument("--max-prefill-tokens", type=int, default=1 << 30,
                   help="cap on a context's batch prefill (requests x context): bounds run time")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: vLLM's defaults (torch.compile + CUDA graphs) instead of eager")
    p.add_argument("--dummy", action="store_true",
                   help="random weights from vLLM's dummy loader (no checkpoint files)")
    p.add_argument("--profile", nargs="+", default=[], metavar="CTX:BATCH",
                   help="profile a few decode steps of these cells (kernel time by category)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mamba_hybrid_bench"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.kv_bytes = int(args.kv_bytes)
    args.profile = [parse_cell(cell, args, p) for cell in args.profile]
    needed = (WARM_STEPS + TIMED_STEPS) * len(args.batches) + PROFILE_STEPS * len(args.profile)
    if args.max_new < needed:
        p.error(f"--max-new {args.max_new} is too few for {len(args.batches)} batch sizes "
                f"of {WARM_STEPS + TIMED_STEPS} steps each"
                + (f" and {len(args.profile)} profiled cells of {PROFILE_STEPS}" if args.profile else ""))
    if args.worker:
        worker(args)
        return 0
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    root = args.workdir / f"{args.shape}-{shape['num_hidden_layers']}{'-real' if args.teacher else ''}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("worker", "model", "out")}
    results: dict = {}
    for name in args.models:
        model_dir = build_checkpoint(name, root, shape, args.teacher, weights=not args.dummy)
        print(f"{name}: {model_dir}", flush=True)
        results[name] = measure(model_dir, args)
        if args.out:  # after every model: a run cut short keeps what it measured
            args.out.write_text(json.dumps({"settings": {**settings, "shape_config": shape},
                                            "results": results}, indent=1))
    print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
