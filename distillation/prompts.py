"""Instruction prompts for pseudo-labels and evaluation, split train / held-out."""
from __future__ import annotations

from .config import DataConfig
from .paths import resolve_data_dir
from .sources import load_table
from .splits import is_heldout


def prompt_source(data: DataConfig) -> str:
    if data.prompts:
        return data.prompts
    return str(resolve_data_dir(data.data_dir) / "alpaca_eval_prompts.jsonl")


def load_prompts(data: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train, heldout) lists of ``{"index", "instruction"}``; disjoint by construction."""
    source = prompt_source(data)
    table = load_table(source, split=data.split, columns=[data.prompt_column],
                       what="data.prompts")
    train, heldout = [], []
    for i, text in enumerate(table[data.prompt_column]):
        if not isinstance(text, str) or not text.strip():
            continue
        (heldout if is_heldout(i, data.heldout_every) else train).append(
            {"index": i, "instruction": text})
    if data.max_prompts is not None:
        train = train[: data.max_prompts]
    if not train:
        raise ValueError(f"data.prompts: {source} yields no training prompts")
    return train, heldout
