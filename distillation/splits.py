"""The fixed train / held-out splits shared by training and evaluation.

Prompts: every n-th row (index % n == n - 1) is held out, so the held-out set
spans all sources of an ordered file (AlpacaEval is sorted by source). Essays:
the last ``k`` files in name order are held out for perplexity.
"""
from __future__ import annotations

from pathlib import Path


def is_heldout(index: int, every: int) -> bool:
    return index % every == every - 1


def train_indices(n: int, every: int) -> list[int]:
    return [i for i in range(n) if not is_heldout(i, every)]


def heldout_indices(n: int, every: int) -> list[int]:
    return [i for i in range(n) if is_heldout(i, every)]


def heldout_essays(data_dir: Path, k: int) -> list[Path]:
    files = sorted((data_dir / "essays").glob("*.txt"))
    if len(files) < k:
        raise FileNotFoundError(f"{data_dir / 'essays'} has {len(files)} essays, need at least {k}")
    return files[-k:]
