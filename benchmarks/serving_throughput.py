"""Serving throughput of a Llama teacher vs its Mamba hybrids, on one vLLM build.

Random-weight checkpoints of the SmolLM2-135M shape (hidden 576, 30 layers, 9 heads,
3 KV heads, MLP 1536, vocab 49152, tied embeddings): the teacher and hybrids with 50%
and 25% attention, Mamba2 and Mamba1. Every (model, context) runs in its own
subprocess with the same settings (bf16, batch of 4 prompts cut from the shared essays,
64 new tokens, prefix caching off, enforce_eager, a fixed KV-cache budget) and reports:

* prefill: time until all 4 prompts have their first token (engine timestamps);
* decode: output tokens/s after the first token;
* cache: bytes per sequence, exact (KV of the attention layers + conv/SSM state of the
  Mamba layers) and as vLLM allocates it (the fixed budget divided by the number of
  max-length sequences vLLM says fit: "Maximum concurrency");
* how many sequences of that length fit in the budget.

Usage: python benchmarks/serving_throughput.py --out results.json [--quick]
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

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAMBA_HYBRID_SHARED", REPO.parent / "shared"))
TEACHER_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
MODELS = {  # name -> (mamba variant, attention fraction); None = the teacher
    "teacher": None,
    "mamba2-50%": ("mamba2", 0.5),
    "mamba2-25%": ("mamba2", 0.25),
    "mamba1-50%": ("mamba1", 0.5),
    "mamba1-25%": ("mamba1", 0.25),
}
BUDGET_BYTES = 2 * 1024**3  # KV cache budget of every engine


# ---- checkpoints -----------------------------------------------------------------
def build_checkpoint(name: str, root: Path, shape: dict) -> Path:
    """Random bf16 checkpoint of ``name`` under root (reused when already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / name.replace("%", "")
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    if MODELS[name] is None:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        from vllm_mamba_hybrid import LlamaMambaHybridConfig, LlamaMambaHybridForCausalLM
        from vllm_mamba_hybrid.config import paper_attention_layers

        variant, fraction = MODELS[name]
        cfg = LlamaMambaHybridConfig(
            **shape, mamba_variant=variant,
            attn_layers=paper_attention_layers(shape["num_hidden_layers"], fraction))
        model = LlamaMambaHybridForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def exact_cache_bytes(model_dir: Path, context: int) -> int:
    """KV bytes of the attention layers + Mamba state bytes (bf16 KV/conv, fp32 SSM)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    kv_per_token = 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    if cfg.get("model_type") != "llama_mamba_hybrid":
        return layers * kv_per_token * context
    attn = len(cfg["attn_layers"])
    conv = (cfg["d_conv"] - 1) * (cfg["d_inner"] + 2 * cfg["d_xb"] if cfg["mamba_variant"] == "mamba2"
                                  else (cfg["d_inner"] if cfg["repeat_kv_before_conv"] else cfg["d_xb"])) * 2
    ssm = cfg["d_inner"] * cfg["d_state"] * 4
    return attn * kv_per_token * context + (layers - attn) * (conv + ssm)


def essay_prompts(batch: int, context: int, vocab: int) -> list[list[int]]:
    """``batch`` different essay passages of ``context`` tokens. Random-weight models have
    no tokenizer, so a token is a byte of the text (ids 3..258): real text, real length."""
    text = "\n\n".join(p.read_text(encoding="utf-8")
                       for p in sorted((SHARED / "data" / "essays").glob("*.txt")))
    data = text.encode("utf-8")
    assert vocab > 259 and len(data) >= batch * context, "not enough essay text"
    step = len(data) // batch
    return [[3 + b for b in data[i * step:i * step + context]] for i in range(batch)]


# ---- one measurement (subprocess) ----------------------------------------------------
def worker(args) -> None:
    from vllm import LLM, SamplingParams

    cfg = json.loads((Path(args.model) / "config.json").read_text())
    prompts = essay_prompts(args.batch, args.context, cfg["vocab_size"])
    llm = LLM(args.model, skip_tokenizer_init=True, dtype="bfloat16", enforce_eager=True,
              enable_prefix_caching=False, max_model_len=args.context + args.new_tokens,
              max_num_seqs=args.batch, max_num_batched_tokens=args.batched_tokens,
              kv_cache_memory_bytes=BUDGET_BYTES, disable_log_stats=False)
    sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=4))  # warm-up
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    stats = [o.metrics for o in outs]
    assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
    start = min(s.queued_ts for s in stats)
    first = max(s.first_token_ts for s in stats)
    last = max(s.last_token_ts for s in stats)
    print("RESULT " + json.dumps({
        "prefill_s": first - start,
        "decode_tok_s": args.batch * (args.new_tokens - 1) / (last - first),
    }), flush=True)


def measure(model_dir: Path, context: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model_dir),
           "--context", str(context), "--batch", str(args.batch),
           "--new-tokens", str(args.new_tokens), "--batched-tokens", str(args.batched_tokens)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    log = proc.stdout + proc.stderr
    result = re.search(r"^RESULT (.*)$", log, re.M)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"benchmark worker failed for {model_dir} @ {context}:\n{log[-4000:]}")
    out = json.loads(result.group(1))
    fit = float(re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.,]+)x",
                          log).group(1).replace(",", ""))
    out.update(seqs_in_budget=fit, vllm_cache_bytes_per_seq=BUDGET_BYTES / fit,
               exact_cache_bytes_per_seq=exact_cache_bytes(model_dir, context + args.new_tokens),
               wall_s=time.time() - t0)
    return out


def print_table(results: dict, contexts: list[int]) -> None:
    head = (f"{'model':<12}{'ctx':>6}{'prefill s':>11}{'decode tok/s':>14}{'cache MB/seq':>14}"
            f"{'seqs/budget':>13} | ratios vs teacher: {'prefill':>8}{'decode':>8}{'cache':>7}")
    print(head)
    print("-" * len(head))
    for ctx in contexts:
        t = results["teacher"][str(ctx)]
        for name, per_ctx in results.items():
            r = per_ctx[str(ctx)]
            print(f"{name:<12}{ctx:>6}{r['prefill_s']:>11.2f}{r['decode_tok_s']:>14.1f}"
                  f"{r['vllm_cache_bytes_per_seq'] / 1e6:>14.2f}{r['seqs_in_budget']:>13.1f} | "
                  f"{'':>19}{r['prefill_s'] / t['prefill_s']:>8.2f}"
                  f"{r['decode_tok_s'] / t['decode_tok_s']:>8.2f}"
                  f"{r['vllm_cache_bytes_per_seq'] / t['vllm_cache_bytes_per_seq']:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6 layers, 256-token context, 16 new tokens, 3 models")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batched-tokens", type=int, default=4096,
                   help="max_num_batched_tokens of every engine")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/mamba_hybrid_bench"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    shape = dict(TEACHER_SHAPE)
    if args.quick:
        shape["num_hidden_layers"] = 6
        args.contexts, args.new_tokens = [256], 16
        args.models = ["teacher", "mamba2-50%", "mamba1-50%"]
    root = args.workdir / ("quick" if args.quick else "full")
    results: dict = {}
    for name in args.models:
        model_dir = build_checkpoint(name, root, shape)
        results[name] = {}
        for ctx in args.contexts:
            r = measure(model_dir, ctx, args)
            results[name][str(ctx)] = r
            print(f"{name} @ {ctx}: {json.dumps(r)}", flush=True)
    if "teacher" in results:
        print_table(results, args.contexts)
    if args.out:
        args.out.write_text(json.dumps({
            "settings": {"dtype": "bfloat16", "batch": args.batch, "new_tokens": args.new_tokens,
                         "max_num_batched_tokens": args.batched_tokens, "prefix_caching": False,
                         "enforce_eager": True, "kv_cache_budget_bytes": BUDGET_BYTES,
                         "shape": shape},
            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
