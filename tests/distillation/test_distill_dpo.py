"""The DPO stage through the pipeline in one process, on a preference dataset (no vLLM):
trl's loss with the configured loss type, and a finished stage's fingerprint."""
import json

import numpy as np
import pytest
import yaml

from distillation.cli import distill_main
from distillation.config import DPOConfig
from distillation.pipeline import _dpo_settings
from tests.utils import make_random_llama


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    make_random_llama(root / "teacher", num_layers=2, hidden_size=64, heads=2, kv_heads=1)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}.", "chosen": "Blue.",
                                         "rejected": f"Seven {i} {i}."}) + "\n"
                             for i in range(8)))
    cfg = {"output_dir": str(root / "run"), "teacher": {"path": str(root / "teacher")},
           "backend": {"kind": "local", "num_workers": 1},
           "training": {"batch_size": 2, "checkpoint_every": 100},
           "stages": {"distill": {"enabled": False}, "export": {"enabled": False},
                      "dpo": {"enabled": True, "dataset": str(pairs), "steps": 3, "lr": 1e-3,
                              "beta": 0.5, "loss_type": "hinge"}}}
    path = root / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert distill_main([str(path)]) == 0
    return root


def test_dpo_stage_uses_the_configured_trl_loss(dpo_run):
    d = dpo_run / "run" / "stages" / "01-dpo"
    recs = [json.loads(ln) for ln in (d / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["pairs"] == 2
    # step 1: the policy is its reference, so every margin is 0 and hinge gives 1 - 0
    assert recs[0]["loss"] == pytest.approx(1.0, rel=1e-6)
    assert all(np.isfinite(r["loss"]) for r in recs)
    summary = json.loads((d / "metrics.json").read_text())
    assert summary["loss_type"] == "hinge" and summary["reference"] == "student"


def test_dpo_fingerprint_leaves_out_defaults_of_the_trl_keys():
    """A DPO stage run before loss_type/label_smoothing existed keeps its fingerprint."""
    before = _dpo_settings(DPOConfig())
    assert "loss_type" not in before and "label_smoothing" not in before
    assert _dpo_settings(DPOConfig(loss_type="ipo"))["loss_type"] == "ipo"


def test_dpo_on_two_ray_workers_equals_one_worker(tmp_path):
    """The global per-pair mean survives DDP: 2 Ray workers of 2 pairs a step follow the
    curve of 1 worker of 4 pairs (the same pairs: batch_indices walks world x batch)."""
    import torch

    from distillation.config import BackendConfig
    from distillation.job import TrainJob
    from distillation.launch import run_job
    from tests.utils import random_kd_examples
    from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher,
                                                   init_hybrid_from_teacher, save_hybrid)
    teacher = make_random_llama(tmp_path / "teacher", num_layers=2, hidden_size=64, heads=2,
                                kv_heads=1, scale=2.0)
    hcfg = hybrid_config_from_teacher(teacher.config, variant="mamba2", attn_layers=[1])
    save_hybrid(init_hybrid_from_teacher(teacher, hcfg), tmp_path / "init",
                tokenizer_dir=tmp_path / "teacher")
    kd = random_kd_examples(16, prompt=(2, 6), answer=(3, 12), seed=2)
    torch.save([{"prompt_ids": a["prompt_ids"], "chosen_ids": a["answer_ids"],
                 "rejected_ids": b["answer_ids"]} for a, b in zip(kd[:8], kd[8:])],
               tmp_path / "pairs.pt")

    def curve(name, workers, kind):
        job = TrainJob(stage=name, stage_dir=str(tmp_path / name), init_dir=str(tmp_path / "init"),
                       data_file=str(tmp_path / "pairs.pt"), objective="dpo",
                       ref_dir=str(tmp_path / "init"), steps=3, lr=3e-3, batch_size=4 // workers,
                       checkpoint_every=100, max_length=64, beta=0.5, dpo_loss_type="ipo")
        run_job(job, BackendConfig(kind=kind, num_workers=workers))
        return [json.loads(ln) for ln in (tmp_path / name / "progress.jsonl").read_text().splitlines()]

    one, two = curve("one", 1, "local"), curve("two", 2, "ray")
    assert [r["pairs"] for r in two] == [4, 4, 4]
    assert abs(one[-1]["loss"] - one[0]["loss"]) > 1e-3   # training moved the policy
    for a, b in zip(one, two):
        for key in ("loss", "reward_margin", "reward_chosen", "reward_rejected", "reward_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
