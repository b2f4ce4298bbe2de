"""``training.compile``: compiled decoder layers compute what the eager ones do, and a
compiled training run follows the eager run's loss curve (CPU inductor here; the GPU
study uses the same code path)."""
import copy
import json

import pytest
import torch
from torch._dynamo.utils import counters

from distillation.job import TrainJob
from distillation.tokens import padded_width
from distillation.trainer import PROGRESS, batch_indices, compile_layers, train_worker
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
    examples = random_kd_examples(12, prompt=(2, 6), answer=(3, 12))
    torch.save(examples, root / "examples.pt")
    runs = {"eager": dict(compile=False), "one width": dict(compile=True),
            "multiples of 8": dict(compile=True, pad_multiple=8)}
    curves, graphs = {}, {}
    for name, flags in runs.items():
        torch._dynamo.reset()
        counters["stats"].clear()
        train_worker(TrainJob(stage=name, stage_dir=str(root / name), init_dir=str(root / "init"),
                              data_file=str(root / "examples.pt"), objective="kd",
                              teacher_dir=str(root / "teacher"), steps=3, lr=3e-3,
                              batch_size=3, ce_weight=0.5, max_length=32,
                              checkpoint_every=100, **flags).to_dict())
        graphs[name] = counters["stats"]["unique_graphs"]
        curves[name] = [json.loads(ln)["loss"]
                        for ln in (root / name / PROGRESS).read_text().splitlines()]
    # One graph per layer type (student attention and Mamba layers, teacher layers) and
    # padded width for the whole run: a graph per step (a new shape, a cache object per
    # call) would cost compile time every step.
    widths = {padded_width(max(len(examples[i]["prompt_ids"]) + len(examples[i]["answer_ids"])
                               for i in batch_indices(step, 0, 0, n=12, world=1, batch=3,
                                                      accum=1, seed=0)), 32, 8)
              for step in range(3)}
    assert (graphs["eager"], graphs["one width"], graphs["multiples of 8"]) == (0, 3, 3 * len(widths))
    assert len(curves["eager"]) == 3 and curves["eager"][0] > 0
    assert curves["eager"][-1] != curves["eager"][0]      # it trained
    # Padding changes no real token; compiled kernels round differently.
    for name in ("one width", "multiples of 8"):
        assert curves[name] == pytest.approx(curves["eager"], rel=1e-4), name


def test_padded_width():
    assert [padded_width(n, 512, 128) for n in (1, 128, 129, 400, 512)] == [128, 128, 256, 512, 512]
    assert padded_width(500, 480, 128) == 480          # never past max_length
    assert padded_width(37, 512, None) == 37 and padded_width(37, 512, 512) == 512
