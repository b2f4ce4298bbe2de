"""The GPU quality study: distil the real SmolLM2 teacher into several students on one GPU.

What it shows (README, "Quality study"): attention-initialised 50% hybrids against a
random-initialised one at the same token budget, 50% against 25% attention, both
Mamba variants. Two more students for speculative decoding on the CPU engine (a 50%
Mamba2 hybrid whose MLPs stay the teacher's, and a 2-layer draft) can join with
``--only``; they come back as deltas against the teacher because a lent-GPU run
returns at most 64 MiB.

The lent GPU machine has no vLLM, no Ray and no network, and a run carries at most
64 MiB, so the work is split by machine:

  CPU machine   python examples/quality_study.py prepare
                  imports the teacher, packs .carry/run1 and .carry/run2 (the
                  teacher's GGUF in two parts, its small files, wheels, data)
  GPU, call 1   python examples/quality_study.py gpu-setup --carry .carry/run1
                  stashes GGUF part 1 and the data, installs the wheels under --root
  GPU, call 2   python examples/quality_study.py gpu-train --carry .carry/run2 --budget-s 960
                  joins the GGUF, imports and checks the teacher, has it write the
                  pseudo-labels (answers and samples, the project's CUDA-graph
                  generator: ``pseudo_labels.engine: runtime``), calibrates the step
                  time of all students running together (or takes an earlier run's:
                  --step-seconds-from), sizes the run to the budget and launches them
                  (detached: they outlive the call)
  GPU, call 3   python examples/quality_study.py gpu-wait --out $OUT (optional, repeatable)
                  waits while the students train on, returns their curves so far
  GPU, call 4   python examples/quality_study.py gpu-finish --out $OUT
                  waits for the students, evaluates all of them and the teacher
                  (mamba-hybrid eval's metrics), writes the table, plots, deltas
  GPU, call 5   python examples/quality_study.py gpu-continue --out $OUT (optional)
                  one finished student trains on alone, then is evaluated
  CPU machine   python examples/quality_study.py fetch RESULTS_DIR
                  copies the metrics and plot into benchmarks/results and rebuilds
                  the delta students, if any

The GPU calls must follow each other while the machine is warm (state lives under --root).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "examples" / "quality_study.yaml"
GGUF_SPLIT = 50_000_000  # bytes in part 1; a run carries at most 64 MiB
TEACHER_SMALL_FILES = "teacher_files"
# What the pipeline needs and the GPU machine's Python 3.12 lacks (the device README's
# package list), carried as wheels at the versions this machine runs: ~1 MiB in all.
GPU_WHEELS = ("datasets", "dill", "multiprocess", "gguf")
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64")

# name -> config overrides (the base config is the 50% Mamba2 hybrid, attention init).
STUDENTS = {
    "mamba2-50": {},
    "mamba1-50": {"student.variant": "mamba1"},
    "mamba2-25": {"student.attn_fraction": 0.25},
    "mamba1-25": {"student.variant": "mamba1", "student.attn_fraction": 0.25},
    "mamba2-50-random": {"student.mamba_init": "random"},
    # The paper's stepwise route to 25%: half the steps as the 50% hybrid, then the
    # layers between its attention layers are replaced too (from the trained model's
    # attention weights) for the other half; same total steps as every other student.
    "mamba2-25-progressive": {"student.attn_fraction": 0.25, "stages.progressive.enabled": True,
                              "stages.distill.enabled": False},
    # Mamba1 at d_state = head_dim (64) instead of MambaInLlama's 16 (mamba1-50, runs
    # 4-9): each B/C group is one attention head (the whole q.k, not a 16-dim quarter of
    # it) and the state is Mamba2's size. Run 10 (named mamba1-50 there) took it as
    # 16 x 2 sequences a step: its scan's backward then kept every token's state (32 x 1
    # took 56.5 GiB); it keeps one state per 16 tokens since run 11.
    "mamba1-50-state64": {"student.variant": "mamba1", "student.d_state": 64},
    # Not in the default set (--only): the base student at run 1-3's learning rate ...
    "mamba2-50-lr3e-4": {"stages.distill.lr": 3.0e-4},
    # ... only the Mamba mixers train (the paper's first stage), the speculative-decoding
    # target of benchmarks/spec_decode.py, shipped back as its mixers alone ...
    "mamba2-50-mixers": {"stages.distill.freeze_mlp": True},
    # Issue 37's comparison, beside the fixed odd layers of mamba2-50 and mamba2-50-random
    # (--only mamba2-50 mamba2-50-loo mamba2-50-klguided mamba2-50-reverse mamba2-25-loo
    # mamba2-50-random): the attention layers kept by measured importance
    # (mamba-hybrid layer-importance, scored on the GPU in each run dir) instead of the
    # paper's odd layers, and reverse KL (mode seeking) instead of forward.
    "mamba2-50-loo": {"student.attn_layers": "auto", "student.layer_criterion": "loo"},
    "mamba2-50-klguided": {"student.attn_layers": "auto", "student.layer_criterion": "kl-guided"},
    "mamba2-25-loo": {"student.attn_fraction": 0.25, "student.attn_layers": "auto"},
    "mamba1-50-loo": {"student.variant": "mamba1", "student.d_state": 64,
                      "student.attn_layers": "auto"},
    "mamba2-50-reverse": {"stages.distill.kl_direction": "reverse"},
    "mamba2-50-loo-reverse": {"student.attn_layers": "auto",
                              "stages.distill.kl_direction": "reverse"},
    # ... and a 2-layer draft (teacher layers 0 and 29, attention) sharing the teacher's
    # embeddings and head, which stay frozen so that only its layers travel back.
    "draft-2l": {"student.layers": [0, 29], "student.attn_fraction": 1.0,
                 "stages.distill.freeze_embeddings": True, "stages.distill.lr": 5.0e-4},
}
# Four students since run 5 (each gets more of the GPU); run 4's 25% students trained
# from the start (mamba2-25, mamba1-25: 1.94x and 4.34x the teacher) and runs 4-9's
# Mamba1 at d_state 16 (mamba1-50) join with --only.
DEFAULT_STUDENTS = ["mamba2-50", "mamba1-50-state64", "mamba2-50-random", "mamba2-25-progressive"]
DELTAS = ("mamba2-50-mixers", "draft-2l")   # students whose weights come back
INIT_ROWS = ("mamba2-50", "mamba1-50", "mamba1-50-state64", "mamba2-50-random")  # also at step 0


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cfg():
    from distillation.config import load_config
    return load_config(CONFIG)


# ------------------------------------------------------------------ CPU machine


def download_gpu_wheels(dest: Path) -> int:
    """pip download GPU_WHEELS for the GPU machine's Python into ``dest``; pip's exit code."""
    from importlib.metadata import version
    pins = [f"{name}=={version(name)}" for name in GPU_WHEELS]
    log(f"downloading wheels for the GPU machine's Python 3.12: {' '.join(pins)}")
    platforms = [a for p in GPU_PLATFORMS for a in ("--platform", p)]
    return subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                           "cp", *platforms, "-d", str(dest), *pins]).returncode


def cmd_prepare(args) -> int:
    """Teacher import on the CPU machine; pack the two carries."""
    from distillation import fingerprint
    from distillation.paths import resolve_data_dir
    from vllm_mamba_hybrid.conversion.teacher import embedded_teacher_gguf, import_teacher

    cfg = _cfg()
    teacher = Path(cfg.teacher.path)
    if not (teacher / "config.json").is_file():
        log(f"importing the embedded teacher into {teacher}")
        import_teacher(None, teacher)

    carry = Path(args.carry)
    run1, run2 = carry / "run1", carry / "run2"
    for d in (run1, run2):
        if d.exists():
            shutil.rmtree(d / "payload", ignore_errors=True)
        (d / "payload").mkdir(parents=True, exist_ok=True)
    gguf = embedded_teacher_gguf()
    data = gguf.read_bytes()
    (run1 / "payload" / "gguf.part1").write_bytes(data[:GGUF_SPLIT])
    (run2 / "payload" / "gguf.part2").write_bytes(data[GGUF_SPLIT:])
    small = run2 / "payload" / TEACHER_SMALL_FILES
    small.mkdir()
    for f in teacher.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, small / f.name)
    shutil.copytree(resolve_data_dir(cfg.data.data_dir), run1 / "payload" / "data")
    manifest = {"gguf_name": gguf.name, "gguf_sha256": sha256(gguf), "gguf_bytes": len(data),
                "teacher_fingerprint": fingerprint.of_model_dir(teacher),
                "teacher_weights_sha256": {f.name: sha256(f) for f in teacher.glob("*.safetensors")}}
    (run2 / "payload" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    whl = run1 / "whl"
    if not any(whl.glob("*.whl")) and download_gpu_wheels(whl) != 0:
        log(f"pip could not download {', '.join(GPU_WHEELS)} into {whl} (no network?): put "
            f"their cp312 manylinux wheels there by hand and run prepare again")
        return 2
    for d in (run1, run2):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        log(f"{d}: {size / 2 ** 20:.1f} MiB")
    return 0


def cmd_fetch(args) -> int:
    """Results of gpu-finish -> benchmarks/results (the plot drawn anew from the JSON, so
    it follows this file's ``plot``); rebuild the delta students."""
    from vllm_mamba_hybrid.conversion.delta import apply_delta
    res = Path(args.results)
    if not (res / "quality_study.json").is_file():
        log(f"{res} holds no quality_study.json: pass the folder gpu-finish wrote ($OUT)")
        return 2
    dest = Path(args.dest)
    for name in ("quality_study.json", "quality_study.md"):
        if (res / name).is_file():
            shutil.copy2(res / name, dest / name)
            log(f"{dest / name}")
    plot(json.loads((res / "quality_study.json").read_text()), dest / "quality_study.png")
    log(f"{dest / 'quality_study.png'} (drawn from the JSON)")
    cfg = _cfg()
    for student in DELTAS:
        shards = sorted(res.glob(f"{student}-*.safetensors"))
        if shards:
            out = Path(cfg.output_dir).parent / student
            apply_delta(cfg.teacher.path, shards, out, overwrite=True)
            log(f"{student} rebuilt in {out}")
    return 0


# ------------------------------------------------------------------ GPU machine


def cmd_gpu_setup(args) -> int:
    root = Path(args.root)
    (root / "stash").mkdir(parents=True, exist_ok=True)
    carry = Path(args.carry)
    shutil.copy2(carry / "payload" / "gguf.part1", root / "stash" / "gguf.part1")
    if not (root / "data").exists():
        shutil.copytree(carry / "payload" / "data", root / "data")
    wheels = sorted(str(w) for w in (carry / "whl").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                    str(root / "site"), *wheels], check=True)
    device = "torch.cuda.get_device_name()" if args.device == "cuda" else "'cpu'"
    check = subprocess.run([sys.executable, "-c", "import datasets, gguf, torch; "
                            f"print('datasets', datasets.__version__, 'gguf ok;', {device})"],
                           env=_env(root), capture_output=True, text=True)
    print(check.stdout + check.stderr, flush=True)
    return check.returncode


def _env(root: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "code"), str(root / "site"),
                                         env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # the students share the GPU
    # training.compile: the calibration's compiled kernels serve the real launch
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    return env


def _overrides(root: Path, name: str, steps: int, args) -> list[str]:
    """``steps`` is every student's total: a progressive student splits it evenly over
    its stages (examples/quality_study.yaml's schedule)."""
    progressive = STUDENTS[name].get("stages.progressive.enabled", False)
    sets = {"output_dir": str(root / "runs" / name), "teacher.path": str(root / "teacher"),
            "data.data_dir": str(root / "data"), "data.cache_dir": str(root / "pseudo_labels"),
            "backend.device": args.device, "stages.distill.steps": steps,
            "stages.progressive.steps": steps // len(_cfg().stages.progressive.schedule)
            if progressive else steps, **STUDENTS[name]}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    for extra in args.set:  # the user's, after the study's
        out += ["--set", extra]
    return out


def _launch(root: Path, steps: int, tag: str, args) -> dict[str, subprocess.Popen]:
    """Every student's pipeline as a detached process (new session: outlives this call)."""
    procs = {}
    (root / "logs").mkdir(exist_ok=True)
    for name in args.only:
        logf = open(root / "logs" / f"{name}.{tag}.log", "w")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "distillation.cli", str(root / "code" / CONFIG.relative_to(REPO)),
             *_overrides(root, name, steps, args)],
            cwd=root / "code", env=_env(root), stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)
    (root / f"pids.{tag}.json").write_text(json.dumps({n: p.pid for n, p in procs.items()}))
    return procs


def _training_stages(root: Path, name: str) -> list[Path]:
    """The student's training stages begun so far, in order (not init, not export)."""
    d = root / "runs" / name / "stages"
    return sorted(p for p in d.glob("[0-9][0-9]-*")
                  if p.is_dir() and not p.name.endswith(("-init", "-export"))) if d.is_dir() else []


def _progress(root: Path, name: str) -> list[dict]:
    """Progress records of all training stages as one curve: steps and tokens counted
    from the start of the first stage; ``stage`` names each record's stage."""
    out, steps, tokens = [], 0, 0
    for stage in _training_stages(root, name):
        f = stage / "progress.jsonl"
        recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln] if f.is_file() else []
        out += [{**r, "step": r["step"] + steps, "tokens_seen": r["tokens_seen"] + tokens,
                 "stage": stage.name} for r in recs]
        if recs:
            steps, tokens = steps + recs[-1]["step"], tokens + recs[-1]["tokens_seen"]
    return out


def _import_teacher(root: Path, payload: Path) -> None:
    from distillation import fingerprint
    from vllm_mamba_hybrid.conversion.teacher import import_teacher
    manifest = json.loads((payload / "manifest.json").read_text())
    gguf = root / "stash" / manifest["gguf_name"]
    with open(gguf, "wb") as f:
        f.write((root / "stash" / "gguf.part1").read_bytes())
        f.write((payload / "gguf.part2").read_bytes())
    if sha256(gguf) != manifest["gguf_sha256"]:
        raise SystemExit(f"{gguf}: sha256 differs from the CPU machine's GGUF")
    teacher = root / "teacher"
    import_teacher(gguf, teacher, overwrite=True)
    for f in (payload / TEACHER_SMALL_FILES).iterdir():   # byte-identical config/tokenizer
        shutil.copy2(f, teacher / f.name)
    got = {f.name: sha256(f) for f in teacher.glob("*.safetensors")}
    if got != manifest["teacher_weights_sha256"]:
        raise SystemExit(f"teacher weights differ from the CPU machine's import: {got} vs "
                         f"{manifest['teacher_weights_sha256']}")
    if fingerprint.of_model_dir(teacher) != manifest["teacher_fingerprint"]:
        raise SystemExit("teacher fingerprint differs from the CPU machine's")
    log(f"teacher imported and identical to the CPU machine's ({manifest['teacher_fingerprint']})")


def _study_config(root: Path, args):
    """The study config of the private code copy, with the machine's data dir and --set."""
    from distillation.cli import _override
    from distillation.config import load_config
    return load_config(root / "code" / CONFIG.relative_to(REPO),
                       {"data.data_dir": str(root / "data"), **dict(map(_override, args.set))})


def _pseudo_labels(root: Path, args) -> None:
    """The teacher's answers, samples and prose continuations, once, before the
    students start (they share the cache, so each finds it valid and reuses it)."""
    from distillation.models import load_tokenizer
    from distillation.pipeline import prose_windows, teacher_pseudo_labels
    cfg = _study_config(root, args)
    teacher = root / "teacher"
    tok = load_tokenizer(teacher)
    _, windows = prose_windows(cfg, tok)
    teacher_pseudo_labels(cfg, teacher, tok, root / "pseudo_labels", windows, log=log)


def steady_step_seconds(progress: dict[str, list[dict]], warmup: int,
                        records: int) -> dict[str, float] | None:
    """Median step seconds of each student over the progress records logged after every
    student has logged ``warmup`` records; None until each has ``records`` of those.

    Steps taken while another student still loads or compiles its first padded widths
    mislead both ways: in the first H200 run the early students' start-up steps doubled
    the estimate; in run 6 the Mamba1 student ran 0.40 s a step while the Mamba2 ones
    still compiled, and 0.64 s once they all ran."""
    if warmup < 1 or records < 1:
        raise ValueError(f"--calib-warmup-records and --calib-records must be >= 1 "
                         f"(got {warmup}, {records})")
    if not progress or any(len(recs) < warmup for recs in progress.values()):
        return None
    steady_from = max(recs[warmup - 1]["time"] for recs in progress.values())
    steady = {n: [r["step_time_s"] for r in recs if r["time"] > steady_from]
              for n, recs in progress.items()}
    if any(len(times) < records for times in steady.values()):
        return None
    return {n: statistics.median(times) for n, times in steady.items()}


def _calibrate(root: Path, procs: dict, args) -> dict[str, float]:
    """Every student's steady step seconds (``steady_step_seconds``) while all of them
    run together, as they will; a student that dies or a calibration that outlasts
    ``--calib-timeout-s`` stops gpu-train with what each student logged."""
    deadline, progress = time.time() + args.calib_timeout_s, {}
    while time.time() < deadline:
        time.sleep(5)
        dead = [n for n, p in procs.items() if p.poll() not in (None, 0)]
        if dead:
            for n in dead:
                print((root / "logs" / f"{n}.calib.log").read_text()[-3000:])
            raise SystemExit(f"students failed during calibration: {dead}")
        progress = {n: _progress(root, n) for n in procs}
        step_time = steady_step_seconds(progress, args.calib_warmup_records, args.calib_records)
        if step_time:
            return step_time
    raise SystemExit(f"no steady progress within --calib-timeout-s {args.calib_timeout_s:g}: "
                     f"progress records per student { {n: len(r) for n, r in progress.items()} }, "
                     f"need {args.calib_warmup_records} + {args.calib_records}")


def recorded_step_seconds(results: Path, students: list[str]) -> dict[str, float]:
    """The step seconds an earlier run's calibration measured (``plan.calibration_step_s``
    of its quality_study.json) for ``students``: a rerun on the same data skips the
    calibration, which in run 7 took ~3 of the 16 minutes left for training (a throw-away
    launch, compiles included)."""
    try:
        measured = json.loads(results.read_text())["plan"]["calibration_step_s"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--step-seconds-from {results}: no plan.calibration_step_s in it "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(measured, dict):
        raise SystemExit(f"--step-seconds-from {results}: plan.calibration_step_s is not a "
                         f"mapping of student to seconds")
    missing = [n for n in students if n not in measured]
    if missing:
        raise SystemExit(f"--step-seconds-from {results}: no step time for {', '.join(missing)} "
                         f"(it has {', '.join(measured) or 'none'}); calibrate instead")
    bad = [n for n in students
           if not isinstance(measured[n], (int, float)) or not measured[n] > 0]
    if bad:
        raise SystemExit(f"--step-seconds-from {results}: plan.calibration_step_s of "
                         f"{', '.join(bad)} is not a positive number of seconds")
    return {n: float(measured[n]) for n in students}


def recorded_tail_step_seconds(results: Path, name: str) -> float:
    """Median step seconds of ``name`` in an earlier run once it trained alone: its
    progress records logged after every other student's last one. In run 11 the Mamba1
    student stepped 0.87 s sharing the GPU and 0.24 s alone; a plan at the shared time
    ended 280 s (27%) before its budget."""
    try:
        progress = json.loads(results.read_text())["progress"]
        others = [recs[-1]["time"] for n, recs in progress.items() if n != name and recs]
        tail = [r["step_time_s"] for r in progress[name] if r["time"] > max(others)]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise SystemExit(f"--tail-step-seconds-from {results}: no progress of {name} and of "
                         f"other students in it ({type(e).__name__}: {e})") from None
    if len(tail) < 3:
        raise SystemExit(f"--tail-step-seconds-from {results}: {name} logged {len(tail)} "
                         f"progress records after the other students finished; need 3")
    if not all(isinstance(t, (int, float)) and t > 0 for t in tail):
        raise SystemExit(f"--tail-step-seconds-from {results}: a step_time_s of {name} after "
                         f"the other students finished is not a positive number of seconds")
    return statistics.median(tail)


# GPU memory a student process holds beyond its peak allocation (CUDA context, allocator
# slack: 25.8 GiB in use at a 23.6 GiB peak in run 12), and what gpu-train's own process
# keeps after the pseudo-labels (0.96 GiB in run 12).
STUDENT_OVERHEAD_GIB = 2.5
STUDY_PROCESS_GIB = 1.0


def recorded_peak_memory(results: Path, students: list[str]) -> dict[str, float]:
    """Each student's highest ``max_memory_gb`` in an earlier run's progress; a student
    that run lacks is taken at the largest peak it has (the students are one size)."""
    try:
        progress = json.loads(results.read_text())["progress"]
        peaks = {n: max(r["max_memory_gb"] for r in recs)
                 for n, recs in progress.items() if recs}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--step-seconds-from {results}: no progress with max_memory_gb in it "
                         f"({type(e).__name__}: {e}), so no memory check; calibrate "
                         f"instead") from None
    if not peaks:
        raise SystemExit(f"--step-seconds-from {results}: no student's progress in it")
    return {n: peaks.get(n, max(peaks.values())) for n in students}


def check_students_fit(peaks: dict[str, float], total_gib: float, card: str) -> None:
    """Refuse a launch whose students cannot all be in GPU memory at once: one that runs
    out mid-run is lost with its share of the budget (run 12: three students on an
    80 GB H100, the progressive one stopped at its second stage)."""
    need = sum(peaks.values()) + STUDENT_OVERHEAD_GIB * len(peaks) + STUDY_PROCESS_GIB
    if need > total_gib:
        each = ", ".join(f"{n} {p:.1f}" for n, p in peaks.items())
        raise SystemExit(
            f"the students need ~{need:.1f} GiB together (peaks {each} GiB, plus "
            f"{STUDENT_OVERHEAD_GIB:g} GiB a process and {STUDY_PROCESS_GIB:g} GiB for this "
            f"one) and the {card} has {total_gib:.1f} GiB: train fewer at once (--only)")


def seconds_per_step(step_s: dict[str, float], tail_s: float | None = None) -> float:
    """Wall seconds a step of the run costs, planned on its slowest student: the shared
    step time throughout, or, with ``tail_s`` (that student's step time alone), shared
    steps until the second slowest is done and the rest alone. The students
    time-share the GPU, so once the others stop, the slowest steps at its own speed."""
    slowest = max(step_s.values())
    others = sorted(step_s.values())[:-1]
    if tail_s is None or not others:
        return slowest
    second = others[-1]
    return second + (1 - second / slowest) * min(tail_s, slowest)


def planned_steps(remaining_s: float, step_s: float, safety: float, fixed: int | None = None,
                  min_steps: int = 1) -> int:
    """Steps every student trains: as many as fit ``remaining_s * safety`` at ``step_s``
    wall seconds a step (:func:`seconds_per_step`), or exactly ``fixed`` (an earlier
    run's budget, for an A/B against it), refused by name where those do not fit."""
    fit = int(remaining_s * safety / step_s)
    if fixed is not None and fixed > fit:
        raise SystemExit(f"--steps {fixed} do not fit the budget: {fit} steps fit "
                         f"{remaining_s:.0f} s at {step_s:.3f} s a step with --safety {safety:g}")
    steps = fit if fixed is None else fixed
    if steps < min_steps:
        raise SystemExit(f"{steps} steps are fewer than --min-steps {min_steps}" + (
            "" if fixed is not None else f": give a larger --budget-s ({remaining_s:.0f} s left)"))
    return steps


def cmd_gpu_train(args) -> int:
    root, payload = Path(args.root), Path(args.carry) / "payload"
    t_start = time.time()
    if args.step_seconds_from and args.device == "cuda":
        import torch
        props = torch.cuda.get_device_properties(0)
        check_students_fit(recorded_peak_memory(Path(args.step_seconds_from), args.only),
                           props.total_memory / 2**30, props.name)
    if (root / "code").exists():
        shutil.rmtree(root / "code")
    # A private copy of the code: the next call re-syncs the working tree under the
    # running students.
    shutil.copytree(REPO, root / "code", ignore=shutil.ignore_patterns(
        ".git", ".carry", "runs", ".venv", "__pycache__", "benchmarks"))
    sys.path.insert(0, str(root / "site"))
    _import_teacher(root, payload)
    _pseudo_labels(root, args)

    if args.step_seconds_from:
        step_time = recorded_step_seconds(Path(args.step_seconds_from), args.only)
    else:  # calibration: all students together for a few steps, the way they will run
        procs = _launch(root, args.calib_steps_total, "calib", args)
        try:
            step_time = _calibrate(root, procs, args)
        finally:  # stopped however calibration ends, so a failure leaves no GPU job behind
            for p in procs.values():
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for n in args.only:  # keep the init stage and data, redo the training stages
            for stage in _training_stages(root, n):
                shutil.rmtree(stage)
    remaining = args.budget_s - (time.time() - t_start) - args.startup_s
    source = args.step_seconds_from or "calibration"
    log(f"{source}: step seconds {json.dumps({k: round(v, 3) for k, v in step_time.items()})}; "
        f"{remaining:.0f} s left")
    tail = None
    if args.tail_step_seconds_from:
        slowest_name = max(step_time, key=step_time.get)
        tail = recorded_tail_step_seconds(Path(args.tail_step_seconds_from), slowest_name)
        log(f"{slowest_name} alone: {tail:.3f} s a step ({args.tail_step_seconds_from})")
    per_step = seconds_per_step(step_time, tail)
    steps = planned_steps(remaining, per_step, args.safety, args.steps, args.min_steps)
    log(f"{steps} steps each ({per_step:.3f} s a step planned)")
    (root / "plan.json").write_text(json.dumps({
        "steps": steps, "calibration_step_s": step_time, "tail_step_s": tail,
        "budget_s": args.budget_s, "launched": time.time(),
        "expected_end": time.time() + args.startup_s + steps * per_step}))
    _launch(root, steps, "train", args)
    while time.time() - t_start < args.return_after_s:
        time.sleep(20)
        log(_steps_line(root, args.only))
    return 0


def _finished(root: Path, name: str) -> bool:
    """The pipeline's last stage (export, after every training stage) is done."""
    return any((d / "DONE.json").is_file()
               for d in (root / "runs" / name / "stages").glob("[0-9][0-9]-export"))


def _steps_line(root: Path, names) -> str:
    return " ".join(f"{n}:{(_progress(root, n) or [{'step': 0}])[-1]['step']}" for n in names)


def _final_model(root: Path, name: str) -> Path:
    stages = _training_stages(root, name)
    if not stages:
        raise SystemExit(f"{root / 'runs' / name}: no training stage has begun for {name!r} "
                         f"(was it launched by gpu-train?)")
    return stages[-1] / "model"


def _wait(root: Path, wait_s: float) -> dict[str, int]:
    """Wait up to ``wait_s`` for the launched students to finish; their pids by name."""
    launched = root / "pids.train.json"
    if not launched.is_file():
        raise SystemExit(f"{launched} not found: no students were launched under {root} "
                         f"(run gpu-train first, with the same --root)")
    pids = json.loads(launched.read_text())
    deadline = time.time() + wait_s
    while time.time() < deadline and not all(_finished(root, n) for n in pids):
        log(_steps_line(root, list(pids)))
        time.sleep(15)
    return pids


def cmd_gpu_wait(args) -> int:
    """A call that only waits (the students train on past it); with --out, their
    curves so far come back, so a machine lost before gpu-finish loses no record."""
    pids = _wait(Path(args.root), args.wait_s)
    log(f"{_steps_line(Path(args.root), list(pids))}; finished: "
        f"{[n for n in pids if _finished(Path(args.root), n)]}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "quality_study_progress.json").write_text(json.dumps(
            {n: _progress(Path(args.root), n) for n in pids}, indent=1))
    return 0


def cmd_gpu_finish(args) -> int:
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(root / "site"))
    sys.path.insert(0, str(root / "code"))
    pids = _wait(root, args.wait_s)
    plan = json.loads((root / "plan.json").read_text())
    finished = [n for n in pids if _finished(root, n)]
    for n, pid in pids.items():  # a student past the deadline is stopped and reported
        if n not in finished:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log(f"finished: {finished}; not finished: {sorted(set(pids) - set(finished))}")

    import torch
    from distillation.evaluate import evaluate_models, format_table
    from distillation.tokens import load_examples
    from vllm_mamba_hybrid.conversion.delta import write_delta
    cfg = _study_config(root, args)
    models = {n: _final_model(root, n) for n in finished}
    for n in INIT_ROWS:
        if n in pids:
            models[f"{n}@init"] = root / "runs" / n / "stages" / "00-init" / "model"
    result = evaluate_models(models, root / "teacher", data=cfg.data, cfg=cfg.eval, log=log,
                             device=args.device)
    result["plan"] = plan
    result["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result["students"] = {n: STUDENTS[n] for n in pids}
    result["progress"] = {n: _progress(root, n) for n in pids}
    result["training"] = {}
    for n in finished:
        metrics = _training_stages(root, n)[-1] / "metrics.json"
        result["training"][n] = json.loads(metrics.read_text()) if metrics.is_file() else None
    kd = load_examples(next((root / "runs" / next(iter(pids)) / "data").glob("kd_examples-*.pt")))
    prose = [e for e in kd if not e["prompt_ids"]]
    labels = json.loads((root / "pseudo_labels" / "settings.json").read_text())
    result["data"] = {"examples": len(kd), "answers": len(kd) - len(prose),
                      "prose_examples": len(prose),   # the windows and teacher continuations
                      "prose_prefixes_continued": labels["num_prose_prefixes"],
                      "answer_tokens": sum(len(e["answer_ids"]) for e in kd if e["prompt_ids"]),
                      "prose_tokens": sum(len(e["answer_ids"]) for e in prose),
                      "prompt_tokens": sum(len(e["prompt_ids"]) for e in kd)}
    (out / "quality_study.json").write_text(json.dumps(result, indent=1, default=str))
    table = format_table(result)
    (out / "quality_study.md").write_text(table + "\n")
    print(table, flush=True)
    plot(result, out / "quality_study.png")
    for n in DELTAS:
        if n in finished:
            write_delta(models[n], root / "teacher", out / n)
    return 0


def cmd_gpu_continue(args) -> int:
    """One finished student trains on alone (the GPU to itself: compiled, larger
    micro-batches) from its final model, then is evaluated: what more tokens buy. Its
    walk through the training examples goes on where the student's stages stopped."""
    root, out = Path(args.root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(root / "site"))
    sys.path.insert(0, str(root / "code"))
    from distillation.evaluate import evaluate_models, format_table
    from distillation.job import TrainJob
    from distillation.models import load_tokenizer
    from distillation.pipeline import data_end
    from distillation.reporting import read_progress
    from distillation.tokens import pad_id_of
    from distillation.trainer import train_worker
    cfg = _study_config(root, args)
    run, teacher = root / "runs" / args.student, root / "teacher"
    stage, final = run / "continued", _final_model(root, args.student)
    t0 = time.time()
    train_worker(TrainJob(
        stage="continued", stage_dir=str(stage), init_dir=str(final), data_start=data_end(final),
        data_file=str(next((run / "data").glob("kd_examples-*.pt"))), objective="kd",
        teacher_dir=str(teacher), steps=args.steps, lr=args.lr, warmup_steps=20,
        batch_size=args.batch_size, max_length=cfg.data.max_length,
        length_grouping_steps=cfg.training.length_grouping_steps, checkpoint_every=10 ** 9,
        log_every=50, dtype=cfg.training.dtype, device=args.device, compile=True,
        pad_multiple=cfg.training.compile_pad_multiple,
        pad_id=pad_id_of(load_tokenizer(teacher))).to_dict())
    progress = read_progress(stage)
    name = f"{args.student}+{args.steps}x{args.batch_size}"
    log(f"{name}: trained {time.time() - t0:.0f} s; last {json.dumps(progress[-1])}")
    result = evaluate_models({name: stage / "model"}, teacher, data=cfg.data, cfg=cfg.eval,
                             log=log, device=args.device)
    result["progress"] = {name: progress}
    (out / "quality_study_continued.json").write_text(json.dumps(result, indent=1, default=str))
    print(format_table(result), flush=True)
    return 0


def plot(result: dict, path: Path) -> None:
    """KL on the training stream against tokens seen; each trained student's held-out
    perplexity as a multiple of the teacher's, on a linear axis where the goal lines
    (1.05x, 1.10x) are readable (the step-0 rows, ~100x and more, are named under the axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(13, 4.6))
    for name, recs in result["progress"].items():
        if recs:
            ax_kl.plot([r["tokens_seen"] / 1e6 for r in recs], [r["kl"] for r in recs], label=name)
    ax_kl.set(xlabel="tokens seen (M)", ylabel="KL(teacher || student), training batches",
              yscale="log", title=f"distillation on {result['device']}")
    ax_kl.legend(fontsize=8)
    teacher = result["teacher_perplexity"]
    trained = {n: m["perplexity"] / teacher for n, m in result["models"].items() if "@init" not in n}
    at_init = ", ".join(f"{n.split('@')[0]} {m['perplexity'] / teacher:.0f}x"
                        for n, m in result["models"].items() if "@init" in n)
    bars = ax_ppl.barh(list(trained), [r - 1 for r in trained.values()], left=1, color="C0")
    ax_ppl.bar_label(bars, labels=[f"{r:.3f}x" for r in trained.values()], fontsize=8, padding=2)
    for goal, style in ((1.10, "--"), (1.05, ":")):
        ax_ppl.axvline(goal, color="red", lw=0.8, ls=style, label=f"teacher x {goal:.2f}")
    ax_ppl.set(xlabel=f"held-out essay perplexity / the teacher's ({teacher:.2f})"
                      + (f"\nat step 0: {at_init}" if at_init else ""),
               xlim=(1.0, max([1.12, *trained.values()]) * 1.03), title="held-out perplexity")
    ax_ppl.invert_yaxis()
    ax_ppl.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("prepare", help="CPU machine: teacher, pseudo-labels, carry folders")
    s.add_argument("--carry", default=str(REPO / ".carry"))
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("fetch", help="CPU machine: results -> benchmarks/results, rebuild deltas")
    s.add_argument("results")
    s.add_argument("--dest", default=str(REPO / "benchmarks" / "results"))
    s.set_defaults(func=cmd_fetch)
    for name, fn in (("gpu-setup", cmd_gpu_setup), ("gpu-train", cmd_gpu_train),
                     ("gpu-wait", cmd_gpu_wait), ("gpu-finish", cmd_gpu_finish),
                     ("gpu-continue", cmd_gpu_continue)):
        s = sub.add_parser(name)
        s.add_argument("--root", default="/root/study")
        s.add_argument("--device", default="cuda", help="cuda, or cpu for a rehearsal")
        s.set_defaults(func=fn)
        if name in ("gpu-setup", "gpu-train"):
            s.add_argument("--carry", required=True)
    s = sub.choices["gpu-train"]
    s.add_argument("--budget-s", type=float, default=960,
                   help="seconds from this call's start until training must be over")
    s.add_argument("--return-after-s", type=float, default=560)
    s.add_argument("--startup-s", type=float, default=45, help="a student's start-up time")
    s.add_argument("--safety", type=float, default=0.85)
    s.add_argument("--min-steps", type=int, default=50, help="refuse a shorter run")
    s.add_argument("--calib-steps-total", type=int, default=100000)
    s.add_argument("--calib-warmup-records", type=int, default=4,
                   help="progress lines every student logs before steps are timed")
    s.add_argument("--calib-records", type=int, default=4,
                   help="progress lines per student timed after the warm-up")
    s.add_argument("--calib-timeout-s", type=float, default=150)
    s.add_argument("--step-seconds-from", metavar="QUALITY_STUDY_JSON",
                   help="skip the calibration: the step seconds an earlier run on the same "
                        "data measured (benchmarks/results/quality_study.json); its students' "
                        "peak GPU memory refuses a launch that cannot fit the card")
    s.add_argument("--tail-step-seconds-from", metavar="QUALITY_STUDY_JSON",
                   help="plan the slowest student's last steps, after the others finish, at "
                        "its step time alone in an earlier run (its progress in that JSON)")
    s.add_argument("--steps", type=int,
                   help="train exactly this many steps (an earlier run's budget, for an A/B "
                        "against it) instead of as many as fit; refused if they do not fit")
    s.add_argument("--only", nargs="+", choices=list(STUDENTS), default=DEFAULT_STUDENTS,
                   help=f"the students to train (default: {' '.join(DEFAULT_STUDENTS)})")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every student (mamba-hybrid distill --set)")
    s = sub.choices["gpu-finish"]
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the evaluation, e.g. eval.num_prompts=8")
    s.add_argument("--out", required=True)
    s.add_argument("--wait-s", type=float, default=420)
    s = sub.choices["gpu-wait"]
    s.add_argument("--wait-s", type=float, default=560)
    s.add_argument("--out", help="where the training curves so far are written")
    s = sub.choices["gpu-continue"]
    s.add_argument("--student", default="mamba2-50", choices=list(STUDENTS))
    s.add_argument("--steps", type=int, default=700)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
