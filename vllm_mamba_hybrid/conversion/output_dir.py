"""Write a checkpoint directory atomically: build it beside the target, then rename.

A failure half-way leaves no half-written checkpoint behind, and an existing
directory is only replaced when the caller asked for it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output directory unless ``overwrite``, and one that could not be
    created; creates nothing (commands check before any work)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists (pass --overwrite to replace it)")
    existing = out.resolve().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: {existing} is not a writable directory")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces ``out_dir``."""
    out = check_output_dir(out_dir, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
