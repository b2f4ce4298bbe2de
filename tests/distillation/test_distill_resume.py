"""Checkpoints: a run killed mid-stage resumes to the same parameters; a crash while a
checkpoint is written leaves the previous one in charge."""
import gc
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distillation import checkpoint as ckpt
from distillation.config import BackendConfig
from distillation.job import TrainJob
from distillation.launch import run_job
from distillation.tokens import load_examples, save_examples
from distillation.trainer import PROGRESS, WORKERS, train_worker
from tests.utils import REPO, kill_stage_worker, make_random_llama, random_kd_examples
from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher, init_hybrid_from_teacher,
                                               save_hybrid)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    teacher = make_random_llama(root / "teacher", num_layers=2, hidden_size=64, heads=2, kv_heads=1,
                                scale=2.0)
    hcfg = hybrid_config_from_teacher(teacher.config, variant="mamba2", attn_layers=[1])
    save_hybrid(init_hybrid_from_teacher(teacher, hcfg), root / "init", tokenizer_dir=root / "teacher")
    torch.save(random_kd_examples(20, prompt=(2, 6), answer=(3, 12)), root / "examples.pt")
    return root


def _job(root, name, **kw):
    job = dict(stage=name, stage_dir=str(root / name), init_dir=str(root / "init"),
               data_file=str(root / "examples.pt"), objective="kd",
               teacher_dir=str(root / "teacher"), steps=6, lr=3e-3, batch_size=3,
               grad_accum=2, checkpoint_every=2, ce_weight=0.5, max_length=64,
               keep_checkpoints=2)
    return TrainJob(**(job | kw)).to_dict()


def _curve(stage_dir):
    return [json.loads(ln)["loss"] for ln in (stage_dir / PROGRESS).read_text().splitlines()]


def _workers(stage_dir):
    return json.loads((stage_dir / WORKERS).read_text())


# The child of _train_until_killed. Test code, not the trainer's: it holds the child
# after the checkpoint of the given step, so the kill lands there and not at a later
# step of a run this small (its six steps take well under a second).
_HOLD_AFTER_CHECKPOINT = """
import json, sys, time
import torch
from distillation import checkpoint, trainer

job, hold_at = json.loads(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
save = checkpoint.save

def save_then_hold(root, step, **kw):
    path = save(root, step, **kw)
    while step == hold_at:
        time.sleep(1)
    return path

checkpoint.save = save_then_hold
trainer.train_worker(job)
"""


def _train_until_killed(job: dict, step: int) -> None:
    """Train ``job`` in a child process and SIGKILL it once the checkpoint of ``step`` is
    on disk: a real crash at a known step. The child uses this process's thread count,
    so its steps are bit-equal to the ones trained here."""
    stage_dir = Path(job["stage_dir"])
    done = ckpt.checkpoint_dir(stage_dir / "checkpoints", step) / ckpt.META
    with open(stage_dir.with_suffix(".log"), "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLD_AFTER_CHECKPOINT, json.dumps(job), str(step),
             str(torch.get_num_threads())],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
            stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        try:
            while not done.is_file():
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"{stage_dir.name}: no checkpoint of step {step} (exit code "
                                f"{proc.returncode}):\n{log.read()[-3000:]}")
                time.sleep(0.05)
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_resume_matches_uninterrupted_run(setup):
    root = setup
    train_worker(_job(root, "straight"))
    assert _workers(root / "straight")["workers"] == [
        {"rank": 0, "host": socket.gethostname(), "pid": os.getpid()}]
    _train_until_killed(_job(root, "interrupted"), 4)
    assert ckpt.latest_checkpoint(root / "interrupted" / "checkpoints").name == "step_0000004"
    assert not (root / "interrupted" / "model").exists()
    train_worker(_job(root, "interrupted"))  # resumes from step 4
    assert _workers(root / "interrupted")["resumed_from_step"] == 4

    a = load_file(root / "straight" / "model" / "model.safetensors")
    b = load_file(root / "interrupted" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    init = load_file(root / "init" / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training did move the weights
    # Tolerance: exact. One process on CPU, same data order, optimizer and RNG states.
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The loss curve continues: steps 1..6 once each, the same values.
    assert _curve(root / "straight") == _curve(root / "interrupted")
    assert len(_curve(root / "interrupted")) == 6


@pytest.mark.gpu
def test_ray_gpu_worker_killed_resumes_like_uninterrupted_run(setup):
    """The ``ray`` backend with one GPU worker: SIGKILLed after a checkpoint, Ray restarts
    the worker group, which resumes from that checkpoint and ends where an uninterrupted
    run on the same GPU ends."""
    ray = pytest.importorskip("ray", reason="ray[train] is not installed (on the lent GPU "
                                            "machine: tools/gpu_stage.py stages it)")
    root, steps, kill_after = setup, 60, 5
    kw = dict(device="cuda", steps=steps, checkpoint_every=5)
    run_job(TrainJob(**_job(root, "gpu-straight", **kw)), BackendConfig(kind="local", device="cuda"))
    stage = root / "gpu-ray"
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=kill_stage_worker, daemon=True,
                              args=(stage, kill_after, killed, stop))
    killer.start()
    try:
        run_job(TrainJob(**_job(root, stage.name, **kw)),
                BackendConfig(kind="ray", num_workers=1, device="cuda", max_failures=1))
    finally:
        stop.set()
        killer.join()
        ray.shutdown()
    assert killed, f"no worker was killed: the stage ended before a checkpoint of step {kill_after}"
    workers = _workers(stage)
    assert killed["pid"] not in [w["pid"] for w in workers["workers"]]
    assert kill_after <= workers["resumed_from_step"] < steps
    # Tolerance: GPU kernels may sum in another order in another process; the curve and
    # weights agree to float32 round-off carried through 60 Adam steps, not bit for bit.
    straight, resumed = _curve(root / "gpu-straight"), _curve(stage)
    assert len(resumed) == steps
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-4, atol=1e-5)
    a = load_file(root / "gpu-straight" / "model" / "model.safetensors")
    b = load_file(stage / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_crash_during_checkpoint_write_keeps_last_good(setup):
    root = setup
    stage = root / "straight"
    ckroot = stage / "checkpoints"
    before = ckpt.latest_checkpoint(ckroot)
    assert before.name == "step_0000006"

    calls = []

    def dying_barrier():  # the second barrier comes after the files, before the rename
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing the checkpoint")

    with pytest.raises(KeyboardInterrupt):
        ckpt.save(ckroot, 8, rank=0, world=1, barrier=dying_barrier,
                  model_state={"w": torch.ones(2)}, optim_state={}, sched_state={},
                  meta={"tokens_seen": 0}, keep=2)
    assert (ckroot / ".tmp-step_0000008" / "model.pt").exists()  # half-written, never renamed
    assert ckpt.latest_checkpoint(ckroot) == before
    state = ckpt.load(before, rank=0, world=1)
    assert state["meta"]["step"] == 6


def test_checkpoint_files_load_with_weights_only(tmp_path):
    """Every file of a checkpoint loads with weights_only=True, the RNG streams included:
    restored, they draw what they drew after the save. A file that needs more (an older
    checkpoint's numpy RNG state) stops the resume with its name."""
    path = ckpt.save(tmp_path, 1, rank=0, world=1, barrier=lambda: None,
                     model_state={"w": torch.ones(2)}, optim_state={"state": {}},
                     sched_state={"last_epoch": 1}, meta={"tokens_seen": 5}, keep=1)
    drawn = torch.rand(3), random.random()
    state = ckpt.load(path, rank=0, world=1)
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), drawn[0]) and random.random() == drawn[1]
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["meta"]["tokens_seen"] == 5
    assert state["scheduler"] == {"last_epoch": 1}

    torch.save({"numpy": np.random.get_state()}, path / "rng_rank0.pt")
    with pytest.raises(RuntimeError, match=re.escape(f"checkpoint file {path / 'rng_rank0.pt'} "
                                                     f"cannot be read with weights_only=True")):
        ckpt.load(path, rank=0, world=1)


def test_examples_files_load_with_weights_only(tmp_path):
    """The trainer's examples (and DPO pairs) load with weights_only=True; anything else
    in their place is refused with the file's name."""
    examples = random_kd_examples(5, prompt=(0, 4), answer=(1, 6))
    save_examples(examples, tmp_path / "examples.pt")          # the packed format
    assert load_examples(tmp_path / "examples.pt") == examples
    packed = torch.load(tmp_path / "examples.pt", weights_only=True)
    del packed["answer_ids.lengths"]
    torch.save(packed, tmp_path / "damaged.pt")
    with pytest.raises(RuntimeError, match=re.escape(f"{tmp_path / 'damaged.pt'}: a damaged examples file")):
        load_examples(tmp_path / "damaged.pt")
    torch.save(examples, tmp_path / "plain.pt")                # a plain list still loads
    assert load_examples(tmp_path / "plain.pt") == examples
    with pytest.raises(ValueError, match="the same fields"):
        save_examples([{"prompt_ids": [1]}, {"answer_ids": [2]}], tmp_path / "mixed.pt")
    torch.save([{"prompt_ids": np.arange(3)}], tmp_path / "numpy.pt")
    with pytest.raises(RuntimeError, match=re.escape(f"{tmp_path / 'numpy.pt'}: not an examples "
                                                     f"file readable with weights_only=True")):
        load_examples(tmp_path / "numpy.pt")
    torch.save({"prompt_ids": [1]}, tmp_path / "dict.pt")
    with pytest.raises(RuntimeError, match=re.escape(f"{tmp_path / 'dict.pt'}: expected examples")):
        load_examples(tmp_path / "dict.pt")


def test_resume_refuses_other_world_size(setup):
    last = ckpt.latest_checkpoint(setup / "straight" / "checkpoints")
    with pytest.raises(RuntimeError, match="written by 1 workers, this run has 2"):
        ckpt.load(last, rank=0, world=2)


def test_length_grouping_pads_less_and_keeps_the_walk():
    """Grouped micro-batches hold exactly the examples of the plain walk, window by
    window, each once, and pad far less on mixed lengths; the walk stays a pure function
    (what resume relies on)."""
    from distillation.trainer import batch_indices
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    n, world, batch, accum, steps, group = 203, 2, 4, 3, 40, 5
    lengths = tuple(torch.randint(8, 512, (n,), generator=g).tolist())
    kw = dict(n=n, world=world, batch=batch, accum=accum, seed=3)

    def run(**extra):
        return [[batch_indices(s, j, r, **kw, **extra) for j in range(accum) for r in range(world)]
                for s in range(steps)]
    plain, grouped = run(), run(lengths=lengths, group_steps=group)
    assert grouped == run(lengths=lengths, group_steps=group)
    for w in range(0, steps, group):   # a window of `group` steps: same examples, once each
        flat = lambda walk: sorted(i for s in walk[w:w + group] for mb in s for i in mb)
        assert flat(grouped) == flat(plain)
    padded = lambda walk: sum(batch * max(lengths[i] for i in mb) for s in walk for mb in s)
    real = sum(lengths[i] for s in plain for mb in s for i in mb)
    assert real / padded(grouped) > 0.9 > real / padded(plain)


def test_consecutive_stages_continue_one_walk():
    """A stage of s steps, then one that starts where it stopped (offset = the first's
    data_end), use exactly the micro-batches of one stage of 2s steps: no example seen
    twice before the pass is over, also when a grouping window straddles the boundary."""
    from distillation.trainer import batch_indices
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    n, world, batch, accum, s = 203, 2, 3, 2, 7   # 2s steps: 168 of the 203 examples
    lengths = tuple(torch.randint(8, 512, (n,), generator=g).tolist())
    for extra in ({}, {"lengths": lengths, "group_steps": 5}):
        kw = dict(n=n, world=world, batch=batch, accum=accum, seed=5, **extra)

        def walk(steps, offset=0):
            return [batch_indices(t, j, r, offset=offset, **kw)
                    for t in range(steps) for j in range(accum) for r in range(world)]
        first, second = walk(s), walk(s, offset=s * world * batch * accum)
        assert first + second == walk(2 * s)
        assert not {i for mb in first for i in mb} & {i for mb in second for i in mb}


def _live_training_objects() -> int:
    """Models and optimizers anywhere in this process (type(): a dead weak proxy among
    the objects would raise on isinstance)."""
    import transformers
    kinds = (transformers.PreTrainedModel, torch.optim.Optimizer)
    return sum(issubclass(type(o), kinds) for o in gc.get_objects())


def test_a_local_stage_frees_its_models_before_the_next(setup):
    """Study run 12: stages run one after another in one process (backend local), and a
    progressive student's second stage ran out of GPU memory while the first stage's
    student and optimizer, kept alive by reference cycles, still held ~2 GiB. With the
    cyclic collector off, as it may be for long stretches of a run, nothing of a
    finished stage may remain."""
    gc.collect()
    before = _live_training_objects()
    job = TrainJob(**{**_job(setup, "frees-memory"), "steps": 2, "checkpoint_every": 100})
    gc.disable()
    try:
        run_job(job, BackendConfig(kind="local", num_workers=1))
        left = _live_training_objects()
    finally:
        gc.enable()
    assert (setup / "frees-memory" / "model" / "config.json").is_file()
    assert left == before


def test_data_end_of_a_bad_training_state_is_named(tmp_path):
    from distillation.pipeline import data_end
    assert data_end(tmp_path) == 0                         # no stage trained this model
    state = tmp_path / "train_state.json"
    state.write_text(json.dumps({"steps": 3}))             # written before data_end existed
    assert data_end(tmp_path) == 0
    state.write_text(json.dumps({"steps": 3, "data_end": 96}))
    assert data_end(tmp_path) == 96
    for bad, match in (("{not json", "not a training state"), ("[1]", "not a training state"),
                       ('{"data_end": -4}', "data_end must be"),
                       ('{"data_end": "12"}', "data_end must be")):
        state.write_text(bad)
        with pytest.raises(RuntimeError, match=f"train_state.json: {match}"):
            data_end(tmp_path)


def test_length_grouped_training_resumes_exactly(setup):
    """Killed after a checkpoint inside a grouping window (steps 3-5), the resumed run
    ends with the uninterrupted run's weights and loss curve."""
    train_worker(_job(setup, "grouped", length_grouping_steps=3))
    _train_until_killed(_job(setup, "grouped-resumed", length_grouping_steps=3), 4)
    train_worker(_job(setup, "grouped-resumed", length_grouping_steps=3))
    assert _workers(setup / "grouped-resumed")["resumed_from_step"] == 4
    a = load_file(setup / "grouped" / "model" / "model.safetensors")
    b = load_file(setup / "grouped-resumed" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(setup / "grouped") == _curve(setup / "grouped-resumed")


def test_grouping_lengths_are_the_collated_widths():
    """The length a row is grouped by is the width collate gives it alone (kd rows and
    DPO pairs, with and without truncation)."""
    from distillation.tokens import collate_lm, collate_pairs
    from distillation.trainer import _sequence_lengths
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    ids = lambda: [3] * int(torch.randint(1, 40, (1,), generator=g))
    kd = [{"prompt_ids": ids(), "answer_ids": ids()} for _ in range(20)]
    dpo = [{"prompt_ids": ids(), "chosen_ids": ids(), "rejected_ids": ids()} for _ in range(20)]
    for max_length in (30, 200):
        assert _sequence_lengths(kd, "kd", max_length) == tuple(
            collate_lm([e], 0, max_length)["input_ids"].shape[1] for e in kd)
        assert _sequence_lengths(dpo, "dpo", max_length) == tuple(
            collate_pairs([e], 0, max_length)["input_ids"].shape[1] for e in dpo)


def _dpo_job(root, name, **kw):
    """A DPO stage on random pairs, the reference being the starting student."""
    if not (root / "pairs.pt").is_file():
        kd = random_kd_examples(24, prompt=(2, 6), answer=(3, 12), seed=1)
        torch.save([{"prompt_ids": a["prompt_ids"], "chosen_ids": a["answer_ids"],
                     "rejected_ids": b["answer_ids"]} for a, b in zip(kd[:12], kd[12:])],
                   root / "pairs.pt")
    job = dict(stage=name, stage_dir=str(root / name), init_dir=str(root / "init"),
               data_file=str(root / "pairs.pt"), objective="dpo", ref_dir=str(root / "init"),
               steps=6, lr=3e-3, batch_size=2, grad_accum=2, checkpoint_every=2, max_length=64,
               keep_checkpoints=2, beta=0.5)
    return TrainJob(**{**job, **kw}).to_dict()


def _records(stage_dir):
    return [json.loads(ln) for ln in (stage_dir / PROGRESS).read_text().splitlines()]


def test_dpo_stage_through_trl_loss_resumes_exactly(setup):
    """The DPO objective (trl's loss): log 2 at step 1, where the policy is its reference;
    the loss falls and the chosen answers gain reward; a run killed after a checkpoint
    resumes to the uninterrupted run's weights and curve."""
    train_worker(_dpo_job(setup, "dpo"))
    recs = _records(setup / "dpo")
    assert [r["step"] for r in recs] == list(range(1, 7)) and recs[0]["pairs"] == 4
    assert recs[0]["loss"] == pytest.approx(np.log(2), rel=1e-6)
    assert recs[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert recs[0]["reward_chosen"] == pytest.approx(0, abs=1e-6)
    assert recs[-1]["loss"] < recs[0]["loss"] and recs[-1]["reward_margin"] > 0
    for r in recs:
        assert r["reward_margin"] == pytest.approx(r["reward_chosen"] - r["reward_rejected"],
                                                   abs=1e-9)
        assert 0 <= r["reward_accuracy"] <= 1

    _train_until_killed(_dpo_job(setup, "dpo-resumed"), 4)
    train_worker(_dpo_job(setup, "dpo-resumed"))
    assert _workers(setup / "dpo-resumed")["resumed_from_step"] == 4
    a = load_file(setup / "dpo" / "model" / "model.safetensors")
    b = load_file(setup / "dpo-resumed" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "loss", "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected")
    assert ([{k: r[k] for k in keys} for r in _records(setup / "dpo")]
            == [{k: r[k] for k in keys} for r in _records(setup / "dpo-resumed")])


@pytest.mark.parametrize("loss_type,smoothing", [("ipo", 0.0), ("robust", 0.2)])
def test_dpo_stage_runs_other_trl_losses(setup, loss_type, smoothing):
    train_worker(_dpo_job(setup, f"dpo-{loss_type}", steps=2, dpo_loss_type=loss_type,
                          label_smoothing=smoothing))
    recs = _records(setup / f"dpo-{loss_type}")
    z = 0.0   # step 1: policy = reference, every log-ratio 0
    want = {"ipo": (z - 1 / (2 * 0.5)) ** 2,
            "robust": (-(1 - smoothing) * np.log(0.5) + smoothing * np.log(0.5)) / (1 - 2 * smoothing)}
    assert recs[0]["loss"] == pytest.approx(want[loss_type], rel=1e-6)
    assert np.isfinite(recs[-1]["loss"])
