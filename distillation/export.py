"""Export: a servable model directory with a model card.

The directory holds the trained weights (safetensors), config, generation config
and the teacher's tokenizer/chat template, so ``vllm.LLM(model=DIR)`` (with the
plugin installed) and ``mamba-hybrid serve DIR`` load it as is. README.md is the
model card: architecture, stages, data, tokens seen, held-out metrics.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from .evaluate import TABLE_LEGEND, evaluate_models, format_table

_MODEL_FILES = ("config.json", "generation_config.json")
LAYER_PLOT = "layer_importance.png"


def export_model(ctx, final_dir: Path, init_dir: Path, export_dir: Path, summary: dict) -> None:
    """Write ``export_dir`` atomically (build beside it, then rename)."""
    from transformers import AutoTokenizer
    from vllm_mamba_hybrid.conversion.output_dir import atomic_output_dir

    cfg = ctx.cfg
    evaluation = None
    if cfg.stages.export.evaluate:
        models = {"init": init_dir, "final": final_dir} if init_dir != final_dir else {"final": final_dir}
        evaluation = evaluate_models(models, ctx.teacher_dir, data=cfg.data, cfg=cfg.eval, log=ctx.log,
                                     device=ctx.device)
        ctx.log("[export] held-out evaluation\n" + format_table(evaluation) + "\n" + TABLE_LEGEND)
    with atomic_output_dir(export_dir, overwrite=True) as tmp:
        for f in final_dir.iterdir():
            if f.suffix == ".safetensors" or f.name in _MODEL_FILES or f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
        AutoTokenizer.from_pretrained(ctx.teacher_dir).save_pretrained(tmp)
        if evaluation is not None:
            (tmp / "eval.json").write_text(json.dumps(evaluation, indent=1))
        importance = summary.get("layer_importance")
        if importance is not None:
            from .layer_importance import plot_scores
            plot = plot_scores(importance["scores"], importance["chosen"],
                               importance["criterion"], tmp / LAYER_PLOT)
            importance["plot"] = plot.name if plot else None
            if plot is None:
                ctx.log("[export] matplotlib is not installed: no layer importance plot")
        full = dict(summary, evaluation=evaluation, config=cfg.to_dict())
        (tmp / "distill_summary.json").write_text(json.dumps(full, indent=1, default=str))
        (tmp / "README.md").write_text(model_card(full))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _layer_choice(importance: dict | None) -> list[str]:
    """The card's account of `student.attn_layers: auto`: criterion, scores, plot."""
    if importance is None:
        return []
    from .layer_importance import CRITERIA
    scores, criterion = importance["scores"], importance["criterion"]
    return ["## Attention layer choice",
            f"Attention layers chosen by measured layer importance: {importance['chosen']}. "
            f"Criterion `{criterion}`: {CRITERIA[criterion]}; the highest scores keep attention.",
            "",
            "| layer | " + " | ".join(scores) + " |",
            "|---|" + "---|" * len(scores),
            "| score | " + " | ".join(f"{v:.4g}" for v in scores.values()) + " |", "",
            f"![layer importance]({importance['plot']})" if importance.get("plot")
            else "(no bar plot: matplotlib is not installed)", ""]


def model_card(s: dict) -> str:
    cfg = s["config"]
    mamba = [i for i in range(s["num_layers"]) if i not in s["attn_layers"]]
    lines = [
        f"# Hybrid {s['variant']}/attention model distilled from {Path(s['teacher']).name}",
        "",
        "Built with the `distillation` pipeline of vllm-mamba-hybrid, following *The Mamba in the "
        "Llama: Distilling and Accelerating Hybrid Models* (Wang et al., NeurIPS 2024).",
        "",
        "## Architecture",
        f"- teacher: `{s['teacher']}` ({s['num_layers']} layers)",
        f"- Mamba variant: {s['variant']}, initialised from attention "
        f"(V->x, K->B, Q->C, O->out_proj)" if cfg["student"]["mamba_init"] == "attention"
        else f"- Mamba variant: {s['variant']}, random initialisation",
        f"- attention layers ({len(s['attn_layers'])}): {s['attn_layers']}",
        f"- Mamba layers ({len(mamba)}): {mamba}",
        "",
        *_layer_choice(s.get("layer_importance")),
        "## Stages",
        "| stage | steps | tokens seen | first loss | last loss | first KL | last KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for st in s["stages"]:
        first, last = st.get("first", {}), st.get("last", {})
        lines.append(f"| {st['name']} | {st.get('steps', '-')} | {st.get('tokens_seen', '-')} | "
                     f"{_fmt(first.get('loss', '-'))} | {_fmt(last.get('loss', '-'))} | "
                     f"{_fmt(first.get('kl', '-'))} | {_fmt(last.get('kl', '-'))} |")
    lines += ["", f"Tokens seen in training (all stages, prompt + answer): {s['tokens_seen']}", ""]
    data = s.get("data") or {}
    if data:
        pl = data["pseudo_label_settings"]
        lines += ["## Data",
                  f"- prompts: `{data['prompt_source']}` (held-out rows excluded), "
                  f"{data['num_examples']} teacher answers, {data['answer_tokens']} answer tokens",
                  f"- pseudo-labels: vLLM, max_new_tokens={pl['max_new_tokens']}, "
                  f"temperature={pl['temperature']}, top_p={pl['top_p']}, seed={pl['seed']}", ""]
    ev = s.get("evaluation")
    if ev:
        lines += ["## Held-out evaluation",
                  f"Prompts: {len(ev['heldout_prompts'])} held-out AlpacaEval rows; perplexity on "
                  f"held-out essays {', '.join(ev['heldout_essays'])}.", "", "```",
                  format_table(ev), "```", "", TABLE_LEGEND + ".", ""]
        final = ev["models"].get("final")
        if final:
            lines += ["### Sample answers (greedy)", ""]
            for smp in final["samples"]:
                lines += [f"**Prompt:** {smp['prompt']}", "", f"*Teacher:* {smp['teacher']}", "",
                          f"*This model:* {smp['model']}", ""]
    lines += ["## Use",
              "```python",
              "from vllm import LLM, SamplingParams",
              "llm = LLM(model=\"<this directory>\")  # needs vllm-mamba-hybrid installed (plugin)",
              "```",
              "or `mamba-hybrid serve <this directory>`.", "",
              "## Config", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
