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
    return logits[:, :-1][keep], input_ids[:, 1:][keep]


# Rows of the vocabulary-wide float32 work done at once: the loss never holds more
# than a few (rows x vocab) float32 buffers, whatever the batch (49k vocab: 200 MB each).
KD_CHUNK_ROWS = 1024


def _row_terms(s_rows: torch.Tensor, t_rows: torch.Tensor, targets: torch.Tensor, direction: str,
               grads: bool):
    """Per-row KL and CE in float32, and (grads) their gradients w.r.t. the student logits."""
    s_logp = F.log_softmax(_f32(s_rows), dim=-1)
    t_logp = F.log_softmax(_f32(t_rows), dim=-1)
    if direction == "forward":      # d/ds sum p (log p - log q) = q - p
        p = t_logp.exp()
        kl = (p * (t_logp - s_logp)).sum(-1)
    else:                           # d/ds sum q (log q - log p) = q * (log q - log p - KL)
        diff = s_logp - t_logp
        kl = (s_logp.exp() * diff).sum(-1)
    ce = -s_logp.gather(-1, targets[:, None]).squeeze(-1)
    if not grads:
        return kl, ce
    q = s_logp.exp()
    d_kl = q - p if direction == "forward" else q * (diff - kl[:, None])
    d_ce = q.scatter_add(-1, targets[:, None], -torch.ones_like(ce[:, None]))
    return d_kl, d_ce


class _KDSums(torch.autograd.Function):
    """(KL sum, CE sum) over rows, computed KD_CHUNK_ROWS rows at a time; the backward
    recomputes each chunk instead of keeping log-softmaxes of every row (autograd of the
    plain formula holds ~6 float32 (rows x vocab) tensors: 1.2 GB each for 6k tokens)."""

    @staticmethod
    def forward(ctx, s_rows, t_rows, targets, direction):
        kl = torch.zeros((), dtype=torch.promote_types(s_rows.dtype, torch.float32),
                         device=s_rows.device)
        ce = torch.zeros_like(kl)
        for i in range(0, s_rows.shape[0], KD_CHUNK_ROWS):
            k, c = _row_terms(s_rows[i:i + KD_CHUNK_ROWS], t_rows[i:i + KD_CHUNK_ROWS],
                              targets[i:i + KD_CHUNK_ROWS], direction, grads=False)
            kl += k.sum()
            ce += c.sum()
        ctx.save_for_backward(s_rows, t_rows, targets)
        ctx.direction = direction
        return kl, ce

    @staticmethod
    def backward(ctx, g_kl, g_ce):
        s_rows, t_rows, targets = ctx.saved_tensors
        grad = torch.empty_like(s_rows)
        for i in range(0, s_rows.shape[0], KD_CHUNK_ROWS):
            d_kl, d_ce = _row_terms(s_rows[i:i + KD_CHUNK_ROWS], t_rows[i:i + KD_CHUNK_ROWS],
                                    targets[i:i + KD_CHUNK_ROWS], ctx.direction, grads=True)
            grad[i:i + KD_CHUNK_ROWS] = g_kl * d_kl + g_ce * d_ce
        return grad, None, None, None


def kd_loss_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 input_ids: torch.Tensor, loss_mask: torch.Tensor,
                 direction: str = "forward") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Word-level KL and student CE summed over answer tokens (float32 arithmetic).

    forward: KL(teacher || student) = sum_v p_t (log p_t - log p_s)  (mode covering,
    the paper's choice); reverse: KL(student || teacher) (mode seeking).
    Gradients flow to the student logits only. Returns (kl_sum, ce_sum, n_tokens).
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"kl direction must be 'forward' or 'reverse', got {direction!r}")
    s_rows, targets = _shifted(student_logits, input_ids, loss_mask)
    t_rows, _ = _shifted(teacher_logits.detach(), input_ids, loss_mask)
    kl, ce = _KDSums.apply(s_rows, t_rows, targets, direction)
    return kl, ce, int(targets.numel())


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
