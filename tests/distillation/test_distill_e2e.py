"""End to end on a tiny random Llama teacher: vLLM pseudo-labels, every stage on Ray with
2 CPU workers (one worker killed mid-stage and recovered), export, and the exported
directory served by vLLM (plugin) with the same greedy tokens as the reference model."""
import json
import threading
import time

import pytest
import torch
import yaml

from distillation.cli import distill_main
from distillation.trainer import PROGRESS, WORKERS
from tests.utils import kill_stage_worker, make_random_llama
from vllm_mamba_hybrid import LlamaMambaHybridForCausalLM

MODEL_KW = dict(num_layers=4, hidden_size=128, heads=4, kv_heads=2, intermediate_size=256,
                vocab_size=512, scale=2.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("e2e")
    make_random_llama(root / "teacher", **MODEL_KW)
    cfg = {
        "output_dir": str(root / "run"),
        "teacher": {"path": str(root / "teacher")},
        "student": {"variant": "mamba2", "attn_fraction": 0.5},
        "data": {"data_dir": str(shared_dir / "data"), "max_prompts": 96, "max_length": 96},
        "pseudo_labels": {"max_new_tokens": 48, "max_model_len": 512},
        "backend": {"kind": "ray", "num_workers": 2, "max_failures": 1},
        "training": {"batch_size": 4, "checkpoint_every": 3},
        "stages": {
            "progressive": {"enabled": True, "schedule": [0.75, 0.5], "steps": 4, "lr": 3e-3},
            "distill": {"steps": 12, "lr": 3e-3},
            "dpo": {"enabled": True, "steps": 3, "num_pairs": 8, "sample_max_new_tokens": 16,
                    "lr": 1e-4},
        },
        "eval": {"num_prompts": 8, "max_new_tokens": 24, "ppl_max_tokens": 2048},
    }
    path = root / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    killed, stop = {}, threading.Event()
    killer = threading.Thread(target=kill_stage_worker, daemon=True,
                              args=(root / "run" / "stages" / "03-distill", 3, killed, stop))
    killer.start()
    t0 = time.time()
    try:
        rc = distill_main([str(path)])
    finally:
        stop.set()
        killer.join()
    return {"root": root, "rc": rc, "config": path, "seconds": time.time() - t0,
            "killed": killed}


def _progress(stage_dir):
    return [json.loads(ln) for ln in (stage_dir / PROGRESS).read_text().splitlines()]


def test_pipeline_runs_all_stages(run):
    assert run["rc"] == 0
    stages = sorted(p.name for p in (run["root"] / "run" / "stages").iterdir())
    assert stages == ["00-init", "01-progressive-3attn", "02-progressive-2attn", "03-distill",
                      "04-dpo", "05-export"]
    for name in stages[1:5]:
        d = run["root"] / "run" / "stages" / name
        assert (d / "metrics.json").is_file() and (d / "curves.png").stat().st_size > 1000
        # a finished stage keeps its model, not its checkpoints or starting model
        assert (d / "model" / "model.safetensors").is_file()
        assert not (d / "checkpoints").exists() and not (d / "start").exists()
    print(f"e2e pipeline took {run['seconds']:.0f} s")


def test_stages_continue_one_walk_through_the_examples(run):
    """Each KD stage starts its walk where the one before stopped (two Ray workers of 4
    rows each: 8 examples a step), so the progressive stages and the distill stage see
    new examples, not the first ones again; DPO walks its own pairs from the start."""
    from distillation.pipeline import data_end
    stages = run["root"] / "run" / "stages"
    walked = 0
    for name, steps in (("01-progressive-3attn", 4), ("02-progressive-2attn", 4),
                        ("03-distill", 12)):
        walked += steps * 2 * 4
        assert data_end(stages / name / "model") == walked, name
    assert data_end(stages / "04-dpo" / "model") == 3 * 2 * 4


def test_killed_worker_recovers_and_loss_falls(run):
    d = run["root"] / "run" / "stages" / "03-distill"
    assert run["killed"], "no worker of 03-distill was killed"  # SIGKILLed after step 3 ...
    workers = json.loads((d / WORKERS).read_text())
    assert run["killed"]["pid"] not in [w["pid"] for w in workers["workers"]]  # ... Ray
    assert workers["resumed_from_step"] >= 3  # restarted the group from a checkpoint ...
    recs = _progress(d)
    assert [r["step"] for r in recs] == list(range(1, 13))  # ... and the curve continued
    kl = [r["kl"] for r in recs]
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl
    dpo = _progress(run["root"] / "run" / "stages" / "04-dpo")
    assert dpo[-1]["loss"] < dpo[0]["loss"]


def test_export_has_model_card_and_better_kl(run):
    export = run["root"] / "run" / "export"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "eval.json"):
        assert (export / f).is_file(), f
    ev = json.loads((export / "eval.json").read_text())["models"]
    assert ev["final"]["kl_to_teacher"] < ev["init"]["kl_to_teacher"]
    card = (export / "README.md").read_text()
    for text in ("## Stages", "03-distill", "Tokens seen", "## Held-out evaluation", "## Config"):
        assert text in card


def test_rerun_skips_finished_stages(run, capsys):
    t0 = time.time()
    assert distill_main([str(run["config"])]) == 0
    out = capsys.readouterr().out
    assert out.count("done already, skipping") == 6 and "pseudo-labels: reusing" in out
    assert time.time() - t0 < 60


def test_export_loads_in_vllm_with_reference_greedy_output(run):
    from vllm import LLM, SamplingParams

    export = run["root"] / "run" / "export"
    ref = LlamaMambaHybridForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 40, 77)]
    want = []
    with torch.no_grad():
        for p in prompts:
            seq = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                               eos_token_id=[])[0]
            logits = ref(seq[None]).logits[0, len(p) - 1:-1]
            top2 = logits.topk(2, -1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "reference has a near-tie"
            want.append(seq[len(p):].tolist())
    llm = LLM(str(export), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
              max_model_len=512, enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_eval_cli_on_export_and_on_teacher(run, shared_dir, tmp_path, capsys):
    from distillation.evaluate import eval_main
    teacher = str(run["root"] / "teacher")
    common = ["--teacher", teacher, "--data-dir", str(shared_dir / "data"), "--num-prompts", "4",
              "--max-new-tokens", "12", "--ppl-max-tokens", "512", "--num-samples", "1"]
    assert eval_main([str(run["root"] / "run" / "export"), *common,
                      "--out", str(tmp_path / "student.json")]) == 0
    assert eval_main([teacher, *common, "--out", str(tmp_path / "teacher.json")]) == 0
    student = json.loads((tmp_path / "student.json").read_text())["models"]["model"]
    itself = json.loads((tmp_path / "teacher.json").read_text())["models"]["model"]
    assert itself["kl_to_teacher"] < 1e-6 and itself["greedy_agreement"] == 1.0
    assert student["kl_to_teacher"] > 1e-4 and 0 <= student["greedy_agreement"] <= 1
    assert "### " in capsys.readouterr().out  # side-by-side samples printed
