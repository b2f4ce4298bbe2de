"""What cutting a draft's head to frequent tokens buys and risks (`spec_decode.draft_vocab`).

For each kept size: the share of the teacher's held-out greedy answer tokens inside
the kept set (coverage: the cut head loses at most 1 - coverage of acceptance, since
a kept argmax is unchanged), and the draft's single-token step time with that head,
at batch 1 and 8, beside the teacher's (the target's size) in the same run.

Tokens are ranked on the teacher's greedy answers to the training prompts plus the
training essays; coverage is measured on its answers to the held-out prompts (every
``--heldout-every``-th AlpacaEval prompt, the distillation split), so nothing
measured was counted.

Usage: python benchmarks/draft_vocab.py --teacher runs/study/teacher --out results.json
       [--layers 0,29] [--sizes 2048 4096 8192 16384] [--train-prompts 240]
       [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distillation.generation import generate_answers  # noqa: E402
from distillation.paths import default_data_dir  # noqa: E402
from distillation.splits import heldout_essays, heldout_indices, train_indices  # noqa: E402
from distillation.tokens import chat_prompt_ids  # noqa: E402

DATA = default_data_dir()


def teacher_answers(model, tokenizer, instructions: list[str], new_tokens: int) -> list[list[int]]:
    """Greedy answer ids to chat-templated ``instructions``, EOS dropped (the distillation
    pipeline's prompt format and generator)."""
    eos = tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    print(f"teacher: greedy answers to {len(instructions)} prompts ...", flush=True)
    answers = generate_answers(model, [chat_prompt_ids(tokenizer, q) for q in instructions],
                               eos_id=eos, pad_id=pad, max_new_tokens=new_tokens, batch_size=16)
    return [a[:-1] if a and a[-1] == eos else a for a in answers]


def step_ms(model, batch: int, reps: int = 40) -> float:
    """Median single-token step (cache of 64 tokens) of the reference model, in ms."""
    from vllm_mamba_hybrid.modeling import HybridCache
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    cache = HybridCache(model.config)
    times = []
    with torch.inference_mode():
        model(input_ids=torch.randint(0, vocab, (batch, 64), generator=g), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        for _ in range(reps):
            x = torch.randint(0, vocab, (batch, 1), generator=g)
            t0 = time.perf_counter()
            model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--layers", default="0,29", help="teacher layers of the draft")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--train-prompts", type=int, default=240)
    ap.add_argument("--heldout-every", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from vllm_mamba_hybrid.conversion.draft import layer_subset
    from vllm_mamba_hybrid.conversion.teacher import load_teacher
    from vllm_mamba_hybrid.conversion.init import as_hybrid
    from vllm_mamba_hybrid.spec_decode.draft_vocab import cut_head, load_draft_vocab, make_draft_vocab

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = load_teacher(args.teacher, dtype=torch.float32).eval()
    prompts = [json.loads(line)["instruction"]
               for line in (DATA / "alpaca_eval_prompts.jsonl").read_text().splitlines()
               if line.strip()]
    train = [prompts[i] for i in train_indices(len(prompts), args.heldout_every)]
    heldout = [prompts[i] for i in heldout_indices(len(prompts), args.heldout_every)]
    train = train[::max(1, len(train) // args.train_prompts)][:args.train_prompts]
    train_ids = teacher_answers(teacher, tokenizer, train, args.new_tokens)
    held_ids = teacher_answers(teacher, tokenizer, heldout, args.new_tokens)
    held_tokens = torch.tensor([t for row in held_ids for t in row])
    essays = sorted((DATA / "essays").glob("*.txt"))
    essays = [p for p in essays if p not in heldout_essays(DATA, 4)]

    draft = as_hybrid(layer_subset(teacher, [int(i) for i in args.layers.split(",")])).eval()
    full_head = draft.lm_head
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        answers = Path(tmp) / "answers.jsonl"
        answers.write_text("".join(json.dumps({"answer": tokenizer.decode(r)}) + "\n"
                                   for r in train_ids))
        draft.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        teacher.generation_config.save_pretrained(tmp)
        for size in [None] + sorted(args.sizes):
            if size is None:
                ids, coverage = None, 1.0
                draft.lm_head = full_head
            else:
                make_draft_vocab(tmp, size, [str(answers)] + [str(p) for p in essays])
                ids = load_draft_vocab(tmp, full_head.out_features)
                coverage = float(torch.isin(held_tokens, ids).float().mean())
                draft.lm_head = cut_head(full_head, ids)
            row = {"head_tokens": size or full_head.out_features, "heldout_coverage": coverage}
            for b in args.batches:
                row[f"draft_ms_b{b}"] = step_ms(draft, b)
            rows.append(row)
    target_ms = {b: step_ms(as_hybrid(teacher).eval(), b) for b in args.batches}

    head = f"{'head tokens':>11} {'held-out coverage':>17} " + " ".join(
        f"{f'draft b{b} ms':>12} {f'/ target b{b}':>13}" for b in args.batches)
    print(f"teacher answers: {len(train_ids)} train / {len(held_ids)} held-out prompts, "
          f"{held_tokens.numel()} held-out tokens; target (teacher) step ms: "
          + ", ".join(f"b{b} {t:.2f}" for b, t in target_ms.items()))
    print(head)
    for r in rows:
        print(f"{r['head_tokens']:>11} {r['heldout_coverage']:>17.3f} " + " ".join(
            f"{r[f'draft_ms_b{b}']:>12.2f} {r[f'draft_ms_b{b}'] / target_ms[b]:>13.3f}"
            for b in args.batches))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "teacher": str(args.teacher), "draft_layers": args.layers, "new_tokens": args.new_tokens,
            "train_prompts": len(train_ids), "heldout_prompts": len(held_ids),
            "heldout_tokens": held_tokens.numel(), "torch_threads": torch.get_num_threads(),
            "target_ms": target_ms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
