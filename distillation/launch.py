"""Run a TrainJob on the configured backend, with a progress bar on the driver.

* ``local``: the loop in this process (one worker).
* ``torchrun``: ``torch.distributed.run`` in a subprocess (GPU hosts without Ray); a
  failure stops the stage and rerunning the command resumes from the last checkpoint.
* ``ray``: a Ray Train ``TorchTrainer`` (gloo on CPU, NCCL on GPU) on a local or
  existing cluster; ``FailureConfig(max_failures)`` restarts a failed worker group,
  which resumes from the last checkpoint.

Workers append to ``<stage_dir>/progress.jsonl``; the driver tails it into tqdm.
``<stage_dir>/workers.json`` names the worker processes (host, pid) and the step they
resumed from.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

from .config import BackendConfig
from .job import TrainJob
from .paths import REPO_ROOT
from .trainer import PROGRESS, train_worker


class TrainingFailed(RuntimeError):
    """A stage's workers failed beyond the allowed restarts; checkpoints are kept."""


class _ProgressMonitor:
    """Tails progress.jsonl into a tqdm bar showing loss and tokens/s."""

    def __init__(self, job: TrainJob) -> None:
        self.path = Path(job.stage_dir) / PROGRESS
        self.total = job.steps
        self.stage = job.stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from tqdm import tqdm
        bar = tqdm(total=self.total, desc=self.stage, unit="step", dynamic_ncols=True)
        seen = 0
        while True:
            stopping = self._stop.wait(0.5)
            if self.path.exists():
                lines = [ln for ln in self.path.read_text().splitlines() if ln]
                if lines:
                    rec = json.loads(lines[-1])
                    if rec["step"] != seen:
                        bar.n = rec["step"]
                        post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{rec['tokens_per_s']:.0f}"}
                        if "kl" in rec:
                            post["kl"] = f"{rec['kl']:.4f}"
                        bar.set_postfix(post, refresh=False)
                        bar.refresh()
                        seen = rec["step"]
            if stopping:
                break
        bar.close()


def _ray_entry(job_dict: dict) -> None:
    train_worker(job_dict)


def _run_ray(job: TrainJob, backend: BackendConfig) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        # Worker output stays in Ray's session logs (/tmp/ray/session_latest/logs): the
        # driver shows the progress bar, and a failure's traceback comes back in the error.
        ray.init(address=backend.address, runtime_env={"env_vars": env},
                 include_dashboard=False, log_to_driver=False)
    use_gpu = job.device == "cuda"
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=backend.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": max(1, backend.threads_per_worker)}),
        run_config=RunConfig(
            name=Path(job.stage_dir).name,
            storage_path=str(Path(job.stage_dir) / "ray"),
            failure_config=FailureConfig(max_failures=backend.max_failures)),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in several types
        raise TrainingFailed(
            f"stage {job.stage} failed on Ray after {backend.max_failures} restart(s): {e}; "
            f"checkpoints in {Path(job.stage_dir) / 'checkpoints'} are kept and a rerun resumes") from e


def _run_torchrun(job: TrainJob, backend: BackendConfig) -> None:
    job_file = Path(job.stage_dir) / "job.json"
    job_file.write_text(json.dumps(job.to_dict(), indent=1))
    # No in-place restarts: on CPU/gloo a torchrun restart after a killed worker hung in
    # our tests. A failed stage stops instead; rerunning the command resumes it.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={backend.num_workers}", "--max-restarts=0",
           "-m", "distillation.trainer", str(job_file)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    if backend.threads_per_worker:
        env["OMP_NUM_THREADS"] = str(backend.threads_per_worker)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise TrainingFailed(f"stage {job.stage}: torchrun exited with {rc}; checkpoints in "
                             f"{Path(job.stage_dir) / 'checkpoints'} are kept and a rerun resumes")


def release_stage_memory() -> None:
    """Free what a stage trained in this process still holds. Its student, teacher and
    optimizer sit in reference cycles that only the cyclic collector frees, which may
    not run for a long time: in study run 12 a progressive student's second stage ran
    out of GPU memory with the first stage's ~2 GiB still allocated. The emptied CUDA
    cache goes back to the other processes sharing the GPU."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def run_job(job: TrainJob, backend: BackendConfig) -> None:
    """Train one stage to completion on ``backend`` (resuming from its checkpoints)."""
    Path(job.stage_dir).mkdir(parents=True, exist_ok=True)
    with _ProgressMonitor(job):
        if backend.kind == "local":
            try:
                train_worker(job.to_dict())
            except Exception as e:
                raise TrainingFailed(
                    f"stage {job.stage} failed: {e}; checkpoints in "
                    f"{Path(job.stage_dir) / 'checkpoints'} are kept and a rerun resumes") from e
            finally:
                release_stage_memory()
        elif backend.kind == "torchrun":
            _run_torchrun(job, backend)
        else:
            _run_ray(job, backend)
