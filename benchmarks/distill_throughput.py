"""Throughput of the distillation step: teacher forward + student forward/backward.

Runs the pipeline's own training loop (``distillation.trainer``) on synthetic
sequences (all ``--seq-len`` long, or ``--mixed-lengths``), with 1, 2, ... workers
(one process for 1 worker, torchrun for more), and reports training tokens/s (real
tokens, padding not counted) in total and per worker, the
scaling efficiency, and on a GPU the model FLOPs utilisation (MFU).

    python benchmarks/distill_throughput.py --workers 1 2 --out bench.json
    python benchmarks/distill_throughput.py --device cuda --dtype bfloat16 --batch-size 16

By default the teacher is a random Llama with SmolLM2-135M's shape (no download);
``--shape 1b`` a random one of Llama-3.2-1B's shape, ``--shape tiny`` a toy for a CPU smoke
run; ``--teacher DIR`` uses a real one. ``--scan reference mamba-ssm`` times the Mamba2
student's training scan both ways in one run (also ``fla``; Mamba1: ``reference triton``), one row per scan and
worker count, by setting ``MAMBA_HYBRID_SCAN`` (vllm_mamba_hybrid/ops/scan_impl.py) for
the trainer; ``auto`` is what training uses by default.

    python benchmarks/distill_throughput.py --device cuda --dtype bfloat16 --workers 1 \
        --seq-len 512 --batch-size 16 --scan reference mamba-ssm --out scan_ab.json

MFU counts matmul FLOPs only (2 per parameter per token forward, 4 backward for weights
that train plus 2 for activations, attention scores added, SSM scan and elementwise work left out), so it is a
slight underestimate.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillation.config import BackendConfig  # noqa: E402
from distillation.job import TrainJob  # noqa: E402
from distillation.launch import TrainingFailed, run_job  # noqa: E402
from distillation.tokens import save_examples  # noqa: E402
from distillation.reporting import read_progress  # noqa: E402
from vllm_mamba_hybrid.ops.scan_impl import ENV as SCAN_ENV, KERNELS  # noqa: E402

# SmolLM2-135M-Instruct's shape (see shared/ENVIRONMENT.md).
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5)
# Llama-3.2-1B's shape (random weights): the "1B" row of the scan A/B (issue 38).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5)
# A toy for a CPU smoke run of the benchmark itself (seconds, not a measurement).
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            tie_word_embeddings=True, max_position_embeddings=4096, rms_norm_eps=1e-5)
SHAPES = {"smollm2": SMOLLM2, "1b": LLAMA_1B, "tiny": TINY}
SCANS = {variant: ("auto", "reference", *kernels) for variant, kernels in KERNELS.items()}
# Dense bf16 peak of the GPUs we are lent (datasheet, SXM).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def build_models(root: Path, teacher: str | None, variant: str, attn_fraction: float,
                 d_state: int | None = None, shape: str = "smollm2"):
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher,
                                                   init_hybrid_from_teacher, save_hybrid)
    if teacher is None:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
        teacher = root / "teacher"
        model.save_pretrained(teacher)
    else:
        model = LlamaForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    hcfg = hybrid_config_from_teacher(model.config, variant=variant, attn_fraction=attn_fraction,
                                      d_state=d_state)
    save_hybrid(init_hybrid_from_teacher(model, hcfg), root / "student")
    return Path(teacher), root / "student", model.config, hcfg


def matmul_flops_per_token(tcfg, hcfg, seq_len: int, student_params: int,
                           teacher_params: int) -> float:
    """Teacher forward + student forward and backward, per trained token position."""
    embed = tcfg.vocab_size * tcfg.hidden_size  # the lookup is no matmul (lm_head is)
    head_dim = tcfg.hidden_size // tcfg.num_attention_heads if not getattr(
        tcfg, "head_dim", None) else tcfg.head_dim
    attn_width = tcfg.num_attention_heads * head_dim
    # causal scores + weighted sum: 2 matmuls of (seq/2 average keys) x attn_width
    attn_fwd = 2 * 2 * (seq_len / 2) * attn_width
    t_fwd = 2 * (teacher_params - (0 if tcfg.tie_word_embeddings else embed)) \
        + tcfg.num_hidden_layers * attn_fwd
    s_fwd = 2 * (student_params - (0 if hcfg.tie_word_embeddings else embed)) \
        + len(hcfg.attn_layers) * attn_fwd
    return t_fwd + 3 * s_fwd


def run(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    teacher_dir, student_dir, tcfg, hcfg = build_models(root, args.teacher, args.variant,
                                                        args.attn_fraction, shape=args.shape)
    from distillation.models import load_causal_lm
    n_student = sum(p.numel() for p in load_causal_lm(student_dir).parameters())
    n_teacher = sum(p.numel() for p in load_causal_lm(teacher_dir).parameters())
    rng = random.Random(0)
    examples = []
    for _ in range(256):
        length = rng.randint(args.seq_len // 8, args.seq_len) if args.mixed_lengths else args.seq_len
        prompt = length // 4
        examples.append({"prompt_ids": [rng.randrange(3, tcfg.vocab_size) for _ in range(prompt)],
                         "answer_ids": [rng.randrange(3, tcfg.vocab_size)
                                        for _ in range(length - prompt)]})
    save_examples(examples, root / "examples.pt")
    flops_tok = matmul_flops_per_token(tcfg, hcfg, args.seq_len, n_student, n_teacher)
    peak = args.peak_tflops
    if peak is None and device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch_threads_per_worker": args.threads or torch.get_num_threads(),
            "teacher": args.teacher or f"random, {args.shape} shape", "variant": args.variant,
            "attn_layers": hcfg.attn_layers, "batch_size_per_worker": args.batch_size,
            "seq_len": args.seq_len, "mixed_lengths": args.mixed_lengths,
            "length_grouping_steps": args.length_grouping_steps,
            "dtype": args.dtype, "strategy": args.strategy, "compile": args.compile,
            "student_params": n_student, "teacher_params": n_teacher,
            "matmul_flops_per_token": flops_tok, "peak_tflops": peak}
    rows = []
    saved_scan = os.environ.get(SCAN_ENV)
    try:
        for scan, workers in [(s, w) for s in args.scan for w in args.workers]:
            os.environ[SCAN_ENV] = scan     # read by the mixers in every worker process
            stage = root / f"{scan}-w{workers}"
            job = TrainJob(stage=f"bench-{scan}-{workers}w", stage_dir=str(stage),
                           init_dir=str(student_dir),
                           data_file=str(root / "examples.pt"), objective="kd",
                           teacher_dir=str(teacher_dir), steps=args.warmup + args.steps, lr=1e-5,
                           batch_size=args.batch_size, grad_accum=1, max_length=args.seq_len,
                           checkpoint_every=10 ** 9, dtype=args.dtype, device=device,
                           length_grouping_steps=args.length_grouping_steps,
                           threads=args.threads, strategy=args.strategy, compile=args.compile)
            backend = BackendConfig(kind="local" if workers == 1 else "torchrun", num_workers=workers,
                                    threads_per_worker=args.threads, device=device)
            try:
                run_job(job, backend)
            except TrainingFailed as e:   # e.g. out of memory: the other scans still run
                rows.append({"scan": scan, "workers": workers, "error": str(e).splitlines()[0]})
                print(f"{scan} x {workers} failed: {rows[-1]['error']}", file=sys.stderr)
                _write(args.out, info, rows)
                continue
            recs = read_progress(stage)
            first_step_s = recs[0]["step_time_s"]   # with --compile: includes compiling
            recs = recs[args.warmup:]
            step_s = statistics.median(r["step_time_s"] for r in recs)
            tokens_per_s = statistics.median(r["tokens_per_s"] for r in recs)  # real tokens, no padding
            row = {"scan": scan, "workers": workers, "step_time_s": step_s, "tokens_per_s": tokens_per_s,
                   "tokens_per_s_per_worker": tokens_per_s / workers, "first_step_s": first_step_s}
            if peak:
                row["mfu"] = row["tokens_per_s_per_worker"] * flops_tok / (peak * 1e12)
            if "max_memory_gb" in recs[-1]:
                row["max_memory_gb"] = max(r["max_memory_gb"] for r in recs)
            rows.append(row)
            _compare(rows, args.scan[0])
            _write(args.out, info, rows)
    finally:   # a failed row leaves the caller's setting as it was
        if saved_scan is None:
            os.environ.pop(SCAN_ENV, None)
        else:
            os.environ[SCAN_ENV] = saved_scan
    return {**info, "results": rows}


def _write(out: str | None, info: dict, rows: list[dict]) -> None:
    """After every row: a run cut short keeps the rows it finished."""
    if out:
        Path(out).write_text(json.dumps({**info, "results": rows}, indent=1))


def _compare(rows: list[dict], base_scan: str) -> None:
    """Scaling against the same scan's first worker count, speedup against ``base_scan``
    at the same worker count, for the rows measured so far (failed rows have neither)."""
    done = [r for r in rows if "error" not in r]
    for r in done:
        mine = [q for q in done if q["scan"] == r["scan"]]
        r["scaling_efficiency"] = r["tokens_per_s"] / (mine[0]["tokens_per_s"] / mine[0]["workers"]
                                                       * r["workers"])
        base = next((q for q in done if q["scan"] == base_scan and q["workers"] == r["workers"]), None)
        r["speedup_vs_first_scan"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", help="Llama teacher dir (default: random, SmolLM2-135M shape)")
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES),
                   help="random teacher's shape (default SmolLM2-135M; tiny: CPU smoke run)")
    p.add_argument("--variant", default="mamba2", choices=("mamba1", "mamba2"))
    p.add_argument("--scan", nargs="+", default=["auto"],
                   help="training scans to time, one row each: auto, reference, and "
                        + " or ".join(f"{'/'.join(k)} ({v})" for v, k in KERNELS.items())
                        + "; the first is the speedup's base")
    p.add_argument("--attn-fraction", type=float, default=0.5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=2, help="sequences per worker")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--mixed-lengths", action="store_true",
                   help="sequence lengths uniform in [seq_len/8, seq_len] instead of all seq_len")
    p.add_argument("--length-grouping-steps", type=int, default=0,
                   help="training.length_grouping_steps (0: off)")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    p.add_argument("--compile", action="store_true",
                   help="training.compile: compiled decoder layers, rows padded to --seq-len")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: by GPU name)")
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    bad = [v for v in args.scan if v not in SCANS[args.variant]]
    if bad:
        p.error(f"--scan {bad} does not apply to {args.variant}; choose from {SCANS[args.variant]}")
    if args.teacher and args.shape != "smollm2":
        p.error("--shape sets a random teacher's shape; it does not apply with --teacher")
    result = run(args)
    print(f"\ndistillation step, {result['device']}, {result['dtype']}, "
          f"{'compiled' if args.compile else 'eager'}, "
          f"batch {result['batch_size_per_worker']} x {result['seq_len']} tokens per worker"
          + (f" (mixed lengths, grouping {args.length_grouping_steps} steps)" if args.mixed_lengths else ""))
    print(f"{'scan':>10} {'workers':>7} {'step s':>8} {'tokens/s':>10} {'tok/s/worker':>13} "
          f"{'scaling':>8} {'speedup':>8} {'MFU':>7} {'peak GB':>8}")
    for r in result["results"]:
        if "error" in r:
            print(f"{r['scan']:>10} {r['workers']:>7}   failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        mem = f"{r['max_memory_gb']:.1f}" if "max_memory_gb" in r else "-"
        speedup = (f"{r['speedup_vs_first_scan']:>7.2f}x" if r["speedup_vs_first_scan"]
                   else f"{'-':>8}")
        print(f"{r['scan']:>10} {r['workers']:>7} {r['step_time_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_s_per_worker']:>13.0f} {r['scaling_efficiency']:>8.2f} "
              f"{speedup} {mfu:>7} {mem:>8}")
    return 1 if any("error" in r for r in result["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
