"""Students beyond the standard hybrid, on a tiny random teacher in one process: a
layer-subset draft with frozen embeddings, trained on teacher answers, teacher
samples and prose; its delta against the teacher; the pipeline without vLLM once
the pseudo-labels are cached (the GPU machine's situation)."""
import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distillation.cli import distill_main
from distillation.splits import heldout_essays
from distillation.tokens import load_examples
from tests.utils import REPO, make_random_llama
from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM
from vllm_mamba_hybrid.conversion.delta import apply_delta, write_delta

MODEL_KW = dict(num_layers=4, hidden_size=128, heads=4, kv_heads=2, intermediate_size=256,
                vocab_size=512, scale=2.0)
NUM_ESSAYS = 8


@pytest.fixture(scope="module")
def draft_run(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("students")
    make_random_llama(root / "teacher", **MODEL_KW)
    cfg = {
        "output_dir": str(root / "run"),
        "teacher": {"path": str(root / "teacher")},
        "student": {"layers": [0, 3], "attn_fraction": 1.0},
        "data": {"data_dir": str(shared_dir / "data"), "max_prompts": 12, "max_length": 64,
                 "text_dir": "essays"},
        "pseudo_labels": {"max_new_tokens": 24, "max_model_len": 512, "samples_per_prompt": 2,
                          "sample_temperature": 1.0},
        "backend": {"kind": "local", "num_workers": 1},
        "training": {"batch_size": 4, "checkpoint_every": 100},
        "stages": {"distill": {"steps": 6, "lr": 3e-3, "freeze_embeddings": True},
                   "export": {"evaluate": False}},
        "eval": {"num_essays": NUM_ESSAYS},
    }
    path = root / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert distill_main([str(path)]) == 0
    return root


def test_teacher_samples_and_prose_are_training_data(draft_run, shared_dir):
    import datasets
    ds = datasets.load_from_disk(str(draft_run / "run" / "pseudo_labels" / "dataset"))
    assert len(ds) == 12 * 3 and ds["sample"] == [0, 1, 2] * 12
    by_prompt = [ds["answer_ids"][i:i + 3] for i in range(0, len(ds), 3)]
    assert all(len({tuple(a) for a in group}) > 1 for group in by_prompt[:4]), \
        "teacher samples repeat the greedy answer"
    summary = json.loads((draft_run / "run" / "export" / "distill_summary.json").read_text())
    data = summary["data"]
    heldout = {p.name for p in heldout_essays(shared_dir / "data", NUM_ESSAYS)}
    assert data["text_windows"] > 10 and not heldout & set(data["text_files"])
    assert len(data["text_files"]) == len(list((shared_dir / "data" / "essays").glob("*.txt"))) - NUM_ESSAYS
    examples = load_examples(next((draft_run / "run" / "data").glob("kd_examples-*.pt")))
    assert len(examples) == 36 + data["text_windows"]
    prose = [e for e in examples if not e["prompt_ids"]]
    assert len(prose) == data["text_windows"] and max(len(e["answer_ids"]) for e in prose) == 64


def test_layer_subset_draft_trains_only_its_layers(draft_run):
    teacher = load_file(str(draft_run / "teacher" / "model.safetensors"))
    final = draft_run / "run" / "stages" / "01-distill" / "model"
    model = LlamaMambaHybridForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.config.attn_layers == [0, 1]
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[name], teacher[name].float()), name
    init = LlamaMambaHybridForCausalLM.from_pretrained(
        draft_run / "run" / "stages" / "00-init" / "model", dtype=torch.float32).state_dict()
    # the draft's layer 1 started as the teacher's layer 3, and training moved it
    key = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(init[key], teacher["model.layers.3.self_attn.q_proj.weight"].float())
    assert not torch.equal(state[key], init[key])


def test_delta_round_trip_rebuilds_the_student(draft_run, tmp_path):
    final = draft_run / "run" / "stages" / "01-distill" / "model"
    shards = write_delta(final, draft_run / "teacher", tmp_path / "delta", max_shard_bytes=200_000)
    assert len(shards) > 1
    delta = {}
    for s in shards:
        delta.update(load_file(str(s)))
    assert "model.embed_tokens.weight" not in delta and "model.layers.0.mlp.up_proj.weight" in delta
    rebuilt = apply_delta(draft_run / "teacher", shards, tmp_path / "rebuilt")
    want = LlamaMambaHybridForCausalLM.from_pretrained(final, dtype=torch.float32).to(torch.bfloat16)
    got = LlamaMambaHybridForCausalLM.from_pretrained(rebuilt, dtype=torch.bfloat16)
    for name, t in want.state_dict().items():
        assert torch.equal(got.state_dict()[name], t), name
    with pytest.raises(ValueError, match="shards"):
        apply_delta(draft_run / "teacher", shards[:1], tmp_path / "partial")


def test_cached_pipeline_runs_without_vllm(draft_run):
    """A new stage (other lr) reuses the cached pseudo-labels with vLLM unimportable."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from distillation.cli import distill_main\n"
            f"sys.exit(distill_main([{str(draft_run / 'distill.yaml')!r}, '--set', "
            f"'output_dir={draft_run / 'run-novllm'}', '--set', "
            f"'data.cache_dir={draft_run / 'run' / 'pseudo_labels'}', '--set', "
            f"'stages.distill.steps=2']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "pseudo-labels: reusing" in out.stdout
    assert (draft_run / "run-novllm" / "stages" / "01-distill" / "model" / "config.json").is_file()


def test_delta_of_a_tied_model_leaves_the_head_to_the_embeddings(tmp_path):
    """With tied embeddings lm_head is an alias: it must neither travel nor be required."""
    base = make_random_llama(tmp_path / "base", num_layers=2, hidden_size=64, heads=4,
                             kv_heads=2, tie_word_embeddings=True)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight.add_(0.5)   # "training" changed one tensor
    base.save_pretrained(tmp_path / "trained")
    shards = write_delta(tmp_path / "trained", tmp_path / "base", tmp_path / "delta",
                         dtype=torch.float32)
    delta = load_file(str(shards[0]))
    assert list(delta) == ["model.layers.1.mlp.down_proj.weight"]
    rebuilt = apply_delta(tmp_path / "base", shards, tmp_path / "rebuilt")
    from transformers import LlamaForCausalLM
    got = LlamaForCausalLM.from_pretrained(rebuilt, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, base.eval()(ids).logits)


def test_bad_inputs_of_the_new_entry_points(draft_run, tmp_path, capsys):
    from distillation.evaluate import eval_main
    with pytest.raises(ValueError, match="no delta shards"):
        apply_delta(draft_run / "teacher", [], tmp_path / "out")
    not_a_delta = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(not_a_delta))
    with pytest.raises(ValueError, match="not the first shard of a delta"):
        apply_delta(draft_run / "teacher", [not_a_delta], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if not torch.cuda.is_available():
        teacher = str(draft_run / "teacher")
        assert eval_main([teacher, "--teacher", teacher, "--device", "cuda"]) == 2
        assert "--device cuda but no CUDA GPU" in capsys.readouterr().err


def _greedy(model, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The model's own one-prompt greedy decoding, cut after the first EOS (kept)."""
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)
    out = ids[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def test_runtime_engine_pseudo_labels(draft_run, tmp_path):
    """The GPU machine's pseudo-label engine (the project's generator, here its CPU
    reference path): same rows as vLLM's cache, greedy answers token for token the
    teacher's own one-prompt greedy decoding (prompts are batched by length and
    left-padded), samples varied, the cache keyed by the engine."""
    import datasets
    from distillation.config import load_config
    from distillation.prompts import load_prompts
    from distillation.pseudo_labels import ensure_pseudo_labels
    from distillation.models import load_causal_lm, load_tokenizer
    cfg = load_config(draft_run / "distill.yaml")
    cfg.pseudo_labels.engine = "runtime"
    cfg.pseudo_labels.batch_size = 3   # several generate calls, uneven last one
    train, _ = load_prompts(cfg.data)
    tok = load_tokenizer(draft_run / "teacher")
    logs = []
    ds = ensure_pseudo_labels(draft_run / "teacher", tok, train, cfg.pseudo_labels,
                              tmp_path / "labels", log=logs.append)
    by_vllm = datasets.load_from_disk(str(draft_run / "run" / "pseudo_labels" / "dataset"))
    assert ds["sample"] == by_vllm["sample"] and ds["prompt_ids"] == by_vllm["prompt_ids"]
    teacher = load_causal_lm(draft_run / "teacher").eval()
    for row in (i for i, s in enumerate(ds["sample"]) if s == 0):
        ref = _greedy(teacher, ds["prompt_ids"][row], cfg.pseudo_labels.max_new_tokens,
                      tok.eos_token_id)
        assert ds["answer_ids"][row] == ref, row
        assert ds["finish_reason"][row] == ("stop" if ref[-1] == tok.eos_token_id else "length")
    samples = [tuple(a) for a, s in zip(ds["answer_ids"], ds["sample"]) if s > 0]
    assert len(set(samples)) > len(samples) // 2
    assert all(0 < len(a) <= cfg.pseudo_labels.max_new_tokens for a in ds["answer_ids"])
    settings = json.loads((tmp_path / "labels" / "settings.json").read_text())
    assert settings["engine"] == "runtime" and settings["batch_size"] == 3
    again = ensure_pseudo_labels(draft_run / "teacher", tok, train, cfg.pseudo_labels,
                                 tmp_path / "labels", log=logs.append)
    assert again["answer_ids"] == ds["answer_ids"] and "reusing" in logs[-1]


def test_prose_continuations_are_teacher_samples_of_prose(draft_run, tmp_path):
    """``pseudo_labels.prose_prefix_tokens``: the teacher continues every prose window's
    prefix (greedy token for token its own decoding, samples varied), and the
    continuations are trained on as prose (empty prompt, prefix included)."""
    import datasets
    from distillation.config import load_config
    from distillation.models import load_causal_lm, load_tokenizer
    from distillation.pipeline import _kd_examples, preflight, prose_windows
    n = 16
    cfg = load_config(draft_run / "distill.yaml", {
        "output_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "labels"),
        "data.max_length": 512, "pseudo_labels.engine": "runtime",
        "pseudo_labels.prose_prefix_tokens": n})
    tok = load_tokenizer(draft_run / "teacher")
    _, windows = prose_windows(cfg, tok)
    prefixes = [w["answer_ids"][:n] for w in windows if len(w["answer_ids"]) > n]
    assert len(prefixes) > 10
    path, _, info = _kd_examples(preflight(cfg))
    ds = datasets.load_from_disk(str(tmp_path / "labels" / "dataset"))
    prose = ds.filter(lambda r: r["kind"] == "prose")
    assert ds["kind"].count("chat") == 12 * 3 and len(prose) == 3 * len(prefixes)
    assert prose["prompt_ids"] == [p for p in prefixes for _ in range(3)]
    assert prose["instruction"] == [""] * len(prose) and prose["sample"] == [0, 1, 2] * len(prefixes)
    teacher = load_causal_lm(draft_run / "teacher").eval()
    for row in range(0, 12, 3):       # greedy continuations of the first four prefixes
        ref = _greedy(teacher, prose["prompt_ids"][row], cfg.pseudo_labels.max_new_tokens,
                      tok.eos_token_id)
        assert prose["answer_ids"][row] == ref, row
    samples = [tuple(a) for a, s in zip(prose["answer_ids"], prose["sample"]) if s > 0]
    assert len(set(samples)) > len(samples) // 2
    examples = load_examples(path)
    assert len(examples) == 36 + 3 * len(prefixes) + len(windows) == info["num_examples"]
    continued = [e for e in examples if not e["prompt_ids"] and len(e["answer_ids"]) <= n + 24
                 and e["answer_ids"][:n] in prefixes]
    assert {tuple(e["answer_ids"]) for e in continued} >= {
        tuple(p + a) for p, a in zip(prose["prompt_ids"], prose["answer_ids"]) if a}
