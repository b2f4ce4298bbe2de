"""Decode throughput of the fast runtime on one GPU (random bf16 weights, real shapes).

Sections (each prints a table; all numbers go to one JSON file):
1. copy bandwidth (device-to-device, read + write), measured in this run;
2. Llama-3-8B-shaped Transformer and 50/25/12.5% attention hybrids (Mamba1 and
   Mamba2) at batch 1/16/64 and context 1k/8k/32k: decode tokens/s, decode-state
   bytes per sequence, and for batch 1 the share of the bandwidth roofline
   (bytes of weights + KV + SSM/conv state touched per token / copy bandwidth);
3. speculative decoding: 8B-shaped 50% hybrid + 1B-shaped draft, k = 4, fixed
   synthetic acceptance 0.6 / 0.8, vs plain decoding;
4. SmolLM2-135M shape: stock transformers generate() vs the runtime, batch 1.

The KV cache and states are filled with random values instead of a prefill
(decode cost does not depend on the values), and the 8B models share weights
where shapes agree (MLPs, embeddings, attention layers, Mamba mixers per variant):
the bytes read per token are the same as with distinct weights.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from vllm_mamba_hybrid.config import paper_attention_layers  # noqa: E402
from vllm_mamba_hybrid.conversion.init import hybrid_config_from_teacher  # noqa: E402
from vllm_mamba_hybrid.modeling import LlamaMambaHybridForCausalLM  # noqa: E402
from vllm_mamba_hybrid.runtime import FastGenerator, SpeculativeGenerator, bytes_per_sequence  # noqa: E402

DEV = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
GB = 1e9

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=131072, tie_word_embeddings=False)
LLAMA3_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=131072, tie_word_embeddings=True)
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               head_dim=64, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True)


def log(*a):
    print(*a, flush=True)


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Seconds per call (CUDA events around ``iters`` calls, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / iters


def copy_bandwidth() -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    sec = min(timed(lambda: b.copy_(a), 10) for _ in range(3))
    del a, b
    return 2 * n / sec


@torch.no_grad()
def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Materialise a meta module on the GPU in bf16 with random weights (no CPU init)."""
    module.to_empty(device=DEV)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.3 if "conv1d" in name else 0.02)
        else:
            p.normal_(0.0, 0.02)
    for sub in module.modules():
        if type(sub).__name__.endswith("RMSNorm"):
            sub.weight.fill_(1.0)
    if hasattr(module, "reset_ssm_parameters"):
        module.reset_ssm_parameters()
    return module.to(torch.bfloat16)


def rotary(cfg):
    with torch.device(DEV):
        return LlamaRotaryEmbedding(cfg)


def hybrid_config(shape: dict, attn_layers, variant="mamba2"):
    teacher = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    return hybrid_config_from_teacher(teacher, variant=variant, attn_layers=list(attn_layers))


class WeightBank:
    """One random tensor per distinct module, shared by every model that has that module."""

    def __init__(self):
        self.parts: dict = {}

    def get(self, key, make):
        if key not in self.parts:
            with torch.device("meta"):
                module = make()
            self.parts[key] = randomize(module)
        return self.parts[key]

    def model(self, cfg) -> LlamaMambaHybridForCausalLM:
        with torch.device("meta"):
            model = LlamaMambaHybridForCausalLM(cfg)
        inner = model.model
        inner.embed_tokens = self.get("embed", lambda: type(inner.embed_tokens)(cfg.vocab_size, cfg.hidden_size))
        inner.norm = self.get("norm", lambda: type(inner.norm)(cfg.hidden_size))
        model.lm_head = self.get("lm_head", lambda: type(model.lm_head)(cfg.hidden_size, cfg.vocab_size,
                                                                        bias=False))
        inner.rotary_emb = rotary(cfg)
        for i, layer in enumerate(inner.layers):
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                mod = getattr(layer, name)
                setattr(layer, name, self.get((name, i), lambda mod=mod: mod))
            if layer.is_attention:
                layer.self_attn = self.get(("attn", i), lambda layer=layer: layer.self_attn)
            else:
                layer.mamba = self.get((cfg.mamba_variant, i), lambda layer=layer: layer.mamba)
        return model.eval()


def weight_bytes_per_token(model) -> int:
    """Parameter bytes a decode step reads: all of them but the embedding table (one row)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or "embed_tokens" in name:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def state_bytes_per_token(cfg, context: int) -> int:
    """KV read + SSM/conv state read and written per token and sequence."""
    kv = bytes_per_sequence(cfg, context) - bytes_per_sequence(cfg, 0)
    return kv + 2 * bytes_per_sequence(cfg, 0)


def free_bytes() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


def decode_point(model, batch, context, iters, splits=None):
    max_len = context + 64
    need = batch * bytes_per_sequence(model.config, max_len) + batch * model.config.vocab_size * 8 + 1.5 * GB
    if need > free_bytes():
        return {"status": "does not fit", "need_gb": round(need / GB, 1),
                "free_gb": round(torch.cuda.mem_get_info()[0] / GB, 1)}
    try:
        gen = FastGenerator(model, batch, max_len, attention_splits=splits)
        gen.cache.fill_random(context)
        ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEV)
        sec = timed(lambda: gen.forward(ids), iters)
        out = {"status": "ok", "tokens_per_s": batch / sec, "ms_per_step": sec * 1e3,
               "cache_gb": gen.cache.nbytes() / GB}
        del gen
        return out
    except torch.cuda.OutOfMemoryError:
        return {"status": "does not fit (OOM)"}
    except Exception as exc:  # noqa: BLE001 - one broken point must not end the table
        return {"status": f"error: {type(exc).__name__}: {str(exc)[:200]}"}


def section_8b(results, bw, budget_end, contexts, batches):
    bank = WeightBank()
    models = {"transformer": hybrid_config(LLAMA3_8B, range(32))}
    for frac, tag in ((0.5, "50%"), (0.25, "25%"), (0.125, "12.5%")):
        for variant in ("mamba2", "mamba1"):
            models[f"{variant} {tag}"] = hybrid_config(LLAMA3_8B, paper_attention_layers(32, frac), variant)
    rows = []
    built = {}
    for name, cfg in models.items():
        t0 = time.time()
        model = built[name] = bank.model(cfg)
        wbytes = weight_bytes_per_token(model)
        log(f"built {name} in {time.time() - t0:.1f}s: {wbytes / GB:.2f} GB read per step")
        for context in contexts:
            for batch in batches:
                if time.time() > budget_end:
                    rows.append(dict(model=name, batch=batch, context=context, status="skipped (time)"))
                    continue
                point = decode_point(model, batch, context, iters=20 if batch == 1 else 10)
                row = dict(model=name, batch=batch, context=context,
                           bytes_per_seq=bytes_per_sequence(cfg, context), **point)
                if batch == 1 and point["status"] == "ok":
                    per_token = wbytes + state_bytes_per_token(cfg, context)
                    row["roofline_tokens_per_s"] = bw / per_token
                    row["roofline_share"] = point["tokens_per_s"] / row["roofline_tokens_per_s"]
                rows.append(row)
                log(json.dumps(row))
    results["llama3_8b"] = rows
    return bank, built


def time_speculative(target, draft, context, k, p, draft_token_ids=None, rounds=40) -> dict:
    """Tokens/s of speculative rounds at synthetic acceptance ``p`` (random caches).

    The coin flips are seeded, so calls with the same ``p`` and ``rounds`` accept the
    same drafts and differ only in time (the head cut or not)."""
    spec = SpeculativeGenerator(target, draft, 1, context + 512, num_draft_tokens=k, accept_prob=p,
                                draft_token_ids=draft_token_ids)
    for gen in (spec.target, spec.draft):
        gen.cache.fill_random(context)
    spec.limit.fill_(10 ** 9)
    torch.manual_seed(0)
    spec.round()
    torch.cuda.synchronize()
    c0 = int(spec.count.sum())
    sec = timed(spec.round, rounds, warmup=0)
    emitted = int(spec.count.sum()) - c0
    return {"tokens_per_s": emitted / (sec * rounds), "tokens_per_round": emitted / rounds,
            "ms_per_round": sec * 1e3}


def section_speculative(results, bank, built, budget_end, draft_vocab=0):
    """``draft_vocab`` N > 0: each acceptance is also timed with the draft's head cut to N
    tokens (`spec_decode.draft_vocab`; which N does not matter for the time)."""
    target = built["mamba2 50%"]
    draft_cfg = hybrid_config(LLAMA3_1B, range(16))
    with torch.device("meta"):
        draft = LlamaMambaHybridForCausalLM(draft_cfg)
    draft = randomize(draft)
    draft.model.rotary_emb = rotary(draft_cfg)
    draft.lm_head.weight = draft.model.embed_tokens.weight
    context, k = 1024, 4
    out = {"context": context, "k": k, "batch": 1}
    plain = decode_point(target, 1, context, iters=20)
    out["plain_tokens_per_s"] = plain.get("tokens_per_s")
    dplain = decode_point(draft.eval(), 1, context, iters=20)
    out["draft_alone_tokens_per_s"] = dplain.get("tokens_per_s")
    for p in (0.6, 0.8):
        if time.time() > budget_end:
            break
        row = time_speculative(target, draft, context, k, p)
        row.update(expected_tokens_per_round=(1 - p ** (k + 1)) / (1 - p),
                   speedup_vs_plain=row["tokens_per_s"] / out["plain_tokens_per_s"])
        if draft_vocab:
            cut = time_speculative(target, draft, context, k, p,
                                   torch.arange(draft_vocab, device=DEV))
            row[f"draft_vocab_{draft_vocab}"] = dict(
                cut, speedup_vs_plain=cut["tokens_per_s"] / out["plain_tokens_per_s"],
                x_full_head=row["ms_per_round"] / cut["ms_per_round"])
        out[f"accept_{p}"] = row
        log(json.dumps({f"spec accept={p}": row}))
    results["speculative"] = out
    del draft


def section_smollm2(results, bw):
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMOLLM2, bos_token_id=1, eos_token_id=2)
    with torch.device(DEV):
        teacher = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(3, cfg.vocab_size, (1, 32), device=DEV)
    new = 64
    out = {"prompt": 32, "new_tokens": new}

    def stock():
        teacher.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0)
    stock()
    torch.cuda.synchronize()
    t0 = time.time()
    stock()
    torch.cuda.synchronize()
    out["stock_generate_tokens_per_s"] = new / (time.time() - t0)
    log(f"stock transformers generate: {out['stock_generate_tokens_per_s']:.1f} tok/s")

    models = {"teacher": teacher}
    for variant in ("mamba2", "mamba1"):
        hcfg = hybrid_config_from_teacher(cfg, variant=variant, attn_fraction=0.5)
        with torch.device(DEV):
            hybrid = LlamaMambaHybridForCausalLM(hcfg).to(torch.bfloat16).eval()
        models[f"{variant} 50%"] = hybrid
    for name, model in models.items():
        gen = FastGenerator(model, 1, 1024)
        gen.generate(prompt, None, new, eos_token_id=[])
        torch.cuda.synchronize()
        t0 = time.time()
        gen.generate(prompt, None, new, eos_token_id=[])
        torch.cuda.synchronize()
        e2e = new / (time.time() - t0)
        ids = prompt[:, :1]
        step = timed(lambda: gen.forward(ids), 200)
        hyb = gen.model
        wbytes = weight_bytes_per_token(hyb)
        roof = bw / (wbytes + state_bytes_per_token(hyb.config, 32 + new))
        out[name] = {"generate_tokens_per_s": e2e, "decode_tokens_per_s": 1 / step,
                     "x_stock_generate": e2e / out["stock_generate_tokens_per_s"],
                     "decode_x_stock": (1 / step) / out["stock_generate_tokens_per_s"],
                     "roofline_tokens_per_s": roof, "roofline_share": (1 / step) / roof}
        log(json.dumps({name: out[name]}))
        del gen
    results["smollm2_135m"] = out


def print_tables(results):
    log("\n== hardware:", results["device"], f"copy bandwidth {results['copy_bw_gbs']:.0f} GB/s ==")
    rows = results.get("llama3_8b", [])
    if rows:
        base = {(r["batch"], r["context"]): r for r in rows if r["model"] == "transformer"}
        log("\nLlama-3-8B shape, decode tokens/s (x vs Transformer) | state MB/seq (% of Transformer)"
            " | roofline share at batch 1")
        log(f"{'model':14s} {'ctx':>6s} {'batch':>5s} {'tok/s':>9s} {'x':>6s} {'MB/seq':>8s} {'%mem':>5s} {'roof':>5s}")
        for r in rows:
            b = base.get((r["batch"], r["context"]), {})
            tps = r.get("tokens_per_s")
            x = (f"{tps / b['tokens_per_s']:.2f}" if tps and b.get("tokens_per_s")
                 else ("inf" if tps else "-"))
            mem = r.get("bytes_per_seq")
            pct = f"{100 * mem / b['bytes_per_seq']:.0f}" if mem and b.get("bytes_per_seq") else "-"
            roof = f"{100 * r['roofline_share']:.0f}%" if "roofline_share" in r else ""
            val = f"{tps:9.1f}" if tps else f"{r['status'][:12]:>12s}"
            log(f"{r['model']:14s} {r['context']:6d} {r['batch']:5d} {val} {x:>6s} "
                f"{(mem or 0) / 1e6:8.0f} {pct:>5s} {roof:>5s}")
    spec = results.get("speculative")
    if spec:
        log(f"\nSpeculative (8B 50% mamba2 + 1B draft, k={spec['k']}, batch 1, ctx {spec['context']}): "
            f"plain {spec['plain_tokens_per_s']:.1f} tok/s, draft alone {spec['draft_alone_tokens_per_s']:.1f}")
        for p in (0.6, 0.8):
            s = spec.get(f"accept_{p}")
            if s:
                log(f"  accept {p}: {s['tokens_per_s']:.1f} tok/s ({s['speedup_vs_plain']:.2f}x), "
                    f"{s['tokens_per_round']:.2f} tokens/round, {s['ms_per_round']:.2f} ms/round")
                for key, c in s.items():
                    if key.startswith("draft_vocab_"):
                        log(f"    head cut to {key[12:]} tokens: {c['tokens_per_s']:.1f} tok/s "
                            f"({c['speedup_vs_plain']:.2f}x), {c['ms_per_round']:.2f} ms/round "
                            f"({c['x_full_head']:.2f}x the full head's rounds)")
    sm = results.get("smollm2_135m")
    if sm:
        log(f"\nSmolLM2-135M shape, batch 1: stock generate {sm['stock_generate_tokens_per_s']:.1f} tok/s")
        for name in ("teacher", "mamba2 50%", "mamba1 50%"):
            if name in sm:
                s = sm[name]
                log(f"  {name:12s} generate {s['generate_tokens_per_s']:8.1f} tok/s ({s['x_stock_generate']:.0f}x)"
                    f"  decode step {s['decode_tokens_per_s']:8.1f} tok/s ({s['decode_x_stock']:.0f}x),"
                    f" roofline share {100 * s['roofline_share']:.0f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/decode_gpu.json")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the 8B table")
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--sections", default="smollm2,8b,spec")
    ap.add_argument("--draft-vocab", type=int, default=0,
                    help="spec: also time the draft with its head cut to this many tokens")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    bw = copy_bandwidth()
    results["copy_bw_gbs"] = bw / GB
    log(f"copy bandwidth {bw / GB:.0f} GB/s on {results['device']}")
    start = time.time()
    sections = args.sections.split(",")
    def guarded(name, fn, *a):
        try:
            return fn(*a)
        except Exception:  # noqa: BLE001 - report and go on with the next section
            traceback.print_exc()
            results[f"{name}_error"] = traceback.format_exc()[-2000:]
            return None

    try:
        if "smollm2" in sections:
            guarded("smollm2", section_smollm2, results, bw)
        if "8b" in sections:
            out = guarded("8b", section_8b, results, bw, start + args.budget,
                          [int(c) for c in args.contexts.split(",")],
                          [int(b) for b in args.batches.split(",")])
            if out and "spec" in sections:
                guarded("spec", section_speculative, results, *out, start + args.budget + 120,
                        args.draft_vocab)
    finally:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print_tables(results)


if __name__ == "__main__":
    main()
