"""Distillation and preference losses as sums, so callers normalise globally.

Each function returns a *sum* over counted tokens (or pairs) together with the
count; the training loop divides by the count summed over all workers and
micro-batches, which makes the loss a true per-token (per-pair) mean of the
global batch, independent of how it is split.
"""
from __future__ import annotations

import collections
import types

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


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) at every position: (rows, length - 1), at least float32.

    Unmasked: what trl's fused LM head computes before it zeroes the positions whose
    label is -100 (``dpo_loss_sums`` leaves that masking to trl)."""
    logp = F.log_softmax(_f32(logits[:, :-1]), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


class _FusedHeadOutput:
    """What trl's fused LM head returns (``trl.trainer.utils.add_fused_lm_head``), built
    from log-probs we already have. trl's loss reads ``log_probs`` only; ``entropy``,
    ``mean_logits`` and ``is_top1`` feed trl's own logged metrics, which we drop, so
    they are zeros instead of three more vocabulary-wide passes."""

    def __init__(self, per_token: torch.Tensor, labels: torch.Tensor):
        # The fused head scores position t against label t+1 and gives 0 where it is -100.
        self.log_probs = per_token.masked_fill(labels[:, 1:] == -100, 0.0)
        zeros = torch.zeros_like(per_token).detach()
        self.entropy = self.mean_logits = zeros
        self.is_top1 = zeros.bool()


class _LogProbModel:
    """Stands in for the policy or the reference model in trl's loss: the forward was
    ours (DDP/FSDP, autocast, compiled layers), so it hands back its log-probs."""
    training = True                  # trl logs under "train" when the policy trains
    is_gradient_checkpointing = False

    def __init__(self, per_token: torch.Tensor):
        self.per_token = per_token

    def __call__(self, *, labels: torch.Tensor, fused_lm_head: bool = False, **_inputs):
        if not fused_lm_head:
            raise RuntimeError("trl asked for logits, not the fused head's log-probs: "
                               "dpo_loss_sums does not fit this trl version")
        return _FusedHeadOutput(self.per_token, labels)


class _OneProcess:
    """trl's ``accelerator`` for the loss of one micro-batch: no gathering (our loop
    sums the statistics over micro-batches and workers itself)."""

    def __init__(self, device: torch.device):
        self.device = device

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    gather_for_metrics = gather


def dpo_loss_sums(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor, *, loss_type: str = "sigmoid", beta: float = 0.1,
                  label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """trl's DPO loss (``trl.DPOTrainer``, trl 1.16) on our models' log-probs, as a sum over pairs.

    Rows are [chosen..., rejected...] (``tokens.collate_pairs``), as in trl's batches;
    ``*_token_logps`` are ``token_logps`` of the policy (with gradients) and of the
    frozen reference; ``loss_mask`` marks answer tokens (trl's ``completion_mask``).

    trl 1.16 has no free loss function: the formulas of every ``loss_type`` live in
    ``DPOTrainer._compute_loss(self, model, inputs)``, which runs the policy and the
    reference through trl's fused LM head and reads a dozen trainer attributes. Building
    a DPOTrainer would bring its own data pipeline, accelerator and checkpoints, while
    ours (Ray/torchrun workers, exact resume) must stay; so this calls that method as a
    plain function with a stand-in ``self`` holding what the method reads: the settings
    (``beta``, ``loss_types``, ``label_smoothing``, f-divergence "reverse_kl" = standard
    DPO, no length-desensitised ``ld_alpha``, no WPO weighting), a one-process
    accelerator, and stand-in models that return our log-probs in the fused head's form.
    trl then masks them with its labels, sums them per sequence, forms the log-ratios,
    the loss and its reward metrics. ``tests/distillation/test_distill_losses.py`` holds
    the formulas written out by hand and fails if a trl release changes any of this.

    Returns (sum of the per-pair losses, with gradients; statistics summed over pairs:
    ``reward_chosen``, ``reward_rejected``, ``reward_margin`` (beta * log-ratios, as trl
    logs them) and ``reward_accuracy`` (pairs whose chosen reward is the higher)).
    """
    from .config import DPO_LOSS_TYPES
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"DPO loss_type must be one of {list(DPO_LOSS_TYPES)}, got {loss_type!r}")
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs = policy_token_logps.shape[0] // 2
    metrics = {"train": collections.defaultdict(list)}   # trl's own metrics land here
    policy = _LogProbModel(policy_token_logps)
    stand_in = types.SimpleNamespace(
        model=policy, ref_model=_LogProbModel(ref_token_logps.detach()),
        accelerator=_OneProcess(policy_token_logps.device),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, ld_alpha=None,
        use_weighting=False, precompute_ref_logps=False, aux_loss_enabled=False,
        _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "completion_mask": loss_mask}
    try:
        mean_loss = DPOTrainer._compute_loss(stand_in, policy, inputs, return_outputs=False)
    except (AttributeError, KeyError) as e:
        import trl
        raise RuntimeError(f"trl {trl.__version__}: DPOTrainer._compute_loss needs {e!r}, which "
                           f"the stand-in trainer of distillation.losses.dpo_loss_sums (written "
                           f"for trl 1.16) lacks") from e
    m = metrics["train"]
    stats = {"reward_chosen": m["rewards/chosen"][-1] * pairs,
             "reward_rejected": m["rewards/rejected"][-1] * pairs,
             "reward_margin": m["rewards/margins"][-1] * pairs,
             # a count: trl's mean is float32 (0.4 * 5 = 2.00000003)
             "reward_accuracy": float(round(m["rewards/accuracies"][-1] * pairs))}
    return mean_loss * pairs, stats
