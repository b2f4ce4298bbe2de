"""Held-out evaluation of a student (or any Llama dir) against its teacher.

* perplexity on held-out prose (the last essays of ``essays/``, never trained on);
* forward KL(teacher || model) per answer token and greedy-token agreement, teacher
  forced on the teacher's own greedy answers to held-out prompts (the prompts
  training never sees, see ``splits.py``);
* each model's own greedy answers scored by the teacher as judge, against the teacher's
  short answers, and for degeneration (``generation_eval.py``);
* a few answers of both models side by side.

``mamba-hybrid eval DIR --teacher TDIR [--out JSON]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from vllm_mamba_hybrid.checkpoint import check_model_dir

from .config import ConfigError, DataConfig, EvalConfig, check_eval_config
from .generation import generate_answers
from .generation_eval import GenerationReference
from .losses import greedy_agreement_count, kd_loss_sums
from .models import load_causal_lm, load_tokenizer
from .paths import resolve_data_dir
from .prompts import load_prompts, prompt_source
from .short_answers import short_answer_prompts
from .splits import heldout_essays
from .tokens import chat_prompt_ids, collate_lm, pad_id_of


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], *, max_tokens: int, seq_len: int) -> float:
    """exp(mean NLL) over consecutive ``seq_len`` windows of the concatenated texts."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    nll, count = 0.0, 0
    for w in windows:
        if len(w) < 2:
            continue
        x = torch.tensor([w], device=model.device)
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        nll -= float(logp.gather(-1, x[0, 1:, None]).sum())
        count += len(w) - 1
    return math.exp(nll / count)


def eval_inputs(data: DataConfig, cfg: EvalConfig, name=lambda key: f"`eval.{key}`"
                ) -> tuple[list[dict], list[Path], list[dict]]:
    """The held-out prompts, held-out essays and short-answer prompts an evaluation uses;
    settings the data cannot honour are refused naming the key (``name``: as in
    config.check_eval_config), before any model is loaded."""
    check_eval_config(cfg, name)
    data_dir = resolve_data_dir(data.data_dir)
    _, heldout = load_prompts(data)
    if len(heldout) < cfg.num_prompts:
        raise ConfigError(f"{name('num_prompts')} {cfg.num_prompts}: {prompt_source(data)} holds "
                          f"out only {len(heldout)} prompts (every {data.heldout_every}th row)")
    try:
        essays = heldout_essays(data_dir, cfg.num_essays)
    except FileNotFoundError as e:
        raise ConfigError(f"{name('num_essays')} {cfg.num_essays}: {e}") from None
    try:
        short = short_answer_prompts(essays, cfg.num_short_answers)
    except ValueError as e:
        raise ConfigError(f"{name('num_short_answers')} {cfg.num_short_answers}: {e} (raise "
                          f"{name('num_essays')} or lower {name('num_short_answers')})") from None
    return heldout[: cfg.num_prompts], essays, short


class TeacherReference:
    """The teacher's greedy answers and logits on held-out prompts, computed once and
    reused for every model compared against it (and its side of the generation scores)."""

    def __init__(self, teacher_dir: Path, prompts: list[dict], cfg: EvalConfig,
                 device: str = "cpu", short_prompts: list[dict] = ()) -> None:
        self.tokenizer = load_tokenizer(teacher_dir)
        self.device = torch.device(device)
        self.teacher = load_causal_lm(teacher_dir, torch.float32).to(self.device).eval()
        tok = self.tokenizer
        self.pad_id = pad_id_of(tok)
        self.prompts = prompts
        self.prompt_ids = [chat_prompt_ids(tok, p["instruction"]) for p in prompts]
        answers = generate_answers(self.teacher, self.prompt_ids, eos_id=tok.eos_token_id,
                                   pad_id=self.pad_id, max_new_tokens=cfg.max_new_tokens)
        self.examples = [{"prompt_ids": p, "answer_ids": a}
                         for p, a in zip(self.prompt_ids, answers)]
        self.batches = [{k: v.to(self.device) for k, v in
                         collate_lm(self.examples[i:i + 8], self.pad_id, 10 ** 9).items()}
                        for i in range(0, len(self.examples), 8)]
        self.logits = [self.teacher(input_ids=b["input_ids"],
                                    attention_mask=b["attention_mask"]).logits for b in self.batches]
        self.answers = answers
        self.generation = GenerationReference(self.teacher, tok, self.prompt_ids, answers,
                                              list(short_prompts), cfg, self.pad_id)

    @torch.no_grad()
    def compare(self, model) -> dict:
        kl_sum, tokens, agree = 0.0, 0, 0
        for b, t_logits in zip(self.batches, self.logits):
            s_logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            kl, _, n = kd_loss_sums(s_logits, t_logits, b["input_ids"], b["loss_mask"], "forward")
            a, _ = greedy_agreement_count(s_logits, t_logits, b["input_ids"], b["loss_mask"])
            kl_sum, tokens, agree = kl_sum + float(kl), tokens + n, agree + a
        return {"kl_to_teacher": kl_sum / tokens, "greedy_agreement": agree / tokens,
                "answer_tokens": tokens, "num_prompts": len(self.examples)}


def evaluate_models(model_dirs: dict[str, Path], teacher_dir: Path, *, data: DataConfig,
                    cfg: EvalConfig, log=print, device: str = "cpu") -> dict:
    """Metrics for each named model dir (and the teacher's own perplexity); float32
    weights on ``device`` (on CUDA, answers come from the fast runtime)."""
    t0 = time.perf_counter()
    heldout, essays, short = eval_inputs(data, cfg)
    texts = [p.read_text() for p in essays]
    log(f"eval: teacher answers {len(heldout)} held-out prompts and {len(short)} short-answer "
        f"prompts")
    ref = TeacherReference(teacher_dir, heldout, cfg, device, short)
    tok, gen = ref.tokenizer, ref.generation
    result = {
        "teacher": str(teacher_dir),
        "heldout_prompts": [p["index"] for p in heldout],
        "heldout_essays": [p.name for p in essays],
        "teacher_perplexity": perplexity(ref.teacher, tok, texts, max_tokens=cfg.ppl_max_tokens,
                                         seq_len=cfg.ppl_seq_len),
        "generation": {"max_new_tokens": cfg.max_new_tokens, "ngram": cfg.ngram,
                       "short_answer_max_new_tokens": cfg.short_answer_max_new_tokens},
        "judge_ceiling": gen.ceiling,
        "teacher_generation": gen.teacher_metrics,
        "short_answer_prompts": [dict(p, teacher=t) for p, t in zip(short, gen.teacher_short)],
        "models": {},
    }
    for name, model_dir in model_dirs.items():
        log(f"eval: {name} ({model_dir})")
        model = load_causal_lm(model_dir, torch.float32).to(device).eval()
        metrics = ref.compare(model)
        metrics["perplexity"] = perplexity(model, tok, texts, max_tokens=cfg.ppl_max_tokens,
                                           seq_len=cfg.ppl_seq_len)
        scores, answers = gen.evaluate(model)
        metrics.update(scores)
        metrics["samples"] = [
            {"prompt": p["instruction"],
             "teacher": tok.decode(t, skip_special_tokens=True).strip(),
             "model": tok.decode(a, skip_special_tokens=True).strip()}
            for p, t, a in zip(heldout[: cfg.num_samples], ref.answers, answers)]
        metrics["dir"] = str(model_dir)
        result["models"][name] = metrics
    result["eval_time_s"] = time.perf_counter() - t0
    return result


# (header, metric key, width, format): the table's columns, left to right.
COLUMNS = [("KL(teacher||model)", "kl_to_teacher", 19, ".4f"),
           ("greedy agree", "greedy_agreement", 13, ".3f"),
           ("perplexity", "perplexity", 11, ".2f"),
           ("judge logp", "judge_logp", 11, ".3f"),
           ("gap", "judge_gap", 7, ".3f"),
           ("short agree", "short_answer_agreement", 12, ".3f"),
           ("rep {n}-gram", "repeated_ngram_rate", 11, ".3f"),
           ("no stop", "never_stops", 8, ".3f")]


def format_table(result: dict) -> str:
    """Teacher, then each model; "-" where a result (an older eval.json) lacks a metric."""
    n = result.get("generation", {}).get("ngram", 4)
    teacher = {"kl_to_teacher": 0.0, "greedy_agreement": 1.0,
               "perplexity": result["teacher_perplexity"], **result.get("teacher_generation", {})}
    w = max([12, *map(len, result["models"])])
    rows = [f"{'model':<{w}} " + " ".join(f"{h.format(n=n):>{cw}}" for h, _, cw, _ in COLUMNS)]
    for name, m in [("teacher", teacher), *result["models"].items()]:
        cells = [format(m[k], f) if m.get(k) is not None else "-" for _, k, _, f in COLUMNS]
        rows.append(f"{name:<{w}} " + " ".join(f"{c:>{cw}}" for c, (_, _, cw, _) in
                                                zip(cells, COLUMNS)))
    return "\n".join(rows)


TABLE_LEGEND = (
    "KL and greedy agree: along the teacher's answers; judge logp: the teacher's mean per-token "
    "log-likelihood of the model's own greedy answers (the teacher row: the ceiling), gap: below "
    "the ceiling; short agree: short answers equal to the teacher's; rep n-gram: share of "
    "repeated token n-grams within answers; no stop: answers that hit max_new_tokens without EOS")


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mamba-hybrid eval", description=__doc__.splitlines()[0])
    p.add_argument("model", help="hybrid (or plain Llama) model directory")
    p.add_argument("--teacher", required=True, help="teacher directory")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--data-dir", help="directory with alpaca_eval_prompts.jsonl and essays/ "
                                      "(default: <repo>/../shared/data or $MAMBA_HYBRID_SHARED/data)")
    p.add_argument("--prompts", help="prompt dataset (default: alpaca_eval_prompts.jsonl)")
    p.add_argument("--prompt-column", default="instruction")
    p.add_argument("--heldout-every", type=int, default=DataConfig.heldout_every)
    p.add_argument("--num-prompts", type=int, default=EvalConfig.num_prompts)
    p.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
    p.add_argument("--num-essays", type=int, default=EvalConfig.num_essays)
    p.add_argument("--ppl-max-tokens", type=int, default=EvalConfig.ppl_max_tokens)
    p.add_argument("--num-samples", type=int, default=EvalConfig.num_samples)
    p.add_argument("--num-short-answers", type=int, default=EvalConfig.num_short_answers)
    p.add_argument("--short-answer-max-new-tokens", type=int,
                   default=EvalConfig.short_answer_max_new_tokens)
    p.add_argument("--ngram", type=int, default=EvalConfig.ngram,
                   help="order of the repeated n-grams counted as degeneration")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("mamba-hybrid eval: error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    import transformers
    transformers.utils.logging.disable_progress_bar()
    data = DataConfig(data_dir=args.data_dir, prompts=args.prompts, prompt_column=args.prompt_column,
                      heldout_every=args.heldout_every)
    cfg = EvalConfig(num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                     num_essays=args.num_essays, ppl_max_tokens=args.ppl_max_tokens,
                     num_samples=args.num_samples, num_short_answers=args.num_short_answers,
                     short_answer_max_new_tokens=args.short_answer_max_new_tokens, ngram=args.ngram)
    try:
        eval_inputs(data, cfg, name=lambda key: "--" + key.replace("_", "-"))  # flags, not keys
        for path in (args.model, args.teacher):  # before the teacher's answers are generated
            check_model_dir(path)
        result = evaluate_models({"model": Path(args.model)}, Path(args.teacher), data=data, cfg=cfg,
                                 log=lambda m: print(m, file=sys.stderr), device=args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"mamba-hybrid eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(TABLE_LEGEND)
    for s in result["models"]["model"]["samples"]:
        print(f"\n### {s['prompt']}\n--- teacher:\n{s['teacher']}\n--- model:\n{s['model']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0
