"""``training.compile``: compiled decoder layers compute what the eager ones do, and a
compiled training run follows the eager run's loss curve (CPU inductor here; the GPU
study uses the same code path)."""
import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters

from distillation.job import TrainJob
from distillation.trainer import PROGRESS, compile_layers, train_worker
from tests.utils import make_random_llama, random_kd_examples
from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher, init_hybrid_from_teacher,
                                               save_hybrid)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    return root, make_random_llama(root / "teacher", num_layers=2, hidden_size=64, heads=2,
                                   kv_heads=1, scale=2.0)


def _padded_batch(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 23:] = 0          # right padding, as the trainer collates
    mask[2, 31:] = 0
    return ids, mask


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_compiled_layers_equal_eager(teacher, variant, device):
    """On CUDA the Mamba1 layer calls the Triton scan between compiled regions."""
    _, t = teacher
    hybrid = init_hybrid_from_teacher(t, hybrid_config_from_teacher(t.config, variant=variant,
                                                                    attn_layers=[1]))
    torch._dynamo.reset()
    ids, mask = (x.to(device) for x in
                 _padded_batch(t.config.vocab_size, seed=int(torch.randint(0, 2**31, ()))))
    for model in (hybrid.to(device), copy.deepcopy(t).to(device)):
        compiled = copy.deepcopy(model)
        compile_layers(compiled)
        outs, grads = [], []
        for m in (model, compiled):
            m.zero_grad(set_to_none=True)
            logits = m(input_ids=ids, attention_mask=mask).logits
            (logits.float().square() * mask[..., None]).mean().backward()
            outs.append(logits.detach())
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        keep = mask.bool()
        # float32 on CPU; inductor fuses and may reorder reductions: 1e-4 relative.
        torch.testing.assert_close(outs[1][keep], outs[0][keep], rtol=1e-4, atol=1e-4)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_training_follows_the_eager_curve(teacher):
    root, t = teacher
    hcfg = hybrid_config_from_teacher(t.config, variant="mamba2", attn_layers=[1])
    save_hybrid(init_hybrid_from_teacher(t, hcfg), root / "init", tokenizer_dir=root / "teacher")
    torch.save(random_kd_examples(12, prompt=(2, 6), answer=(3, 12)), root / "examples.pt")
    curves, graphs = {}, {}
    for flag in (False, True):
        name = f"compile_{flag}"
        torch._dynamo.reset()
        counters["stats"].clear()
        train_worker(TrainJob(stage=name, stage_dir=str(root / name), init_dir=str(root / "init"),
                              data_file=str(root / "examples.pt"), objective="kd",
                              teacher_dir=str(root / "teacher"), steps=3, lr=3e-3,
                              batch_size=3, ce_weight=0.5, max_length=32,
                              checkpoint_every=100, compile=flag).to_dict())
        graphs[flag] = counters["stats"]["unique_graphs"]
        curves[flag] = [json.loads(ln)["loss"]
                        for ln in (root / name / PROGRESS).read_text().splitlines()]
    # One graph per layer type for the whole run (student attention and Mamba layers,
    # teacher layers): a graph per step (a new shape, a cache object per call) would
    # cost compile time every step.
    assert (graphs[False], graphs[True]) == (0, 3)
    assert len(curves[True]) == 3 and curves[True][0] > 0
    assert curves[True][-1] != curves[True][0]      # it trained
    # Padding to max_length changes no real token; compiled kernels round differently.
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
