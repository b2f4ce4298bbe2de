"""Bad inputs stop `mamba-hybrid distill` before any work, with a message naming the culprit."""
import json

import pytest
import yaml
from transformers import GPT2Config

from distillation.cli import distill_main
from distillation.config import ConfigError, load_config
from tests.utils import make_random_llama


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg") / "teacher"
    make_random_llama(d, num_layers=4, hidden_size=64, heads=2, kv_heads=1)
    return d


def _write(tmp_path, cfg: dict):
    p = tmp_path / "distill.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _base(tmp_path, teacher, **over):
    cfg = {"output_dir": str(tmp_path / "run"), "teacher": {"path": str(teacher)},
           "backend": {"kind": "local", "num_workers": 1},
           "stages": {"distill": {"steps": 2}, "export": {"enabled": False}}}
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return cfg


def _run(tmp_path, cfg, capsys):
    rc = distill_main([str(_write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert rc == 2, err
    # nothing was trained, generated or even created
    assert not (tmp_path / "run").exists()
    return err


def test_unknown_key(tmp_path, teacher, capsys):
    cfg = _base(tmp_path, teacher)
    cfg["stages"]["distill"]["stepz"] = 3
    err = _run(tmp_path, cfg, capsys)
    assert "unknown config key `stages.distill.stepz`" in err and "steps" in err


def test_wrong_type_and_choice(tmp_path, teacher, capsys):
    err = _run(tmp_path, _base(tmp_path, teacher, **{"stages.distill.kl_direction": "sideways"}),
               capsys)
    assert "`stages.distill.kl_direction` must be one of ['forward', 'reverse']" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"training.batch_size": "four"}), capsys)
    assert "`training.batch_size` must be an integer" in err


def test_non_llama_teacher(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(gpt2)
    err = _run(tmp_path, _base(tmp_path, gpt2), capsys)
    assert "teacher.path" in err and "gpt2" in err and "Llama" in err


def test_dataset_without_column(tmp_path, teacher, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": f"question {i}"}) + "\n" for i in range(5)))
    err = _run(tmp_path, _base(tmp_path, teacher, **{"data.prompts": str(data)}), capsys)
    assert "no column 'instruction'" in err and str(data) in err and "['text']" in err


def test_dpo_dataset_without_column(tmp_path, teacher, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "worse": "b"}) + "\n")
    err = _run(tmp_path, _base(tmp_path, teacher, **{"stages.dpo.enabled": True,
                                                     "stages.dpo.dataset": str(pairs)}), capsys)
    assert "stages.dpo.dataset" in err and "no column 'rejected'" in err


def test_dpo_loss_settings(tmp_path, teacher):
    """trl's DPO loss types and their label smoothing, refused naming the key."""
    p = _write(tmp_path, _base(tmp_path, teacher))
    dpo = load_config(p, {"stages.dpo.loss_type": "robust",
                          "stages.dpo.label_smoothing": 0.1}).stages.dpo
    assert (dpo.loss_type, dpo.label_smoothing) == ("robust", 0.1)
    with pytest.raises(ConfigError, match=r"`stages.dpo.loss_type` must be one of \['sigmoid'"):
        load_config(p, {"stages.dpo.loss_type": "aot"})   # sorts the batch: not per pair
    with pytest.raises(ConfigError, match="`stages.dpo.label_smoothing` must be 0 with "
                                          "`stages.dpo.loss_type: sigmoid`"):
        load_config(p, {"stages.dpo.label_smoothing": 0.1})
    with pytest.raises(ConfigError, match=r"`stages.dpo.label_smoothing` must be in \[0, 0.5\)"):
        load_config(p, {"stages.dpo.loss_type": "robust", "stages.dpo.label_smoothing": 0.5})
    with pytest.raises(ConfigError, match=r"`stages.dpo.label_smoothing` must be in \(0, 1\)"):
        load_config(p, {"stages.dpo.loss_type": "exo_pair"})
    with pytest.raises(ConfigError, match="`stages.dpo.beta` must be > 0"):
        load_config(p, {"stages.dpo.beta": 0})


def test_unwritable_output_dir(tmp_path, teacher, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = _base(tmp_path, teacher)
    cfg["output_dir"] = str(blocker / "run")
    rc = distill_main([str(_write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert rc == 2 and "`output_dir`: cannot write to" in err and str(blocker / "run") in err


def test_backend_and_schedule_rules(tmp_path, teacher, capsys):
    err = _run(tmp_path, _base(tmp_path, teacher, **{"backend.num_workers": 2}), capsys)
    assert "backend.kind: local" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"backend.num_workers": 0,
                                                     "backend.kind": "ray"}), capsys)
    assert "`backend.num_workers` must be >= 1" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{
        "stages.progressive.enabled": True, "stages.progressive.schedule": [0.75]}), capsys)
    assert "schedule" in err and "student's fraction" in err


def test_examples_parse():
    from distillation.paths import REPO_ROOT
    for path in sorted((REPO_ROOT / "examples").glob("*.yaml")):
        load_config(path)  # raises ConfigError on any schema problem


def test_overrides_are_checked(tmp_path, teacher, monkeypatch):
    p = _write(tmp_path, _base(tmp_path, teacher))
    assert load_config(p, {"stages.distill.steps": 7}).stages.distill.steps == 7
    monkeypatch.chdir(tmp_path / "..")  # command-line paths are relative to the cwd
    assert load_config(p, {"output_dir": "elsewhere"}).output_dir == str(
        (tmp_path / ".." / "elsewhere").resolve())
    with pytest.raises(ConfigError, match="unknown config key `stages.distil`"):
        load_config(p, {"stages.distil.steps": 7})


def test_student_layers_samples_and_text_rules(tmp_path, teacher, capsys, shared_dir):
    err = _run(tmp_path, _base(tmp_path, teacher, **{"student.layers": [0, 7]}), capsys)
    assert "`student.layers` [7] out of range" in err and "4 layers" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"student.layers": [1, 1]}), capsys)
    assert "`student.layers` has duplicates: [1, 1]" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"student.layers": []}), capsys)
    assert "`student.layers` is empty" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"student.attn_layers": [0, 4]}), capsys)
    assert "`student.attn_layers` [4] out of range" in err and "4 layers" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"pseudo_labels.samples_per_prompt": 2,
                                                     "pseudo_labels.sample_temperature": 0.0}),
               capsys)
    assert "`pseudo_labels.sample_temperature` must be > 0" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"pseudo_labels.engine": "runtime",
                                                     "pseudo_labels.dtype": "fp8"}), capsys)
    assert "`pseudo_labels.dtype` 'fp8': the runtime engine takes one of auto" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"pseudo_labels.engine": "hf"}), capsys)
    assert "pseudo_labels.engine" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"training.length_grouping_steps": -1}), capsys)
    assert "`training.length_grouping_steps` must be >= 0" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"training.compile": True,
                                                     "backend.strategy": "fsdp"}), capsys)
    assert "`training.compile` with `backend.strategy: fsdp` is not supported" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"data.data_dir": str(shared_dir / "data"),
                                                     "data.text_dir": "no_such_dir"}), capsys)
    assert "`data.text_dir`" in err and "no_such_dir" in err and "not a directory" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"training.compile_pad_multiple": 600}), capsys)
    assert "`training.compile_pad_multiple` must lie in [0, data.max_length = 512]" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"pseudo_labels.prose_prefix_tokens": 32}),
               capsys)
    assert "`pseudo_labels.prose_prefix_tokens` continues the prose of `data.text_dir`" in err
    with_text = {"data.data_dir": str(shared_dir / "data"), "data.text_dir": "essays"}
    err = _run(tmp_path, _base(tmp_path, teacher, **with_text,
                               **{"pseudo_labels.prose_prefix_tokens": 512}), capsys)
    assert "`pseudo_labels.prose_prefix_tokens` (512) must be below `data.max_length` (512)" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **with_text,
                               **{"pseudo_labels.prose_prefix_stride": 64}), capsys)
    assert "`pseudo_labels.prose_prefix_stride` (64)" in err and "prose_prefix_tokens` > 0" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"pseudo_labels.batch_size": -1}), capsys)
    assert "`pseudo_labels.batch_size` must be >= 0" in err and "got -1" in err


def test_prose_prefixes_at_window_starts_or_along_them():
    from distillation.prose import prose_prefixes
    windows = [{"prompt_ids": [], "answer_ids": list(range(10))},
               {"prompt_ids": [], "answer_ids": list(range(100, 104))}]
    assert prose_prefixes(windows, 4) == [[0, 1, 2, 3]]            # the short one has no token after
    assert prose_prefixes(windows, 3) == [[0, 1, 2], [100, 101, 102]]
    assert prose_prefixes(windows, 3, stride=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8],
                                                    [100, 101, 102]]
    assert prose_prefixes(windows, 4, stride=5) == [[0, 1, 2, 3], [5, 6, 7, 8]]


def test_progressive_layouts_follow_the_papers_nesting_layouts():
    """[0.5, 0.25] on 30 layers: the odd layers, then every fourth (the paper's 25% run
    starts from its 50% model), each stage's Mamba layers containing the previous ones';
    layouts that do not nest fall back to index order; 'stepwise' is index order."""
    from distillation.plan import final_attention_layers, progressive_layouts
    from vllm_mamba_hybrid.config import paper_attention_layers
    final = final_attention_layers(30, None, 0.25)
    assert progressive_layouts(30, final, [0.5, 0.25]) == [
        paper_attention_layers(30, 0.5), [3, 7, 11, 15, 19, 23, 27]]
    eighth = final_attention_layers(32, None, 0.125)
    stages = progressive_layouts(32, eighth, [0.5, 0.25, 0.125])
    assert [len(s) for s in stages] == [16, 8, 4] and stages[-1] == eighth
    assert all(set(b) < set(a) for a, b in zip(stages, stages[1:]))
    # custom final layers the paper's 50% layout lacks: replace in index order
    stages = progressive_layouts(30, [0, 29], [0.5, 2 / 30])
    assert stages == [[0, *range(16, 30)], [0, 29]]
    assert progressive_layouts(4, [3], "stepwise") == [[1, 2, 3], [2, 3], [3]]
    with pytest.raises(ConfigError, match="student's fraction"):
        progressive_layouts(30, final, [0.5, 0.3])


def test_student_d_state_reaches_the_model_or_is_refused(tmp_path, teacher, capsys):
    """The teacher has head_dim 32 and one KV head: d_state must divide its 32 K/V rows."""
    err = _run(tmp_path, _base(tmp_path, teacher, **{"student.d_state": 0}), capsys)
    assert "`student.d_state` must be a positive integer or null, got 0" in err
    err = _run(tmp_path, _base(tmp_path, teacher, **{"student.variant": "mamba1",
                                                     "student.d_state": 24}), capsys)
    assert "`student.d_state` 24: d_xb (32) and d_inner (64) must be multiples of d_state (24)" in err
    cfg = _base(tmp_path, teacher, **{"student.variant": "mamba1", "student.d_state": 32,
                                      "stages.distill.enabled": False})
    assert distill_main([str(_write(tmp_path, cfg))]) == 0       # the init stage alone
    init = json.loads((tmp_path / "run" / "stages" / "00-init" / "model" / "config.json").read_text())
    assert (init["mamba_variant"], init["d_state"]) == ("mamba1", 32)


@pytest.mark.parametrize("kind,workers,address,gpus,ok", [
    ("ray", 2, None, 1, False), ("torchrun", 3, None, 2, False), ("ray", 2, None, 2, True),
    ("torchrun", 1, None, 1, True), ("ray", 8, "ray://head:10001", 1, True),
    ("local", 1, None, 1, True)])
def test_gpu_workers_beyond_the_visible_gpus_are_refused(kind, workers, address, gpus, ok):
    """Ray Train would wait forever for a GPU that is not there: refused, naming the key."""
    from distillation.config import BackendConfig, check_gpu_workers
    backend = BackendConfig(kind=kind, num_workers=workers, address=address, device="cuda")
    if ok:
        check_gpu_workers(backend, gpus)
    else:
        with pytest.raises(ConfigError, match=rf"`backend.num_workers` {workers}: .* {gpus} GPU"):
            check_gpu_workers(backend, gpus)
