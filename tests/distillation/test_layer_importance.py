"""Measured layer importance on a tiny teacher with one planted important layer: both
criteria find it, runs repeat exactly, an interrupted run resumes without redoing
layers, the command and the pipeline's `student.attn_layers: auto` use it."""
import json
import sys

import pytest
import torch
import yaml

from distillation import layer_importance as li
from distillation.cli import distill_main
from distillation.config import ConfigError, load_config
from distillation.export import model_card
from tests.utils import make_random_llama

PLANTED = 2
TOKENS = 256


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shared_dir):
    """5 layers; layer 2's attention output scaled 8x: replacing it costs the most."""
    d = tmp_path_factory.mktemp("importance") / "teacher"
    model = make_random_llama(d, num_layers=5, hidden_size=64, heads=4, kv_heads=2,
                              intermediate_size=128, scale=2.0)
    with torch.no_grad():
        model.model.layers[PLANTED].self_attn.o_proj.weight.mul_(8.0)
    model.save_pretrained(d)
    return d


def _score(teacher, out, **kw):
    return li.layer_importance(teacher, out, tokens=TOKENS, log=lambda m: None, **kw)


@pytest.mark.parametrize("criterion", li.CRITERIA)
def test_planted_layer_ranks_first_and_runs_repeat(teacher, tmp_path, criterion):
    a = _score(teacher, tmp_path / "a.json", criterion=criterion)
    b = _score(teacher, tmp_path / "b.json", criterion=criterion)
    assert a["ranking"][0] == PLANTED, a["scores"]
    assert a["scores"] == b["scores"] and a["details"] == b["details"]
    assert li.choose_attention_layers(a["scores"], count=1) == [PLANTED]


@pytest.mark.parametrize("variant", ["mamba2", "mamba1"])
def test_leave_one_out_equals_a_hybrid_built_with_that_layer_replaced(teacher, shared_dir, variant):
    """The in-place swap scores what a separately built hybrid (only layer i Mamba, the same
    mixer weights) gives: KL(teacher || hybrid) by hand over every next-token position."""
    from distillation.models import load_causal_lm, load_tokenizer
    from vllm_mamba_hybrid.conversion.init import (hybrid_config_from_teacher,
                                                   init_hybrid_from_teacher)
    model = load_causal_lm(teacher, torch.float32).eval()
    batches, _ = li.sample_tokens(load_tokenizer(teacher), shared_dir / "data", TOKENS, seed=0)
    details = li.score_layers(model, batches, criterion="loo", variant=variant, seed=0)
    blocks = li._mamba_layers(model, variant, None, 0)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        want = [model(input_ids=x).logits for x in batches]
        for i in (0, PLANTED, n - 1):
            cfg = hybrid_config_from_teacher(model.config, variant=variant,
                                             attn_layers=[j for j in range(n) if j != i])
            hybrid = init_hybrid_from_teacher(model, cfg, seed=5).eval()
            hybrid.model.layers[i].mamba.load_state_dict(blocks[i].mamba.state_dict())
            kl = tokens = 0
            for x, t in zip(batches, want):
                p_t = torch.log_softmax(t[:, :-1].double(), -1)
                p_s = torch.log_softmax(hybrid(input_ids=x).logits[:, :-1].double(), -1)
                kl += float((p_t.exp() * (p_t - p_s)).sum())
                tokens += x[:, :-1].numel()
            assert details[i]["kl"] == pytest.approx(kl / tokens, rel=1e-4), i
        # the teacher is left as it was
        assert all(torch.equal(model(input_ids=x).logits, t) for x, t in zip(batches, want))


def test_a_damaged_scores_file_is_named(teacher, tmp_path):
    out = tmp_path / "scores.json"
    (tmp_path / "scores.json.partial").write_text("{not json")
    with pytest.raises(ValueError, match=r"scores\.json\.partial is not a layer scores file"):
        _score(teacher, out)


def test_interrupted_run_resumes_without_rescoring(teacher, tmp_path, monkeypatch):
    reference = _score(teacher, tmp_path / "ref.json")
    original, scored = li._LeaveOneOut.score, []

    def counting(self, i, block, stop_after=None):
        if stop_after is not None and len(scored) == stop_after:
            raise KeyboardInterrupt
        scored.append(i)
        return original(self, i, block)

    out = tmp_path / "scores.json"
    monkeypatch.setattr(li._LeaveOneOut, "score", lambda s, i, b: counting(s, i, b, stop_after=2))
    with pytest.raises(KeyboardInterrupt):
        _score(teacher, out)
    partial = json.loads((tmp_path / "scores.json.partial").read_text())
    assert list(partial["details"]) == ["0", "1"] and not out.exists()

    scored.clear()
    monkeypatch.setattr(li._LeaveOneOut, "score", lambda s, i, b: counting(s, i, b))
    resumed = _score(teacher, out)
    assert scored == [2, 3, 4]
    assert resumed["scores"] == reference["scores"]
    assert not (tmp_path / "scores.json.partial").exists()

    scored.clear()
    assert _score(teacher, out)["scores"] == reference["scores"] and scored == []
    with pytest.raises(ValueError, match=r"scores\.json holds layer scores computed with other "
                                         r"settings.*'seed': \(0, 1\)"):
        _score(teacher, out, seed=1)


def test_command_writes_the_documented_json(teacher, tmp_path, capsys):
    out = tmp_path / "scores.json"
    assert li.main([str(teacher), "--out", str(out), "--criterion", "kl-guided",
                    "--variant", "mamba1", "--tokens", "600", "--seed", "3"]) == 0
    result = json.loads(out.read_text())
    assert set(result["scores"]) == {"0", "1", "2", "3", "4"}
    assert (result["criterion"], result["variant"], result["tokens"], result["seed"]) == \
        ("kl-guided", "mamba1", 600, 3)
    assert result["data"]["essays"] and result["data"]["prompts"]     # both kinds of text
    assert result["data"]["sequences"] == 3                            # 256 + 256 + 88 tokens
    assert {"kl", "relative_change"} <= set(result["details"]["0"])
    assert result["ranking"][0] == PLANTED and f"written to {out}" in capsys.readouterr().out
    assert li.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "layer-importance: error" in capsys.readouterr().err


def test_choose_attention_layers():
    scores = {"0": 0.1, "1": 0.5, "2": 0.5, "3": 0.2}
    assert li.choose_attention_layers(scores, count=1) == [1]            # tie: lower index
    assert li.choose_attention_layers(scores, count=3) == [1, 2, 3]
    assert li.choose_attention_layers(scores, fraction=0.5) == [1, 2]    # as many as the paper's
    assert li.choose_attention_layers(scores, count=0) == []
    with pytest.raises(ValueError, match="cover layers 0..2"):
        li.choose_attention_layers({0: 1.0, 1: 2.0, 3: 0.5}, count=1)
    with pytest.raises(ValueError, match="cannot keep 5"):
        li.choose_attention_layers(scores, count=5)


def _config(tmp_path, teacher, shared_dir, **student):
    cfg = {"output_dir": str(tmp_path / "run"), "teacher": {"path": str(teacher)},
           "student": student, "data": {"data_dir": str(shared_dir / "data")},
           "backend": {"kind": "local", "num_workers": 1},
           "stages": {"distill": {"enabled": False}, "export": {"evaluate": False}}}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("student, key", [
    ({"attn_layers": "auto", "attn_fraction": None}, "`student.attn_fraction` is null"),
    ({"attn_layers": "auto", "attn_fraction": 1.0}, "`student.attn_fraction` 1.0"),
    ({"attn_layers": "every", "attn_fraction": 0.5}, "`student.attn_layers`"),
    ({"attn_layers": "auto", "layer_criterion": "random"}, "`student.layer_criterion`"),
])
def test_config_refuses_bad_layer_choice(tmp_path, teacher, shared_dir, student, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_config(tmp_path, teacher, shared_dir, **student))


def test_pipeline_auto_layers_keep_the_planted_layer(tmp_path, teacher, shared_dir, capsys):
    path = _config(tmp_path, teacher, shared_dir, attn_layers="auto", attn_fraction=0.2,
                   layer_criterion="kl-guided")
    assert distill_main([str(path)]) == 0
    export = tmp_path / "run" / "export"
    summary = json.loads((export / "distill_summary.json").read_text())
    assert summary["attn_layers"] == [PLANTED]
    assert summary["layer_importance"]["criterion"] == "kl-guided"
    card = (export / "README.md").read_text()
    assert "## Attention layer choice" in card and "![layer importance](layer_importance.png)" in card
    assert (export / "layer_importance.png").is_file()
    assert json.loads((export / "config.json").read_text())["attn_layers"] == [PLANTED]
    capsys.readouterr()
    assert distill_main([str(path)]) == 0                                 # cached scores reused
    assert "every layer scored already" in capsys.readouterr().out


def test_without_matplotlib_only_the_plot_is_left_out(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    scores = {"0": 0.1, "1": 0.3}
    assert li.plot_scores(scores, [1], "loo", tmp_path / "p.png") is None
    importance = {"criterion": "loo", "scores": scores, "chosen": [1], "plot": None}
    card = model_card({"teacher": "t", "variant": "mamba2", "num_layers": 2, "attn_layers": [1],
                       "stages": [], "tokens_seen": 0, "layer_importance": importance,
                       "config": {"student": {"mamba_init": "attention"}}})
    assert "| score | 0.1 | 0.3 |" in card and "no bar plot: matplotlib is not installed" in card
