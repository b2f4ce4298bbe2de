"""Distillation and preference losses as sums, so callers normalise globally.

Each function returns a *sum* over counted tokens (or pairs) together with the
count; the training loop divides by the count summed over all workers and
micro-batches, which makes the loss a true per-token (per-pair) mean of the
global batch, independent of how it is split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16 log-softmax over a large vocabulary loses too much."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _shifted(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Positions t whose next token t+1 is counted: (logits[t], token[t+1])."""
    keep = loss_mask[:, 1:].bool()
    return _f32(logits[:, :-1][keep]), input_ids[:, 1:][keep]


def kd_loss_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 input_ids: torch.Tensor, loss_mask: torch.Tensor,
                 direction: str = "forward") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Word-level KL and student CE summed over answer tokens.

    forward: KL(teacher || student) = sum_v p_t (log p_t - log p_s)  (mode covering,
    the paper's choice); reverse: KL(student || teacher) (mode seeking).
    Returns (kl_sum, ce_sum, n_tokens).
    """
    s_logits, targets = _shifted(student_logits, input_ids, loss_mask)
    t_logits, _ = _shifted(teacher_logits, input_ids, loss_mask)
    s_logp = F.log_softmax(s_logits, dim=-1)
    t_logp = F.log_softmax(t_logits, dim=-1)
    if direction == "forward":
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    elif direction == "reverse":
        kl = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    else:
        raise ValueError(f"kl direction must be 'forward' or 'reverse', got {direction!r}")
    ce = -s_logp.gather(-1, targets[:, None]).squeeze(-1)
    return kl.sum(), ce.sum(), int(targets.numel())


def greedy_agreement_count(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[int, int]:
    """How many counted positions have the same argmax token in both models."""
    s, _ = _shifted(student_logits, input_ids, loss_mask)
    t, _ = _shifted(teacher_logits, input_ids, loss_mask)
    return int((s.argmax(-1) == t.argmax(-1)).sum()), int(s.shape[0])


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(answer tokens) (the DPO sequence log-likelihood)."""
    logp = F.log_softmax(_f32(logits[:, :-1]), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (tok * loss_mask[:, 1:].to(tok.dtype)).sum(-1)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss -log sigma(beta * (chosen log-ratio - rejected log-ratio)).

    Same formula as trl's DPOTrainer with loss_type "sigmoid" (no label smoothing).
    Returns (losses, reward_margins) per pair.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin), beta * margin.detach()
