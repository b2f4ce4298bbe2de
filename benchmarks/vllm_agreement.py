"""Greedy agreement of vLLM in a given dtype with the float32 reference models.

For the teacher and its 50% hybrids of both variants (initialised from it), each
prompt's greedy continuation from vLLM (``--dtype``, vLLM's default compile/graphs
settings) is compared with the project's float32 reference (transformers for the
teacher, ``LlamaMambaHybridForCausalLM`` for the hybrids): how many tokens agree
before the first difference. The teacher's own row is the yardstick: how far vLLM's
kernels in that dtype drift from float32 on a model vLLM serves natively.

    python3 benchmarks/vllm_agreement.py --teacher DIR --out R.json
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from serving_throughput import build_checkpoint

from distillation.paths import default_data_dir

DATA = default_data_dir()
MODELS = ("teacher", "mamba2-50%", "mamba1-50%")


def chat_prompts(teacher: Path, n: int) -> list[list[int]]:
    """The first ``n`` AlpacaEval instructions in the teacher's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    lines = (DATA / "alpaca_eval_prompts.jsonl").read_text().splitlines()[:n]
    texts = [tok.apply_chat_template([{"role": "user", "content": json.loads(ln)["instruction"]}],
                                     add_generation_prompt=True, tokenize=False) for ln in lines]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def reference_greedy(model_dir: Path, prompts, new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    import vllm_mamba_hybrid.modeling  # noqa: F401  (registers the hybrid with the Auto classes)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(torch.tensor([p], device=device), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=[], pad_token_id=0)[0]
            out.append(seq[len(p):].tolist())
    del model
    gc.collect()
    return out


def vllm_greedy(model_dir: Path, prompts, new_tokens: int, dtype: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=dtype, gpu_memory_utilization=0.3, max_model_len=2048,
              enable_prefix_caching=False, seed=0)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Tokens equal before the first difference, per prompt and summarised."""
    prefix = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r))
              for r, g in zip(ref, got)]
    n = len(ref[0])
    return {"matched_prefix": prefix, "mean_fraction": sum(prefix) / (n * len(prefix)),
            "identical": sum(p == n for p in prefix), "prompts": len(prefix),
            "first_token_equal": sum(p > 0 for p in prefix)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", type=Path, required=True, help="the teacher directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mamba_hybrid_agreement"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    prompts = chat_prompts(args.teacher, args.prompts)
    results = {}
    for name in MODELS:
        model_dir = build_checkpoint(name, args.workdir, {}, args.teacher, weights=True)
        ref = reference_greedy(model_dir, prompts, args.new_tokens)
        got = vllm_greedy(model_dir, prompts, args.new_tokens, args.dtype)
        results[name] = agreement(ref, got)
        r = results[name]
        print(f"{name:<12} identical {r['identical']}/{r['prompts']}  first token "
              f"{r['first_token_equal']}/{r['prompts']}  mean agreed prefix "
              f"{r['mean_fraction']:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
