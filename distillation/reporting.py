"""Per-stage feedback: a metrics JSON summary and PNG plots of loss and KL."""
from __future__ import annotations

import json
from pathlib import Path

from .trainer import PROGRESS


def read_progress(stage_dir: Path) -> list[dict]:
    path = stage_dir / PROGRESS
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln]


def summarize(stage_dir: Path, extra: dict) -> dict:
    """Write ``metrics.json`` (first/last values, tokens, throughput) and ``curves.png``."""
    recs = read_progress(stage_dir)
    summary = dict(extra)
    if recs:
        first, last = recs[0], recs[-1]
        keys = [k for k in ("loss", "kl", "ce", "reward_margin", "reward_accuracy") if k in last]
        summary.update({
            "steps": last["step"],
            "tokens_seen": last["tokens_seen"],
            "first": {k: first[k] for k in keys},
            "last": {k: last[k] for k in keys},
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in recs) / len(recs),
            "mean_tokens_per_s_per_worker":
                sum(r["tokens_per_s_per_worker"] for r in recs) / len(recs),
            "step_time_total_s": sum(r["step_time_s"] for r in recs),
        })
        summary["plot"] = str(plot(recs, stage_dir / "curves.png", stage_dir.name))
    (stage_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot(recs: list[dict], out: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in recs]
    panels = [k for k in ("loss", "kl", "ce", "reward_margin") if k in recs[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(steps, [r[key] for r in recs], marker="." if len(recs) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
