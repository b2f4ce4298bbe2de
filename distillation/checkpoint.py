"""Training checkpoints written write-then-rename.

A checkpoint is a directory ``step_NNNNNNN`` holding the model, optimizer and
scheduler states, the step (which fixes the data position, see
``trainer.batch_indices``) and every worker's RNG states. It is assembled in a
hidden ``.tmp-step_*`` directory and renamed into place only when complete, so a
crash mid-write leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

_STEP_RE = re.compile(r"^step_(\d{7})$")
META = "meta.json"


def _fsync_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    with open(path, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """The RNG streams training draws from, as tensors and tuples of ints (loadable with
    ``weights_only=True``). No numpy: nothing in training draws from it."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories are ignored)."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / META).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def save(root: Path, step: int, *, rank: int, world: int, barrier: Callable[[], None],
         model_state: dict | None, optim_state: dict | None, sched_state: dict | None,
         meta: dict[str, Any], keep: int) -> Path:
    """Collective save: every rank writes its RNG file, rank 0 the rest, then renames.

    ``model_state``/``optim_state`` are full state dicts on rank 0 (None elsewhere).
    """
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _fsync_write(tmp / f"rng_rank{rank}.pt", lambda f: torch.save(rng_state(), f))
    if rank == 0:
        _fsync_write(tmp / "model.pt", lambda f: torch.save(model_state, f))
        _fsync_write(tmp / "optimizer.pt", lambda f: torch.save(optim_state, f))
        _fsync_write(tmp / "scheduler.pt", lambda f: torch.save(sched_state, f))
    barrier()
    if rank == 0:
        meta = dict(meta, step=step, world_size=world)
        _fsync_write(tmp / META, lambda f: f.write(json.dumps(meta, indent=1)), mode="w")
        if final.exists():  # a re-run of the same step after a restart: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        _prune(root, keep)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if _STEP_RE.match(p.name))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, *, rank: int, world: int) -> dict[str, Any]:
    """Read a checkpoint for this rank; the world size must match (RNG streams are per rank)."""
    meta = json.loads((path / META).read_text())
    if meta["world_size"] != world:
        raise RuntimeError(
            f"checkpoint {path} was written by {meta['world_size']} workers, this run has {world}; "
            f"resume with backend.num_workers: {meta['world_size']} or delete {path.parent}")
    return {"meta": meta, "model": _load(path / "model.pt"),
            "optimizer": _load(path / "optimizer.pt"), "scheduler": _load(path / "scheduler.pt"),
            "rng": _load(path / f"rng_rank{rank}.pt")}


def _load(file: Path) -> Any:
    """One file of a checkpoint; ``weights_only``, so reading it cannot run code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise RuntimeError(f"checkpoint file {file} cannot be read with weights_only=True ({e}); "
                           f"delete {file.parent}: the stage then resumes from an earlier "
                           f"checkpoint if one is kept, else starts over") from None
