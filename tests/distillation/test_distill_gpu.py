"""The distillation loop and the evaluation as the quality study runs them: bf16
autocast training with float32 master weights (on the CPU here, on CUDA with -m gpu),
and held-out metrics on the GPU equal to the CPU's."""
import json

import pytest
import torch
from safetensors.torch import load_file

from distillation.config import DataConfig, EvalConfig
from distillation.evaluate import evaluate_models
from distillation.job import TrainJob
from distillation.trainer import PROGRESS, train_worker
from tests.utils import make_random_llama, random_kd_examples
from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher, init_hybrid_from_teacher,
                                               save_hybrid)

GPU = pytest.mark.gpu
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


@pytest.fixture(scope="module", params=["mamba2", "mamba1"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gpu-{request.param}")
    teacher = make_random_llama(root / "teacher", num_layers=4, hidden_size=128, heads=4,
                                kv_heads=2, intermediate_size=256, scale=2.0)
    hcfg = hybrid_config_from_teacher(teacher.config, variant=request.param, attn_layers=[1, 3])
    save_hybrid(init_hybrid_from_teacher(teacher, hcfg), root / "init", tokenizer_dir=root / "teacher")
    torch.save(random_kd_examples(64, prompt=(2, 20), answer=(20, 120)), root / "examples.pt")
    return root


def _job(pair, name, device, **kw):
    return TrainJob(stage=name, stage_dir=str(pair / name), init_dir=str(pair / "init"),
                    data_file=str(pair / "examples.pt"), objective="kd",
                    teacher_dir=str(pair / "teacher"), steps=30, lr=3e-3, batch_size=8,
                    max_length=128, checkpoint_every=1000, dtype="bfloat16", device=device,
                    **kw).to_dict()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_training_keeps_float32_weights_and_learns(pair, device):
    train_worker(_job(pair, f"bf16-{device}", device))
    recs = [json.loads(ln) for ln in (pair / f"bf16-{device}" / PROGRESS).read_text().splitlines()]
    kl = [r["kl"] for r in recs]
    assert sum(kl[-5:]) / 5 < 0.7 * sum(kl[:5]) / 5, kl
    weights = load_file(pair / f"bf16-{device}" / "model" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())


def test_prompts_without_room_for_an_answer_are_refused(pair, tmp_path):
    """A prompt of max_length tokens leaves nothing to learn: dropped, and if that is
    every example the stage says so instead of dividing by a zero token count."""
    long_only = tmp_path / "long.pt"
    torch.save(random_kd_examples(8, prompt=(128, 140), answer=(5, 10)), long_only)
    job = dict(_job(pair, "long", "cpu"), data_file=str(long_only), steps=2)
    with pytest.raises(RuntimeError, match=r"every prompt is at least max_length \(128\)"):
        train_worker(job)


@GPU
def test_evaluation_on_gpu_equals_cpu(pair, shared_dir):
    data = DataConfig(data_dir=str(shared_dir / "data"))
    cfg = EvalConfig(num_prompts=6, max_new_tokens=16, num_essays=2, ppl_max_tokens=1024,
                     num_samples=2)
    models = {"init": pair / "init"}
    cpu = evaluate_models(models, pair / "teacher", data=data, cfg=cfg, device="cpu")
    gpu = evaluate_models(models, pair / "teacher", data=data, cfg=cfg, device="cuda")
    assert gpu["teacher_perplexity"] == pytest.approx(cpu["teacher_perplexity"], rel=1e-3)
    a, b = cpu["models"]["init"], gpu["models"]["init"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-3)
    assert b["kl_to_teacher"] == pytest.approx(a["kl_to_teacher"], rel=1e-3)
    assert b["answer_tokens"] == a["answer_tokens"]        # same teacher answers (fast runtime)
    assert abs(b["greedy_agreement"] - a["greedy_agreement"]) * a["answer_tokens"] <= 2
