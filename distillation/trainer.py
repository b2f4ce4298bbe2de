"""The training loop every worker runs (Ray Train, torchrun or a single process).

Determinism is what makes resume exact: the examples of step ``s`` are a pure
function of (seed, s, rank, world, data_start), so a checkpoint needs only the step to
restore the data position; together with the model, optimizer, scheduler and RNG
states a resumed run continues the same loss curve. A stage that trains on from an
earlier one on the same data starts its walk where that one stopped (``data_start``;
the model's ``train_state.json`` records ``data_end``), so the two together see what
one stage of their summed steps would have seen.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

from . import checkpoint as ckpt
from .job import TrainJob
from .losses import dpo_loss_sums, kd_loss_sums, token_logps
from .models import DTYPES, is_trainable, load_causal_lm
from .tokens import collate_lm, collate_pairs, load_examples

PROGRESS = "progress.jsonl"
WORKERS = "workers.json"


class _Dist:
    """Rank, world and collectives; degenerate (no process group) for one process."""

    def __init__(self) -> None:
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.on:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def _walk(seed: int, n: int, pos: int) -> int:
    """The example at global position ``pos`` of the walk through seeded per-epoch shuffles."""
    return _epoch_order(seed, n, pos // n)[pos % n]


@functools.lru_cache(maxsize=4)
def _grouped_window(seed: int, n: int, w0: int, size: int, batch: int,
                    lengths: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The micro-batches of the window of walk positions [w0, w0 + size): its examples
    sorted by length, cut into micro-batches, in a seeded random order."""
    members = sorted((_walk(seed, n, pos) for pos in range(w0, w0 + size)),
                     key=lambda i: (lengths[i], i))
    slots = [tuple(members[i:i + batch]) for i in range(0, size, batch)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + 2 ** 40 + w0 // size)
    return tuple(slots[j] for j in torch.randperm(len(slots), generator=g).tolist())


def walk_position(step: int, *, world: int, batch: int, accum: int, offset: int = 0) -> int:
    """Walk position of step ``step``'s first example; a stage of s steps ends at step s."""
    return offset + step * world * batch * accum


def batch_indices(step: int, micro: int, rank: int, *, n: int, world: int, batch: int,
                  accum: int, seed: int, lengths: tuple[int, ...] | None = None,
                  group_steps: int = 0, offset: int = 0) -> list[int]:
    """Example indices of one micro-batch: a fixed walk through seeded per-epoch shuffles.

    With ``group_steps`` the walk is cut into windows of that many optimizer steps whose
    sequences are sorted by ``lengths`` into micro-batches (padding to the longest row
    then costs little), the micro-batches shuffled within the window: every example is
    still used once per pass, and the result is still a pure function of its arguments.
    ``offset`` is the walk position of step 0 (windows stay aligned to the walk, not to
    the offset, so consecutive stages split one window between them without overlap).
    """
    start = (walk_position(step, world=world, batch=batch, accum=accum, offset=offset)
             + (micro * world + rank) * batch)
    if not group_steps:
        return [_walk(seed, n, pos) for pos in range(start, start + batch)]
    size = world * batch * accum * group_steps
    w0 = start - start % size
    return list(_grouped_window(seed, n, w0, size, batch, lengths)[(start - w0) // batch])


def _sequence_lengths(examples: list[dict], objective: str, max_length: int) -> tuple[int, ...]:
    """Tokens per collated row (a DPO pair pads to its longer answer)."""
    def answer(e):
        return len(e["answer_ids"]) if objective == "kd" else max(len(e["chosen_ids"]),
                                                                   len(e["rejected_ids"]))
    return tuple(min(max_length, len(e["prompt_ids"]) + answer(e)) for e in examples)


def _wrap(model: torch.nn.Module, job: TrainJob, d: _Dist, device: torch.device):
    if d.world == 1:
        return model
    if job.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _scheduler(optimizer, job: TrainJob):
    from transformers import get_scheduler
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[job.scheduler]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=job.warmup_steps,
                         num_training_steps=job.steps)


def compile_layers(model: torch.nn.Module, widths: int = 1) -> None:
    """torch.compile each decoder layer in place (regional compilation).

    Layers of one type share code and shapes, so one compiled graph serves them all
    and compile time stays that of one layer, not of the whole model; the rest of the
    model (embedding, final norm, head) is a handful of kernels and stays eager.
    ``dynamic=False``: the trainer pads every micro-batch to one width, or to one of
    ``widths`` (``TrainJob.pad_multiple``); each width is a graph per layer type and
    grad mode (student and teacher share the attention layer's code, and a
    progressive run's next stage brings a new model), so dynamo's recompile limit
    must allow them all or layers silently fall back to eager.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * widths)
    for layer in model.model.layers:
        layer.compile(dynamic=False)


def _frozen_model(path: str, dtype: torch.dtype, device: torch.device):
    m = load_causal_lm(path, dtype).to(device).eval()
    m.requires_grad_(False)
    return m


def _write_workers(path: Path, stage: str, resumed_from: int, workers: list[dict]) -> None:
    """``workers.json``: the processes training the stage now (host and pid per rank, to
    watch or stop one: Ray and torchrun workers are not the driver's children) and the
    checkpoint step they resumed from (0: a fresh start). Each start of the worker
    group, a restart after a failure included, rewrites it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stage": stage, "resumed_from_step": resumed_from,
                               "started": time.time(), "workers": workers}, indent=1))
    os.replace(tmp, path)


def _rewind_progress(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so the curve continues without duplicates."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def train_worker(job_dict: dict) -> None:
    """Run (or resume) one stage on this worker; rank 0 writes logs, checkpoints, model."""
    job = TrainJob(**job_dict)
    transformers.utils.logging.disable_progress_bar()
    d = _Dist()
    if job.threads:
        torch.set_num_threads(job.threads)
    if job.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)   # max_memory_gb: this stage's own peak
    else:
        device = torch.device("cpu")
    torch.manual_seed(job.seed + d.rank)
    dtype = DTYPES[job.dtype]
    stage_dir = Path(job.stage_dir)
    ckpt_root = stage_dir / "checkpoints"

    # Mixed precision: float32 master weights and optimizer state, low-precision compute
    # under autocast (pure bf16 weights would round away most AdamW updates).
    student = load_causal_lm(job.init_dir, torch.float32).to(device)
    student.train()
    for name, p in student.named_parameters():
        p.requires_grad_(is_trainable(name, freeze_mlp=job.freeze_mlp,
                                      freeze_embeddings=job.freeze_embeddings))
    if not any(p.requires_grad for p in student.parameters()):
        raise RuntimeError(f"stage {job.stage}: no trainable parameters (freeze_mlp on a model "
                           f"without Mamba layers?)")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    other = _frozen_model(job.teacher_dir if job.objective == "kd" else job.ref_dir, dtype, device)
    if job.compile:
        widths = -(-job.max_length // job.pad_multiple) if job.pad_multiple else 1
        compile_layers(student, widths)
        compile_layers(other, widths)
    model = _wrap(student, job, d, device)
    # After wrapping: FSDP replaces the parameters with sharded ones.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job.lr, betas=(0.9, 0.98),
                                  weight_decay=job.weight_decay)
    scheduler = _scheduler(optimizer, job)
    examples = load_examples(job.data_file)
    if job.objective == "kd":
        # A prompt as long as max_length leaves no answer token to learn from.
        examples = [e for e in examples if len(e["prompt_ids"]) < job.max_length]
        if not examples:
            raise RuntimeError(f"stage {job.stage}: every prompt is at least max_length "
                               f"({job.max_length}) tokens long: no answer token to train on")
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    step, tokens_seen = 0, 0
    last = ckpt.latest_checkpoint(ckpt_root)
    if last is not None:
        state = ckpt.load(last, rank=d.rank, world=d.world)
        set_model_state_dict(model, state["model"], options=full)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        step, tokens_seen = state["meta"]["step"], state["meta"]["tokens_seen"]
    workers = d.gather({"rank": d.rank, "host": socket.gethostname(), "pid": os.getpid()})
    if d.rank == 0:
        stage_dir.mkdir(parents=True, exist_ok=True)
        _rewind_progress(stage_dir / PROGRESS, step)
        _write_workers(stage_dir / WORKERS, job.stage, step, workers)
    d.barrier()

    collate = collate_lm if job.objective == "kd" else collate_pairs
    n = len(examples)
    lengths = (_sequence_lengths(examples, job.objective, job.max_length)
               if job.length_grouping_steps else None)
    while step < job.steps:
        t0 = time.perf_counter()
        micro = [collate([examples[i] for i in batch_indices(
                    step, j, d.rank, n=n, world=d.world, batch=job.batch_size,
                    accum=job.grad_accum, seed=job.seed, lengths=lengths,
                    group_steps=job.length_grouping_steps, offset=job.data_start)],
                    job.pad_id, job.max_length,
                    (job.pad_multiple or job.max_length) if job.compile else None)
                 for j in range(job.grad_accum)]
        if job.objective == "kd":
            local_count = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro)
        else:
            local_count = sum(b["input_ids"].shape[0] // 2 for b in micro)
        (global_count,) = d.sum([local_count], device)
        # kd: kl, ce, -, tokens; dpo: loss, margin, accuracy, tokens, chosen and rejected rewards
        sums = torch.zeros(6, dtype=torch.float64)
        for j, b in enumerate(micro):
            b = {k: v.to(device) for k, v in b.items()}
            sync = j == job.grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast:
                    # use_cache=False: a fresh KV cache object per call would also make
                    # a compiled layer recompile every step
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                use_cache=False).logits
                    with torch.no_grad():
                        other_logits = other(input_ids=b["input_ids"],
                                             attention_mask=b["attention_mask"],
                                             use_cache=False).logits
                if job.objective == "kd":
                    kl, ce, _ = kd_loss_sums(out, other_logits, b["input_ids"], b["loss_mask"],
                                             job.kl_direction)
                    loss = (job.kl_weight * kl + job.ce_weight * ce) / global_count * d.world
                    sums[:2] += torch.tensor([kl.item(), ce.item()], dtype=torch.float64)
                else:
                    loss_sum, rewards = dpo_loss_sums(
                        token_logps(out, b["input_ids"]), token_logps(other_logits, b["input_ids"]),
                        b["input_ids"], b["attention_mask"], b["loss_mask"],
                        loss_type=job.dpo_loss_type, beta=job.beta,
                        label_smoothing=job.label_smoothing)
                    loss = loss_sum / global_count * d.world
                    sums += torch.tensor([loss_sum.item(), rewards["reward_margin"],
                                          rewards["reward_accuracy"], 0, rewards["reward_chosen"],
                                          rewards["reward_rejected"]], dtype=torch.float64)
                loss.backward()
            sums[3] += float(b["attention_mask"].sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, job.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        totals = d.sum(sums.tolist(), device)
        tokens_seen += int(totals[3])
        if d.rank == 0 and (step % job.log_every == 0 or step == job.steps):
            dt = time.perf_counter() - t0
            rec = {"step": step, "lr": scheduler.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "tokens_seen": tokens_seen,
                   "tokens_per_s": totals[3] / dt, "tokens_per_s_per_worker": totals[3] / dt / d.world,
                   "step_time_s": dt, "time": time.time()}
            if device.type == "cuda":   # sizes micro-batches and students sharing a GPU
                rec["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if job.objective == "kd":
                rec.update(kl=totals[0] / global_count, ce=totals[1] / global_count,
                           loss=(job.kl_weight * totals[0] + job.ce_weight * totals[1]) / global_count,
                           answer_tokens=int(global_count))
            else:
                rec.update(loss=totals[0] / global_count, reward_margin=totals[1] / global_count,
                           reward_accuracy=totals[2] / global_count,
                           reward_chosen=totals[4] / global_count,
                           reward_rejected=totals[5] / global_count, pairs=int(global_count))
            with open(stage_dir / PROGRESS, "a") as f:
                f.write(json.dumps(rec) + "\n")

        if step % job.checkpoint_every == 0 or step == job.steps:
            msd = get_model_state_dict(model, options=full)
            osd = get_optimizer_state_dict(model, optimizer, options=full)
            ckpt.save(ckpt_root, step, rank=d.rank, world=d.world, barrier=d.barrier,
                      model_state=msd if d.rank == 0 else None,
                      optim_state=osd if d.rank == 0 else None,
                      sched_state=scheduler.state_dict(),
                      meta={"stage": job.stage, "tokens_seen": tokens_seen}, keep=job.keep_checkpoints)

    msd = get_model_state_dict(model, options=full)
    if d.rank == 0:
        student.save_pretrained(stage_dir / "model", state_dict=msd)
        (stage_dir / "model" / "train_state.json").write_text(
            json.dumps({"steps": step, "tokens_seen": tokens_seen, "data_end": walk_position(
                step, world=d.world, batch=job.batch_size, accum=job.grad_accum,
                offset=job.data_start)}))
    d.barrier()


def main(argv: list[str]) -> int:
    """torchrun entry: ``python -m distillation.trainer JOB.json``."""
    job = json.loads(Path(argv[0]).read_text())
    backend = "nccl" if job["device"] == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        train_worker(job)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
