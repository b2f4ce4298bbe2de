"""Which layers are attention at each stage of progressive replacement.

Each stage's Mamba layers contain the previous stage's and the final stage has
exactly the student's layout. A schedule of fractions keeps the paper's layout for
each fraction where those layouts nest (50% -> 25%: odd layers, then every fourth,
the paper's progressive 25% run starting from its 50% model); otherwise, and for
"stepwise" (the paper's stepwise runs replace 0, 2, 4, ... one per stage), layers
are replaced in increasing index order.
"""
from __future__ import annotations

from vllm_mamba_hybrid.config import check_attn_layers, paper_attention_layers

from .config import ConfigError


def check_layers(key: str, layers: list[int], num_layers: int) -> list[int]:
    """``check_attn_layers`` (the one check of a layer list) on config key ``key``;
    returns the layers sorted."""
    try:
        return check_attn_layers(layers, num_layers, name=f"`{key}`")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def final_attention_layers(num_layers: int, attn_layers: list[int] | None,
                           attn_fraction: float) -> list[int]:
    if attn_layers is not None:
        return check_layers("student.attn_layers", attn_layers, num_layers)
    return paper_attention_layers(num_layers, attn_fraction)


def progressive_layouts(num_layers: int, final_attn: list[int],
                        schedule: list[float] | str) -> list[list[int]]:
    """Attention layers of each progressive stage; the last equals ``final_attn``."""
    order = [i for i in range(num_layers) if i not in final_attn]
    if not order:
        raise ConfigError("the student keeps every layer as attention: nothing to replace")

    def by_index(counts):
        return [sorted(set(range(num_layers)) - set(order[:m])) for m in counts]

    if schedule == "stepwise":
        return by_index(range(1, len(order) + 1))
    # a fraction's Mamba layer count as the student's own layout would have it
    counts = [num_layers - len(paper_attention_layers(num_layers, f)) for f in schedule]
    if counts[-1] != len(order):
        raise ConfigError(
            f"`stages.progressive.schedule` ends at attention fraction {schedule[-1]} "
            f"({counts[-1]} Mamba layers) but the student has {len(order)} Mamba layers "
            f"of {num_layers}: end the schedule at the student's fraction")
    if counts[0] < 1 or any(b <= a for a, b in zip(counts, counts[1:])):
        raise ConfigError(
            f"`stages.progressive.schedule` {schedule} must replace at least one more layer "
            f"per stage (Mamba layer counts {counts} for {num_layers} layers)")
    paper = [sorted(set(paper_attention_layers(num_layers, f)) | set(final_attn))
             for f in schedule[:-1]] + [sorted(final_attn)]
    if all(num_layers - len(a) == m for a, m in zip(paper, counts)) and all(
            set(later) < set(earlier) for earlier, later in zip(paper, paper[1:])):
        return paper
    return by_index(counts)
