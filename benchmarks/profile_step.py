"""Where a distillation step's GPU time goes: torch.profiler over teacher forward,
student forward/backward and the KD loss, SmolLM2-135M shape with random weights.

    python benchmarks/profile_step.py --variant mamba2 --batch-size 8 --seq-len 512
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_throughput import build_models  # noqa: E402
from distillation.losses import kd_loss_sums  # noqa: E402
from distillation.models import load_causal_lm  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="mamba2", choices=("mamba1", "mamba2"))
    p.add_argument("--attn-fraction", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--d-state", type=int, default=None, help="default: the variant's")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--trace", help="write a chrome trace here")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(tempfile.mkdtemp(prefix="profile-step-"))
    teacher_dir, student_dir, tcfg, _ = build_models(root, None, args.variant, args.attn_fraction,
                                                      d_state=args.d_state)
    student = load_causal_lm(student_dir, torch.float32).to(dev).train()
    teacher = load_causal_lm(teacher_dir, torch.bfloat16).to(dev).eval().requires_grad_(False)
    ids = torch.randint(3, tcfg.vocab_size, (args.batch_size, args.seq_len), device=dev)
    mask = torch.ones_like(ids)
    loss_mask = mask.clone()
    loss_mask[:, : args.seq_len // 4] = 0

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = student(input_ids=ids, attention_mask=mask).logits
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=mask).logits
        kl, ce, n = kd_loss_sums(out, t, ids, loss_mask)
        (kl / n).backward()

    def timed(label, fn, reps=3):
        fn()
        torch.cuda.synchronize() if dev.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize() if dev.type == "cuda" else None
        s = (time.perf_counter() - t0) / reps
        print(f"{label:<40} {s * 1e3:9.1f} ms  {args.batch_size * args.seq_len / s:10.0f} tok/s")

    timed("full step (fwd+bwd+teacher+kd)", step)

    def teacher_only():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            teacher(input_ids=ids, attention_mask=mask)
    timed("teacher forward", teacher_only)

    def student_fwd():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            student(input_ids=ids, attention_mask=mask)
    timed("student forward (no grad)", student_fwd)

    acts = ["cpu"] + (["cuda"] if dev.type == "cuda" else [])
    acts = [getattr(torch.profiler.ProfilerActivity, a.upper()) for a in acts]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize() if dev.type == "cuda" else None
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
