"""Long GPU-machine work as background jobs that outlive the device call that starts them.

A device call may run 10 minutes and the machine keeps what a detached process writes
while it stays warm, so a call starts jobs (run in the order given, one at a time) and
a later call collects them:

    python3 tools/gpu_jobs.py start tests-engine tests-spec   # returns at once
    python3 tools/gpu_jobs.py wait --max-s 500                 # until done or time is up
    python3 tools/gpu_jobs.py collect                          # logs + results -> $OUT
    python3 tools/gpu_jobs.py stop                             # end every chain now

Jobs run with the staged vLLM on the path (tools/gpu_stage.py env) and write under
/tmp/vllm_jobs/NAME.{log,rc}; their JSON results under /tmp/vllm_jobs/results/.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from gpu_stage import staged_env

REPO = Path(__file__).resolve().parents[1]
JOBS_DIR = Path("/tmp/vllm_jobs")
RESULTS = JOBS_DIR / "results"
CHAINS = JOBS_DIR / "chains"   # process-group ids of the chains started, one a line
# -v: a cut-short log still names each case; --failures-now (tests/conftest.py): each
# failure's report lands in the log when it happens, not when the whole run ends.
# --timeout: a case that hangs (the mamba1 draft-proposer case, 2026-12-07: 9 minutes without
# output) fails with its stack instead of holding the loan.
PYTEST = "python3 -m pytest -v -ra --durations=0 -p no:cacheprovider --failures-now --timeout 420"
TEACHER = "/tmp/smollm2/teacher"  # the real SmolLM2, imported from the staged GGUF
SPEC_TESTS = "tests/spec_decode/test_vllm_spec_decode.py"
# The tiny-target speculative cases: n-gram and draft proposer under forced preemption,
# steps without drafts, a recompute tail after preemption, and vLLM's batch-size schedule
# (no forced preemption); first, a speculative engine that never drafts (is the fault in the
# speculative machinery or in the drafts' rollback?).
SPEC_TINY = ("never_drafts or ngram_matches or draft_proposer or steps_without_drafts "
             "or recompute_tail or batch_size_schedule")
BENCH_8B = ("python3 benchmarks/serving_throughput.py --shape llama3-8b --dummy --graphs "
            "--models {models} --contexts 1024 8192 32768 --batches 1 16 64 256 --kv-bytes 42e9 "
            "--batched-tokens 16384 --max-new 320 --max-prefill-tokens 1048576 "
            f"--out {RESULTS}/serving_throughput_{{out}}.json")
# The whole distillation step, reference scan vs the fused kernel scan_impl picks first on
# CUDA (Mamba2: mamba-ssm's SSD, carried as .carry/mssm; Mamba1: the Triton walk). Mamba1's
# reference scan holds (batch, d, n, chunk, chunk) float32 temporaries: at SmolLM2's shape
# it ran out of the H100's 80 GB at 16 x 512 (2026-12-07), so its batches are 4 and 2.
DISTILL_SCAN_AB = {
    f"distill-scan-ab-{variant}-{name}": (
        f"PYTHONPATH=.carry/mssm:$PYTHONPATH python3 benchmarks/distill_throughput.py "
        f"--device cuda --dtype bfloat16 --workers 1 --variant {variant} {shape} --seq-len 512 "
        f"--batch-size {bs} --steps 8 --scan reference {kernel} "
        f"--out {RESULTS}/distill_scan_ab_{variant}_{name}.json")
    for variant, kernel, batches in (("mamba2", "mamba-ssm", (16, 8)), ("mamba1", "triton", (4, 2)))
    for (name, shape), bs in zip((("smollm2", ""), ("1b", "--shape 1b")), batches)}
JOBS = {
    "teacher": f"python3 -m vllm_mamba_hybrid.cli import-teacher {TEACHER}",
    "tests-engine": f"{PYTEST} tests/model_executor/test_vllm_engine.py",
    # The graph-mode half of tests-engine (what users run; ~100 s an engine start).
    "tests-engine-graphs": f"{PYTEST} tests/model_executor/test_vllm_engine.py -k graphs",
    # Where graph mode parts the chunked-prefill case from the reference (one engine a setting).
    "graphs-bisect": "python3 tools/vllm_graph_bisect.py --variants mamba1",
    "tests-spec": f"{PYTEST} tests/spec_decode/test_vllm_spec_decode.py",
    "tests-spec-tiny": f"{PYTEST} {SPEC_TESTS} -k '{SPEC_TINY}'",
    # The same cases one variant at a time (a Mamba2 engine takes ~3 min to start in graph
    # mode on the H100, a Mamba1 engine ~1 min): mamba1 answers first in a short loan.
    **{f"tests-spec-tiny-{variant}": f"{PYTEST} {SPEC_TESTS} -k '{variant} and ({SPEC_TINY})'"
       for variant in ("mamba1", "mamba2")},
    # Where speculative decoding parts from plain decoding on CUDA with several requests a
    # step (docs/lab/2026-12-07-vllm-cuda-8.md): vLLM's own Llama speculating (the control),
    # then the never-drafting and n-gram mamba1 cases in eager mode (no piecewise graphs) and
    # in graph mode on the mixers' PyTorch path (MAMBA_HYBRID_TORCH_OPS: none of vLLM's
    # SSU/conv-update kernels, nor its Mamba1 scan).
    "spec-bisect": " ; ".join(
        f"{env} {PYTEST} {SPEC_TESTS} -k '{cases}'" for env, cases in (
            ("", "llama_speculates"),
            ("MAMBA_HYBRID_TEST_MODE=eager", "mamba1 and (never_drafts or ngram_matches)"),
            ("MAMBA_HYBRID_TORCH_OPS=1", "mamba1 and (never_drafts or ngram_matches)"))),
    # One request at a time speculates right on the H100, eight at once do not (2026-12-07,
    # docs/lab/2026-12-07-vllm-cuda-8.md): the never-drafting and n-gram mamba1 cases with
    # at most 2, then 4 requests a step (the plain bar runs with the same limit).
    "spec-seqs-bisect": " ; ".join(
        f"MAMBA_HYBRID_TEST_ENGINE_KW='{{\"max_num_seqs\": {n}}}' {PYTEST} {SPEC_TESTS} "
        "-k 'mamba1 and (never_drafts or ngram_matches)'" for n in (2, 4)),
    # The mixers' calls into vLLM's CUDA SSU and conv-update kernels against the per-token
    # reference (seconds; on CPU: tools/interpret_vllm_kernels.py).
    "tests-ssm-ops": f"{PYTEST} -m gpu tests/model_executor/test_ssm_ops.py",
    "tests-server": f"{PYTEST} tests/integration/test_vllm_server.py tests/model_executor/test_vllm_checkpoints.py",
    "tests-gpu": f"{PYTEST} -m gpu tests/",
    # The distillation's `ray` backend on one GPU worker, killed and resumed (issue 38, item 4;
    # Ray is the staged `ray` archive, parts 03-05).
    "tests-ray-gpu": f"{PYTEST} -m gpu tests/distillation/test_distill_resume.py",
    # The fused Mamba2 training scan (fla-core, carried as .carry/fla: docs/gpu.md).
    "tests-fla": ("pip install -q --no-index --no-deps --target /tmp/fla_site .carry/fla/*.whl && "
                  f"PYTHONPATH=/tmp/fla_site:$PYTHONPATH {PYTEST} -m gpu tests/ops/test_fla_ssd.py "
                  "tests/modeling/test_model.py tests/ops/test_triton_scan.py"),
    # Mamba2's training scan: reference vs fla vs mamba-ssm's Triton SSD (carry .carry/mssm
    # and .carry/fla: docs/gpu.md); no vLLM needed, but kept out of an engine's start-up.
    # distill-scan-ab: the whole distillation step, old scan vs the fused one (issue 38, item 2),
    # one job a variant and shape (distill-scan-ab-mamba1-1b, ...) and all four in one.
    **DISTILL_SCAN_AB,
    "distill-scan-ab": " ; ".join(DISTILL_SCAN_AB.values()),
    # The same at SmolLM2's shape with compiled decoder layers (training.compile, the quality
    # study's setting; the fused scans are graph breaks): eager reference vs compiled kernels
    # is the "old vs new step".
    "distill-compile-ab": " ; ".join(
        f"PYTHONPATH=.carry/mssm:$PYTHONPATH python3 benchmarks/distill_throughput.py "
        f"--device cuda --dtype bfloat16 --workers 1 --variant {variant} --seq-len 512 "
        f"--batch-size 16 --steps 8 --warmup 2 --compile --scan reference {kernel} "
        f"--out {RESULTS}/distill_compile_ab_{variant}_smollm2.json"
        for variant, kernel in (("mamba2", "mamba-ssm"), ("mamba1", "triton"))),
    # The fused kernels alone at the 1B shape, at batches the reference scan cannot hold: the
    # MFU goal (35%) once the step is no longer launch-bound (7.5% at 2 x 512, Mamba1).
    "distill-1b-mfu": " ; ".join(
        f"PYTHONPATH=.carry/mssm:$PYTHONPATH python3 benchmarks/distill_throughput.py "
        f"--device cuda --dtype bfloat16 --workers 1 --variant {variant} --shape 1b --seq-len 512 "
        f"--batch-size {bs} --steps 8 --scan {kernel} "
        f"--out {RESULTS}/distill_1b_mfu_{variant}_{bs}x512.json"
        for variant, kernel in (("mamba1", "triton"), ("mamba2", "mamba-ssm")) for bs in (8, 16)),
    "ssd-scan": ("pip install -q --no-index --no-deps --target /tmp/fla_site .carry/fla/*.whl && "
                 "PYTHONPATH=/tmp/fla_site:$PYTHONPATH python3 benchmarks/ssd_training_scan.py "
                 f"--mamba-ssm-src .carry/mssm --out {RESULTS}/ssd_training_scan_cuda.json"),
    "agreement": (f"python3 benchmarks/vllm_agreement.py --teacher {TEACHER} "
                  f"--out {RESULTS}/vllm_agreement_cuda.json"),
    "bench-8b": BENCH_8B.format(models="teacher mamba2-50% mamba1-50% mamba2-25% mamba1-25%",
                                out="llama3_8b_cuda"),
    # The 25% hybrids beside the teacher, for a session short of time for all five, with
    # mamba1 50% again (the 2026-12-06 ratios, remeasured in the same run) and a decode
    # profile of every model where the 50% goal was missed (8k, batch 64).
    "bench-8b-25": BENCH_8B.format(models="teacher mamba1-50% mamba2-25% mamba1-25%",
                                   out="llama3_8b_25_cuda") + " --profile 8192:64",
    # The two 25% hybrids beside the teacher alone, for a loan too short for bench-8b-25.
    "bench-8b-25-lean": BENCH_8B.format(models="teacher mamba2-25% mamba1-25%",
                                        out="llama3_8b_25_lean_cuda"),
    "bench-smollm2": (f"python3 benchmarks/serving_throughput.py --teacher {TEACHER} "
                      "--graphs --contexts 1024 8192 32768 --batches 1 16 64 256 --kv-bytes 42e9 "
                      "--batched-tokens 16384 --max-new 320 --max-prefill-tokens 1048576 "
                      f"--out {RESULTS}/serving_throughput_smollm2_cuda.json"),
}


def _env() -> dict[str, str]:
    env = staged_env()
    # TRITON_CACHE_AUTOTUNING: every engine is a new process, and vLLM's float32 SSD kernels
    # spent ~100 s autotuning in each Mamba2 engine (2026-12-07); keep the choices on disk.
    env.update(PYTHONUNBUFFERED="1", MAMBA_HYBRID_SHARED=str(REPO / ".carry" / "shared"),
               TRITON_CACHE_AUTOTUNING="1")
    return env


def start(names: list[str]) -> None:
    """Run the jobs one after another in a detached chain that waits for any chain started
    earlier: vLLM engines sharing a GPU fail their start-up memory check when another
    process frees memory meanwhile."""
    JOBS_DIR.mkdir(exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    steps = []
    for name in names:
        log, rc = JOBS_DIR / f"{name}.log", JOBS_DIR / f"{name}.rc"
        rc.unlink(missing_ok=True)
        log.write_text("queued\n")
        steps.append(f"{{ {JOBS[name]}; }} > {log} 2>&1; echo $? > {rc}")
    chain = f"exec 9>{JOBS_DIR}/chain.lock; flock 9\n" + "\n".join(steps)  # after earlier chains
    # The device call runs us in the background, where SIGINT comes in ignored: give the
    # jobs the default back, so `kill -INT` stops pytest with its failure reports.
    proc = subprocess.Popen(["bash", "-c", chain], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with open(CHAINS, "a") as f:   # the chain leads its own process group: `stop` ends it
        f.write(f"{proc.pid}\n")
    print("started, in order: " + ", ".join(names), flush=True)


def stop(grace_s: float = 20) -> None:
    """End every chain with its jobs and their vLLM engines (each chain is one process
    group): SIGINT first, so pytest still writes its failure reports, SIGKILL after
    ``grace_s``. Jobs left without an exit code are marked "stopped". (A device call's
    `pkill -f NAME` matches the call's own shell, whose command line holds NAME.)"""
    groups = [int(pid) for pid in CHAINS.read_text().split()] if CHAINS.exists() else []

    def alive() -> list[int]:
        left = []
        for pgid in groups:
            try:
                os.waitpid(pgid, os.WNOHANG)   # reap the chain where it is our child
            except ChildProcessError:
                pass
            try:
                os.killpg(pgid, 0)
                left.append(pgid)
            except ProcessLookupError:
                pass
        return left

    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5)):
        for pgid in alive():
            os.killpg(pgid, sig)
        deadline = time.time() + wait_s
        while alive() and time.time() < deadline:
            time.sleep(0.5)
    for name, rc in _status().items():
        if rc is None:
            (JOBS_DIR / f"{name}.rc").write_text("stopped\n")
    CHAINS.unlink(missing_ok=True)
    print(f"stopped {len(groups)} chain(s); still alive: {alive() or 'none'}", flush=True)


def _status() -> dict[str, str | None]:
    return {log.stem: ((JOBS_DIR / f"{log.stem}.rc").read_text().strip()
                       if (JOBS_DIR / f"{log.stem}.rc").exists() else None)
            for log in sorted(JOBS_DIR.glob("*.log"))}


# What a reader needs from a long pytest / vLLM log: each case's verdict, the assertion
# lines and the durations, besides its tail.
_VERDICT = re.compile(r"(::\S+ (PASSED|FAILED|ERROR|SKIPPED))|^(FAILED|ERROR) |^E  |^!!!|"
                      r"^\d+\.\d+s (call|setup|teardown) |took|takes")


def wait(max_s: float, names: list[str]) -> None:
    deadline = time.time() + max_s
    while time.time() < deadline and any(
            rc is None for name, rc in _status().items() if not names or name in names):
        time.sleep(5)
    for name, rc in _status().items():
        lines = (JOBS_DIR / f"{name}.log").read_text(errors="replace").splitlines()
        found = [line[:300] for line in lines[:-6] if _VERDICT.search(line)][-40:]
        print(f"== {name}: {'running' if rc is None else 'rc ' + rc}\n"
              + "\n".join(found + ["--"] + [line[:300] for line in lines[-6:]]))


def collect() -> None:
    """Logs and JSON results as one archive: the device returns at most 8 files."""
    with tarfile.open(Path(os.environ["OUT"]) / "jobs.tar.gz", "w:gz") as tar:
        for path in [*JOBS_DIR.glob("*.log"), *RESULTS.glob("*.json")]:
            tar.add(path, arcname=path.relative_to(JOBS_DIR))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start")
    s.add_argument("names", nargs="+", choices=sorted(JOBS))
    w = sub.add_parser("wait")
    w.add_argument("names", nargs="*", help="jobs to wait for (default: all)")
    w.add_argument("--max-s", type=float, default=480)
    sub.add_parser("collect")
    sub.add_parser("stop")
    args = p.parse_args(argv)
    if args.cmd == "start":
        start(args.names)
    elif args.cmd == "wait":
        wait(args.max_s, args.names)
    elif args.cmd == "stop":
        stop()
    else:
        collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
