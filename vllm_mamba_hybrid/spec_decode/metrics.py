"""Acceptance statistics from vLLM's own spec-decode counters."""
from __future__ import annotations


def spec_decode_metrics(llm) -> dict[str, float]:
    """From ``LLM.get_metrics()`` (needs ``disable_log_stats=False``): drafts, draft
    and accepted tokens, acceptance rate (accepted / drafted tokens), mean accepted
    length (tokens emitted per verify step of a drafted request, bonus token
    included) and per-position acceptance counts."""
    counters = {m.name: m for m in llm.get_metrics()}

    def value(name: str) -> float:
        m = counters.get(name)
        return float(m.value) if m is not None else 0.0

    drafts = value("vllm:spec_decode_num_drafts")
    drafted = value("vllm:spec_decode_num_draft_tokens")
    accepted = value("vllm:spec_decode_num_accepted_tokens")
    per_pos = counters.get("vllm:spec_decode_num_accepted_tokens_per_pos")
    return {
        "num_drafts": drafts,
        "num_draft_tokens": drafted,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": 1.0 + accepted / drafts if drafts else 0.0,
        "accepted_per_position": list(per_pos.values) if per_pos is not None else [],
    }
