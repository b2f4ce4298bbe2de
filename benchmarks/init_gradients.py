"""KL to the teacher and the gradient by parameter group at step 0, per Mamba initialisation.

What the first distillation steps see: for each attention fraction and ``mamba_init``
(attention weights or random), the student is built from the teacher, scored with
word-level KL(teacher || student) on windows of the training essays, and one backward
pass gives the gradient norm of each parameter group (summed over layers). Runs on CPU.

    python benchmarks/init_gradients.py --teacher runs/study/teacher --out init.json
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distillation.losses import kd_loss_sums  # noqa: E402
from distillation.models import load_causal_lm, load_tokenizer  # noqa: E402
from distillation.paths import resolve_data_dir  # noqa: E402
from distillation.splits import heldout_essays  # noqa: E402
from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher,  # noqa: E402
                                               init_hybrid_from_teacher)


def essay_windows(tokenizer, n: int, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the first ``n`` training essays (held-out ones skipped)."""
    essays = resolve_data_dir(None) / "essays"
    heldout = {p.name for p in heldout_essays(essays.parent, 8)}
    rows = []
    for f in sorted(essays.glob("*.txt")):
        ids = tokenizer(f.read_text())["input_ids"]
        if f.name not in heldout and len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return torch.tensor(rows)


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """Gradient L2 norm per parameter name with the layer index removed."""
    sq: dict[str, float] = collections.defaultdict(float)
    for name, p in model.named_parameters():
        if p.grad is not None:
            sq[re.sub(r"layers\.\d+\.", "", name)] += p.grad.double().pow(2).sum().item()
    return {k: v ** 0.5 for k, v in sorted(sq.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--variant", default="mamba2", choices=("mamba1", "mamba2"))
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--essays", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--top", type=int, default=5, help="parameter groups printed per row")
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    teacher = load_causal_lm(args.teacher).eval()
    ids = essay_windows(load_tokenizer(args.teacher), args.essays, args.length)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t_logits = teacher(ids).logits
    rows = []
    for frac in args.fractions:
        hcfg = hybrid_config_from_teacher(teacher.config, variant=args.variant, attn_fraction=frac)
        for init in ("attention", "random"):
            student = init_hybrid_from_teacher(teacher, hcfg, mamba_init=init, seed=0).train()
            kl, _, n = kd_loss_sums(student(ids).logits, t_logits, ids, mask)
            (kl / n).backward()
            groups = grad_norms(student)
            rows.append({"attn_fraction": frac, "mamba_init": init, "kl": kl.item() / n,
                         "grad_norm": sum(v * v for v in groups.values()) ** 0.5, "groups": groups})
    print(f"\nstep 0, {args.variant}, {ids.shape[0]} essay windows x {ids.shape[1]} tokens")
    print(f"{'attn':>5} {'init':>9} {'KL':>7} {'|grad|':>8}  largest groups")
    for r in rows:
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(r["groups"].items())[:args.top])
        print(f"{r['attn_fraction']:>5} {r['mamba_init']:>9} {r['kl']:>7.3f} {r['grad_norm']:>8.1f}  {top}")
    if args.out:
        Path(args.out).write_text(json.dumps({"teacher": args.teacher, "variant": args.variant,
                                              "tokens": list(ids.shape), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
