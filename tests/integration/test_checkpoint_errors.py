"""Broken checkpoints and bad paths on every load path outside vLLM (vLLM's own is in
tests/model_executor/test_vllm_engine.py): one error naming the tensor and its file, before any work,
and no output directory left behind; an interrupted `distill` says how to resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from distillation.trainer import PROGRESS
from tests.utils import (
    DAMAGES,
    damaged_copy,
    make_random_hybrid,
    make_random_llama,
    write_paper_checkpoint,
)
from vllm_mamba_hybrid.checkpoint import CheckpointError, load_causal_lm

MAMBA_TENSOR = "model.layers.0.mamba.in_proj.weight"
KW = dict(hidden_size=64, heads=2, kv_heads=1, intermediate_size=128)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    d = tmp_path_factory.mktemp("ok") / "hybrid"
    make_random_hybrid(d, "mamba2", tokenizer=True, **KW)
    return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("ok") / "teacher"
    make_random_llama(d, num_layers=4, **KW)
    return d


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_mamba_hybrid.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("damage", DAMAGES)
def test_reference_loader_names_tensor_and_file(hybrid, tmp_path, damage):
    """The one loader of the reference model (CLI generate, eval, distillation, the draft
    proposer and the runtime all load through it)."""
    expect = damaged_copy(hybrid, tmp_path / "broken", damage, MAMBA_TENSOR)
    with pytest.raises(CheckpointError) as e:
        load_causal_lm(tmp_path / "broken")
    assert all(piece in str(e.value) for piece in expect), (expect, str(e.value))


@pytest.mark.parametrize("damage", ["nan", "missing", "truncated"])
def test_cli_generate_fails_by_name(hybrid, tmp_path, damage):
    """Before: exit 0 with empty text (NaN), random values for a missing tensor, a raw
    SafetensorError (truncated)."""
    expect = damaged_copy(hybrid, tmp_path / "broken", damage, MAMBA_TENSOR)
    proc = _cli("generate", tmp_path / "broken", "--prompt", "hello")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert all(piece in proc.stderr for piece in expect), proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_and_eval_on_a_directory_that_is_no_model(hybrid, tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    proc = _cli("generate", empty, "--prompt", "hi")
    assert proc.returncode == 2 and f"{empty} is not a model directory (no config.json)" in proc.stderr
    t0 = time.time()
    proc = _cli("eval", empty, "--teacher", hybrid, "--num-prompts", "2")
    assert proc.returncode == 2 and "is not a model directory" in proc.stderr, proc.stderr
    assert time.time() - t0 < 60, "eval did work before checking its inputs"


def test_serve_refuses_a_broken_directory_before_vllm_starts(hybrid, tmp_path):
    expect = damaged_copy(hybrid, tmp_path / "broken", "truncated", "")
    t0 = time.time()
    proc = _cli("serve", tmp_path / "broken", "--port", "1")
    assert proc.returncode == 2 and all(piece in proc.stderr for piece in expect), proc.stderr
    assert time.time() - t0 < 60, "the server started before the directory was checked"


def test_eval_refuses_a_nan_checkpoint_before_generating(hybrid, teacher, tmp_path):
    expect = damaged_copy(hybrid, tmp_path / "broken", "nan", MAMBA_TENSOR)
    proc = _cli("eval", tmp_path / "broken", "--teacher", teacher, "--num-prompts", "2")
    assert proc.returncode == 2 and all(piece in proc.stderr for piece in expect), proc.stderr


def test_draft_proposer_loads_strictly(hybrid, tmp_path):
    from vllm_mamba_hybrid.spec_decode.draft_proposer import load_draft_model
    expect = damaged_copy(hybrid, tmp_path / "broken", "wrong_shape", MAMBA_TENSOR)
    with pytest.raises(CheckpointError, match="has shape") as e:
        load_draft_model(tmp_path / "broken")
    assert all(piece in str(e.value) for piece in expect)


@pytest.mark.parametrize("command", ["init", "draft", "import-teacher"])
def test_commands_check_inputs_before_creating_outputs(teacher, tmp_path, command):
    expect = damaged_copy(teacher, tmp_path / "broken", "truncated", "")
    out = tmp_path / "new" / "out"
    args = {"init": ["init", "--teacher", tmp_path / "broken", "--variant", "mamba2",
                     "--attn-fraction", "0.5", out],
            "draft": ["draft", tmp_path / "broken", out, "--layers", "0,1"],
            "import-teacher": ["import-teacher", tmp_path / "broken", out]}[command]
    proc = _cli(*args)
    assert proc.returncode == 2 and all(p in proc.stderr for p in expect), proc.stderr
    assert not (tmp_path / "new").exists(), "an output directory was created"


def test_convert_paper_refuses_non_finite_and_unreadable_weights(tmp_path):
    model = make_random_hybrid(tmp_path / "src", "mamba2", **KW)
    with torch.no_grad():
        model.model.layers[0].mamba.D[1] = float("inf")
    write_paper_checkpoint(model, tmp_path / "paper", fmt="safetensors")
    proc = _cli("convert-paper", tmp_path / "paper", tmp_path / "out")
    assert proc.returncode == 2 and "model.layers.0.mamba.D" in proc.stderr
    assert "non-finite" in proc.stderr and str(tmp_path / "paper") in proc.stderr
    weights = tmp_path / "paper" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = _cli("convert-paper", tmp_path / "paper", tmp_path / "out")
    assert proc.returncode == 2 and f"{weights}: unreadable weights file" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_distill_refuses_a_broken_teacher_before_writing(teacher, tmp_path, capsys):
    from distillation.cli import distill_main
    expect = damaged_copy(teacher, tmp_path / "broken", "truncated", "")
    cfg = {"output_dir": str(tmp_path / "run"), "teacher": {"path": str(tmp_path / "broken")},
           "backend": {"kind": "local", "num_workers": 1}, "stages": {"distill": {"steps": 2}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert distill_main([str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "`teacher.path`" in err and all(piece in err for piece in expect), err
    assert not (tmp_path / "run").exists()


def test_interrupted_distill_says_how_to_resume(teacher, tmp_path, shared_dir):
    """SIGINT in the middle of training: one line naming the output directory, exit 130,
    no traceback (before: a raw KeyboardInterrupt traceback)."""
    out = tmp_path / "run"
    cfg = {"output_dir": str(out), "teacher": {"path": str(teacher)},
           "student": {"variant": "mamba2", "attn_fraction": 0.5},
           "data": {"data_dir": str(shared_dir / "data"), "max_prompts": 8, "max_length": 64},
           "pseudo_labels": {"engine": "runtime", "max_new_tokens": 8},
           "backend": {"kind": "local", "num_workers": 1},
           "training": {"batch_size": 2, "checkpoint_every": 1000},
           "stages": {"distill": {"steps": 100000}, "export": {"enabled": False}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    # A shell without job control starts background jobs with SIGINT ignored, and Python
    # keeps an ignored SIGINT: give the command a terminal's default, as Ctrl-C would meet.
    # Output to files, not pipes: a pipe nobody reads until the end fills and stalls it.
    log = open(tmp_path / "distill.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_mamba_hybrid.cli", "distill",
                             str(tmp_path / "c.yaml")], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, progress = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            progress = next(out.glob(f"stages/*-distill/{PROGRESS}"), None)
            if progress is not None and progress.stat().st_size > 0:
                break
            time.sleep(0.5)
        assert proc.poll() is None and progress is not None, "training did not start"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()   # never leave a 100,000-step run behind
    log.seek(0)
    err = log.read()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"mamba-hybrid distill: interrupted; run the same command again to resume from the "
        f"last checkpoint in {out}")
