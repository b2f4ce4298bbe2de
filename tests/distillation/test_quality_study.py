"""The GPU study's bookkeeping (examples/quality_study.py) on run directories laid out
the way the pipeline writes them: a multi-stage student's curve is one curve, a
student is finished only once its export stage is done, the final model is the last
training stage's, and a progressive student splits the study's steps over its stages."""
import json
import re

import pytest
import torch

from examples import quality_study as study


def _stage(root, name, stage, records=(), done=False):
    d = root / "runs" / name / "stages" / stage
    d.mkdir(parents=True)
    if records:
        (d / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if done:
        (d / "DONE.json").write_text("{}")
    return d


def test_progressive_student_is_one_curve_and_finishes_at_export(tmp_path):
    name = "mamba2-25-progressive"
    _stage(tmp_path, name, "00-init", done=True)
    first = [{"step": s, "tokens_seen": 100 * s, "kl": 1.0 / s} for s in (5, 10)]
    second = [{"step": s, "tokens_seen": 90 * s, "kl": 2.0 / s} for s in (5, 10, 12)]
    _stage(tmp_path, name, "01-progressive-15attn", first, done=True)
    last = _stage(tmp_path, name, "02-progressive-7attn", second)
    assert study._training_stages(tmp_path, name)[-1] == last
    curve = study._progress(tmp_path, name)
    assert [r["step"] for r in curve] == [5, 10, 15, 20, 22]
    assert [r["tokens_seen"] for r in curve] == [500, 1000, 1450, 1900, 2080]
    assert [r["stage"] for r in curve] == ["01-progressive-15attn"] * 2 + ["02-progressive-7attn"] * 3
    assert [r["kl"] for r in curve] == [r["kl"] for r in first + second]
    assert not study._finished(tmp_path, name)
    _stage(tmp_path, name, "03-export")               # begun, not done
    assert not study._finished(tmp_path, name)
    (tmp_path / "runs" / name / "stages" / "03-export" / "DONE.json").write_text("{}")
    assert study._finished(tmp_path, name)
    assert study._final_model(tmp_path, name) == last / "model"
    assert study._steps_line(tmp_path, [name]) == f"{name}:22"


def test_student_without_training_stage_is_named(tmp_path):
    _stage(tmp_path, "mamba2-50", "00-init", done=True)
    assert study._progress(tmp_path, "mamba2-50") == []
    with pytest.raises(SystemExit, match="mamba2-50.*no training stage"):
        study._final_model(tmp_path, "mamba2-50")


@pytest.mark.parametrize("name", ["mamba2-50", "mamba2-25-progressive"])
def test_every_student_gets_the_same_total_steps(tmp_path, name):
    class Args:
        device, set = "cuda", ["training.log_every=7"]
    sets = study._overrides(tmp_path, name, 1452, Args)
    pairs = dict(v.split("=", 1) for v in sets[1::2])
    stages = len(study._cfg().stages.progressive.schedule)
    assert sets[-2:] == ["--set", "training.log_every=7"]            # the user's come last
    assert pairs["output_dir"] == json.dumps(str(tmp_path / "runs" / name))
    if name == "mamba2-25-progressive":
        assert pairs["stages.progressive.enabled"] == "true"
        assert pairs["stages.distill.enabled"] == "false"
        assert int(pairs["stages.progressive.steps"]) * stages == 1452
    else:
        assert "stages.progressive.enabled" not in pairs and pairs["stages.distill.steps"] == "1452"


def test_every_student_trains_the_same_sequences_a_step():
    """Students may split a step into micro-batches (memory), never change its size."""
    base = study._cfg().training
    for name, overrides in study.STUDENTS.items():
        batch = overrides.get("training.batch_size", base.batch_size)
        accum = overrides.get("training.grad_accum", base.grad_accum)
        assert batch * accum == base.batch_size * base.grad_accum, name


@pytest.mark.parametrize("cmd", ["gpu-wait", "gpu-finish"])
def test_waiting_on_a_root_without_students_is_named(tmp_path, cmd):
    argv = [cmd, "--root", str(tmp_path), "--wait-s", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="pids.train.json not found: no students were launched"):
        study.main(argv)


def test_fetch_copies_metrics_and_draws_the_plot_from_the_json(tmp_path):
    res, dest = tmp_path / "res", tmp_path / "dest"
    res.mkdir()
    dest.mkdir()
    assert study.main(["fetch", str(res), "--dest", str(dest)]) == 2   # no quality_study.json
    curve = [{"step": s, "tokens_seen": 1000 * s, "kl": 3.0 / s} for s in (5, 10, 15)]
    result = {"device": "cpu", "teacher_perplexity": 30.0,
              "progress": {"mamba2-50": curve, "mamba2-50-random": curve[:2]},
              "models": {n: {"perplexity": ppl} for n, ppl in
                         (("mamba2-50", 32.5), ("mamba2-50-random", 34.1),
                          ("mamba2-50@init", 4000.0))}}
    (res / "quality_study.json").write_text(json.dumps(result))
    (res / "quality_study.md").write_text("table\n")
    assert study.main(["fetch", str(res), "--dest", str(dest)]) == 0
    assert json.loads((dest / "quality_study.json").read_text()) == result
    assert (dest / "quality_study.md").read_text() == "table\n"
    assert (dest / "quality_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _records(start, times, step_s):
    """Progress records at the given wall times (from ``start``), ``step_s`` each."""
    return [{"step": 5 * (i + 1), "time": start + t, "step_time_s": s}
            for i, (t, s) in enumerate(zip(times, step_s))]


def _warmup_records():
    """A student running alone at 0.40 s a step while the other still starts and
    compiles, then both at their shared pace (0.64 / 0.575 s: medians after warm-up 4)."""
    fast = _records(0, [2, 4, 6, 8, 10, 12, 15, 18, 21, 24, 27],
                    [0.4] * 6 + [0.64, 0.62, 0.66, 0.64, 0.65])
    slow = _records(0, [5, 9, 12, 14, 17, 20, 23, 26], [3.0, 2.5, 0.6, 0.57, 0.58, 0.57, 0.56, 0.58])
    return fast, slow


def test_calibration_times_only_steps_after_every_student_warmed_up():
    # "fast" runs alone while "slow" still loads and compiles (run 6's Mamba1 student:
    # 0.40 s a step then, 0.64 s once all ran); only the shared steady phase counts.
    fast, slow = _warmup_records()
    got = study.steady_step_seconds({"fast": fast, "slow": slow}, warmup=4, records=4)
    assert got == {"fast": pytest.approx(0.64), "slow": pytest.approx(0.575)}
    # not enough steady records yet: wait (None), whatever the early ones say
    assert study.steady_step_seconds({"fast": fast, "slow": slow[:6]}, warmup=4, records=4) is None
    assert study.steady_step_seconds({"fast": fast, "slow": slow[:3]}, warmup=4, records=1) is None
    assert study.steady_step_seconds({}, warmup=4, records=4) is None
    with pytest.raises(ValueError, match="--calib-warmup-records and --calib-records must be >= 1"):
        study.steady_step_seconds({"fast": fast}, warmup=0, records=4)


def test_calibrate_waits_for_steady_records_and_names_a_timeout(tmp_path):
    import subprocess
    import sys
    from types import SimpleNamespace
    fast, slow = _warmup_records()
    for name, recs in (("mamba1-50", fast), ("mamba2-50", slow)):
        _stage(tmp_path, name, "01-distill", [{**r, "tokens_seen": 0} for r in recs])
    running = {n: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
               for n in ("mamba1-50", "mamba2-50")}
    try:
        args = SimpleNamespace(calib_timeout_s=30, calib_warmup_records=4, calib_records=4)
        assert study._calibrate(tmp_path, running, args) == {
            "mamba1-50": pytest.approx(0.64), "mamba2-50": pytest.approx(0.575)}
        args.calib_records = 5   # "mamba2-50" has only 4 steady records
        args.calib_timeout_s = 6
        with pytest.raises(SystemExit, match=r"no steady progress within --calib-timeout-s 6: "
                                             r"progress records per student .*'mamba2-50': 8"):
            study._calibrate(tmp_path, running, args)
    finally:
        for p in running.values():
            p.kill()
            p.wait()


def test_step_seconds_from_an_earlier_run_and_what_it_lacks_is_named(tmp_path):
    # A rerun on the same data plans with the step times the last run's calibration
    # measured (its quality_study.json, as gpu-finish writes it) instead of calibrating.
    fast, slow = _warmup_records()
    measured = study.steady_step_seconds({"mamba2-50": fast, "mamba1-50": slow}, 4, 4)
    results = tmp_path / "quality_study.json"
    results.write_text(json.dumps({"plan": {"steps": 10, "calibration_step_s": measured}}))
    assert study.recorded_step_seconds(results, ["mamba1-50"]) == {"mamba1-50": measured["mamba1-50"]}
    with pytest.raises(SystemExit, match=r"no step time for mamba2-50-random \(it has mamba2-50, "
                                         r"mamba1-50\); calibrate instead"):
        study.recorded_step_seconds(results, ["mamba2-50", "mamba2-50-random"])
    results.write_text(json.dumps({"plan": {"calibration_step_s": {"mamba2-50": 0, "mamba1-50": "x"}}}))
    with pytest.raises(SystemExit, match="calibration_step_s of mamba2-50, mamba1-50 is not a "
                                         "positive number of seconds"):
        study.recorded_step_seconds(results, ["mamba2-50", "mamba1-50"])
    results.write_text(json.dumps({"plan": {"calibration_step_s": [0.5]}}))
    with pytest.raises(SystemExit, match="is not a mapping of student to seconds"):
        study.recorded_step_seconds(results, ["mamba2-50"])
    results.write_text(json.dumps({"models": {}}))
    with pytest.raises(SystemExit, match=re.escape(f"{results}: no plan.calibration_step_s in it "
                                                   f"(KeyError")):
        study.recorded_step_seconds(results, ["mamba2-50"])
    with pytest.raises(SystemExit, match="missing.json: no plan.calibration_step_s in it "
                                         ".FileNotFoundError"):
        study.recorded_step_seconds(tmp_path / "missing.json", ["mamba2-50"])


def test_a_launch_whose_students_cannot_share_the_gpu_is_refused(tmp_path):
    # Run 12's shape on an 80 GB H100 (79.2 GiB): three students at ~23.6 GiB, the
    # progressive one at ~26 GiB in its second stage; two fit, three do not.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    peak = {"mamba2-50": 23.4 + float(torch.rand((), generator=g)) * 0.2,
            "mamba2-25-progressive": 26.0}
    progress = {n: [dict(r, max_memory_gb=p - 0.2 * (i == 0))
                    for i, r in enumerate(_records(0, [10, 20, 30], [0.5] * 3))]
                for n, p in peak.items()}
    results = tmp_path / "quality_study.json"
    results.write_text(json.dumps({"progress": progress}))
    three = ["mamba2-50", "mamba2-50-random", "mamba2-25-progressive"]
    got = study.recorded_peak_memory(results, three)
    # a student the earlier run lacks is taken at its largest peak
    assert got == {"mamba2-50": peak["mamba2-50"], "mamba2-50-random": 26.0,
                   "mamba2-25-progressive": 26.0}
    study.check_students_fit({n: got[n] for n in three[:2]}, 79.2, "NVIDIA H100")
    study.check_students_fit(got, 139.8, "NVIDIA H200")
    with pytest.raises(SystemExit, match=r"the students need ~8\d\.\d GiB together \(peaks "
                                         r"mamba2-50 23\.\d, .* and the NVIDIA H100 has 79\.2 "
                                         r"GiB: train fewer at once \(--only\)"):
        study.check_students_fit(got, 79.2, "NVIDIA H100")
    results.write_text(json.dumps({"progress": {"mamba2-50": [{"step": 5}]}}))
    with pytest.raises(SystemExit, match=re.escape(f"--step-seconds-from {results}: no progress "
                                                   f"with max_memory_gb in it (KeyError")):
        study.recorded_peak_memory(results, three)


def test_planned_steps_fit_the_budget_or_take_an_earlier_runs_count():
    assert study.planned_steps(1000, 0.5, 0.9) == 1800
    assert study.planned_steps(1000, 0.5, 0.9, fixed=1663) == 1663   # an A/B at run 8's steps
    with pytest.raises(SystemExit, match=r"--steps 1900 do not fit the budget: 1800 steps fit"):
        study.planned_steps(1000, 0.5, 0.9, fixed=1900)
    with pytest.raises(SystemExit, match=r"18 steps are fewer than --min-steps 50: give a larger"):
        study.planned_steps(10, 0.5, 0.9, min_steps=50)
    with pytest.raises(SystemExit, match=r"^0 steps are fewer than --min-steps 1$"):
        study.planned_steps(1000, 0.5, 0.9, fixed=0)               # not "as many as fit"


def test_plan_counts_the_slowest_students_steps_alone_after_the_others_finish(tmp_path):
    # Run 11's shape: Mamba2 students at ~0.53 s a step sharing the GPU, the Mamba1 one at
    # 0.88 s sharing and 0.24 s alone once they finished.
    shared = {"mamba2-50": 0.52, "mamba1-50-state64": 0.88, "mamba2-50-random": 0.50}
    assert study.seconds_per_step(shared) == 0.88                     # no tail: as before
    per_step = study.seconds_per_step(shared, tail_s=0.24)
    assert per_step == pytest.approx(0.52 + (1 - 0.52 / 0.88) * 0.24)
    assert study.planned_steps(1000, per_step, 1.0) > study.planned_steps(1000, 0.88, 1.0) * 1.3
    assert study.seconds_per_step(shared, tail_s=5.0) == 0.88         # never above shared
    assert study.seconds_per_step({"mamba2-50": 0.3}, tail_s=0.1) == 0.3   # one student

    results = tmp_path / "quality_study.json"
    fast = _records(0, [10, 20, 30], [0.52] * 3)
    slow = _records(0, [10, 20, 30, 31, 32, 33, 34], [0.88] * 3 + [0.25, 0.23, 0.24, 0.30])
    results.write_text(json.dumps({"progress": {"mamba2-50": fast, "mamba1-50-state64": slow}}))
    assert study.recorded_tail_step_seconds(results, "mamba1-50-state64") == pytest.approx(0.245)
    with pytest.raises(SystemExit, match="mamba2-50 logged 0 progress records after the other "
                                         "students finished; need 3"):
        study.recorded_tail_step_seconds(results, "mamba2-50")
    with pytest.raises(SystemExit, match=re.escape(f"--tail-step-seconds-from {results}: no "
                                                   f"progress of mamba1-50 and of other")):
        study.recorded_tail_step_seconds(results, "mamba1-50")
    slow[-1]["step_time_s"] = -0.2
    results.write_text(json.dumps({"progress": {"mamba2-50": fast, "mamba1-50-state64": slow}}))
    with pytest.raises(SystemExit, match="a step_time_s of mamba1-50-state64 after the other "
                                         "students finished is not a positive number"):
        study.recorded_tail_step_seconds(results, "mamba1-50-state64")
    results.write_text(json.dumps({"progress": {"mamba1-50-state64": slow}}))
    with pytest.raises(SystemExit, match="no progress of mamba1-50-state64 and of other students"):
        study.recorded_tail_step_seconds(results, "mamba1-50-state64")


def test_gpu_continue_rehearsed_on_cpu_goes_on_with_the_students_walk(tmp_path, shared_dir):
    """gpu-continue on CPU with a tiny teacher and student: the student trains on from its
    final model (compiled, as the study trains), its walk starting where its stages
    stopped (their model's data_end), and comes back evaluated."""
    from distillation.pipeline import data_end
    from distillation.tokens import save_examples
    from tests.utils import make_random_hybrid, make_random_llama, random_kd_examples
    root, name = tmp_path / "study", "mamba2-50"
    root.mkdir()
    (root / "code").symlink_to(study.REPO)
    (root / "data").symlink_to(shared_dir / "data")
    make_random_llama(root / "teacher", num_layers=2)
    final = _stage(root, name, "01-distill", done=True) / "model"
    make_random_hybrid(final, "mamba2", num_layers=2, attn_layers=(1,))
    (final / "train_state.json").write_text(json.dumps({"steps": 4, "data_end": 8}))
    (root / "runs" / name / "data").mkdir()
    save_examples(random_kd_examples(40, prompt=(2, 12), answer=(4, 40)),
                  root / "runs" / name / "data" / "kd_examples-0.pt")
    out = tmp_path / "out"
    sets = ["data.max_length=96", "training.compile_pad_multiple=48", "eval.num_prompts=2",
            "eval.num_essays=1", "eval.max_new_tokens=4", "eval.ppl_max_tokens=128",
            "eval.num_samples=1"]
    assert study.main(["gpu-continue", "--root", str(root), "--device", "cpu", "--student", name,
                       "--steps", "3", "--batch-size", "2", "--out", str(out),
                       *[a for s in sets for a in ("--set", s)]]) == 0
    assert data_end(root / "runs" / name / "continued" / "model") == 8 + 3 * 2
    result = json.loads((out / "quality_study_continued.json").read_text())
    assert result["progress"][f"{name}+3x2"][-1]["step"] == 3
    assert result["models"][f"{name}+3x2"]["perplexity"] > 1
