"""Where the shared data lives: a checkout has ``shared/`` beside the repository."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ENV = "MAMBA_HYBRID_SHARED"


def default_data_dir() -> Path:
    """``$MAMBA_HYBRID_SHARED/data``, else ``<repo>/../shared/data`` (the CI layout)."""
    shared = os.environ.get(SHARED_ENV)
    return (Path(shared) if shared else REPO_ROOT.parent / "shared") / "data"


def resolve_data_dir(configured: str | os.PathLike | None) -> Path:
    """The configured data dir or the default; the error says how to point at it."""
    path = Path(configured) if configured else default_data_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} not found: set `data.data_dir` in the config, --data-dir on "
            f"the command line, or ${SHARED_ENV} (the directory that holds data/)")
    return path
