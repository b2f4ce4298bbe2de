"""The distillation and DPO losses against direct, loop-by-loop computations."""
import math

import pytest
import torch

from distillation.losses import dpo_losses, kd_loss_sums, sequence_logps
from distillation.tokens import collate_lm, collate_pairs


def _batch():
    """Two sequences: row 0 = 3 prompt + 4 answer tokens; row 1 = 2 prompt + 2 answer + 3 pad."""
    torch.manual_seed(0)
    ex = [{"prompt_ids": [5, 6, 7], "answer_ids": [8, 9, 3, 2]},
          {"prompt_ids": [5, 4], "answer_ids": [1, 2]}]
    b = collate_lm(ex, pad_id=0, max_length=100)
    vocab = 11
    student = torch.randn(2, 7, vocab, dtype=torch.float64)
    teacher = torch.randn(2, 7, vocab, dtype=torch.float64) * 2
    return b, student, teacher


def test_collate_masks_prompt_and_padding():
    b, _, _ = _batch()
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert b["input_ids"][1].tolist() == [5, 4, 1, 2, 0, 0, 0]


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kd_loss_equals_direct_computation(direction):
    b, student, teacher = _batch()
    kl, ce, n = kd_loss_sums(student, teacher, b["input_ids"], b["loss_mask"], direction)

    want_kl, want_ce, count = 0.0, 0.0, 0
    for row in range(2):
        for t in range(6):
            if not b["loss_mask"][row, t + 1]:  # position t predicts token t+1
                continue
            p = torch.softmax(teacher[row, t], -1).tolist()
            q = torch.softmax(student[row, t], -1).tolist()
            if direction == "forward":
                want_kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            else:
                want_kl += sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
            want_ce -= math.log(q[int(b["input_ids"][row, t + 1])])
            count += 1
    assert n == count == 6  # every answer token, the first one predicted from the prompt's end
    assert kl.item() == pytest.approx(want_kl, rel=1e-6)
    assert ce.item() == pytest.approx(want_ce, rel=1e-6)
    # Per-token normalisation: the mean is over counted tokens, not positions or rows.
    assert (kl / n).item() == pytest.approx(want_kl / 6, rel=1e-6)


def test_kd_loss_ignores_prompt_and_padding_logits():
    b, student, teacher = _batch()
    base = kd_loss_sums(student, teacher, b["input_ids"], b["loss_mask"])
    s2, t2 = student.clone(), teacher.clone()
    # positions whose next token is prompt or padding: row 0 t=0,1 and t=6; row 1 t=0 and t>=3
    for row, t in [(0, 0), (0, 1), (0, 6), (1, 0), (1, 3), (1, 4), (1, 5), (1, 6)]:
        s2[row, t] += torch.randn(11, dtype=torch.float64) * 5
        t2[row, t] -= torch.randn(11, dtype=torch.float64) * 5
    again = kd_loss_sums(s2, t2, b["input_ids"], b["loss_mask"])
    assert again[0].item() == pytest.approx(base[0].item(), rel=1e-12)
    assert again[1].item() == pytest.approx(base[1].item(), rel=1e-12)
    # ... while an answer position does count
    s2[0, 3, 0] += 1.0
    assert kd_loss_sums(s2, t2, b["input_ids"], b["loss_mask"])[0].item() != pytest.approx(
        base[0].item(), rel=1e-9)


def test_kd_loss_zero_when_models_agree():
    b, student, _ = _batch()
    kl, _, _ = kd_loss_sums(student, student.clone(), b["input_ids"], b["loss_mask"])
    assert abs(kl.item()) < 1e-12


def test_dpo_loss_equals_direct_formula():
    torch.manual_seed(1)
    pairs = [{"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7, 2], "rejected_ids": [8, 2]},
             {"prompt_ids": [3], "chosen_ids": [9, 2], "rejected_ids": [6, 6, 6, 2]}]
    b = collate_pairs(pairs, pad_id=0, max_length=100)
    policy = torch.randn(4, b["input_ids"].shape[1], 10, dtype=torch.float64)
    ref = torch.randn(4, b["input_ids"].shape[1], 10, dtype=torch.float64)
    beta = 0.3

    def direct_logp(logits, row):
        seq = pairs[row % 2]
        answer = seq["chosen_ids"] if row < 2 else seq["rejected_ids"]
        ids = seq["prompt_ids"] + answer
        total = 0.0
        for t in range(len(seq["prompt_ids"]), len(ids)):  # answer tokens only
            total += torch.log_softmax(logits[row, t - 1], -1)[ids[t]].item()
        return total

    pol = sequence_logps(policy, b["input_ids"], b["loss_mask"])
    rf = sequence_logps(ref, b["input_ids"], b["loss_mask"])
    for row in range(4):
        assert pol[row].item() == pytest.approx(direct_logp(policy, row), rel=1e-9)
        assert rf[row].item() == pytest.approx(direct_logp(ref, row), rel=1e-9)

    losses, margins = dpo_losses(pol[:2], pol[2:], rf[:2], rf[2:], beta)
    for i in range(2):
        z = beta * ((direct_logp(policy, i) - direct_logp(ref, i))
                    - (direct_logp(policy, i + 2) - direct_logp(ref, i + 2)))
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-9)
        assert margins[i].item() == pytest.approx(z, rel=1e-9)
    # identical policy and reference: log(2) per pair, as at the start of DPO
    same, _ = dpo_losses(pol[:2], pol[2:], pol[:2], pol[2:], beta)
    assert torch.allclose(same, torch.full_like(same, math.log(2)))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_gradient_equals_autograd_of_the_formula(direction, dtype, monkeypatch):
    """The chunked loss (forward and recomputing backward) against autograd of the plain
    formula, on fresh random logits with more rows than one chunk and a ragged last chunk."""
    import distillation.losses as losses
    monkeypatch.setattr(losses, "KD_CHUNK_ROWS", 7)
    rows, length, vocab = 4, 13, 50
    student = (3 * torch.randn(rows, length, vocab)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(rows, length, vocab)).to(dtype)
    ids = torch.randint(vocab, (rows, length))
    mask = (torch.rand(rows, length) < 0.7).long()
    w_kl, w_ce = torch.rand(2).tolist()

    kl, ce, n = kd_loss_sums(student, teacher, ids, mask, direction)
    (w_kl * kl + w_ce * ce).backward()

    ref = student.detach().clone().requires_grad_()
    keep = mask[:, 1:].bool()
    s_logp = torch.log_softmax(ref[:, :-1][keep].double(), -1)
    t_logp = torch.log_softmax(teacher[:, :-1][keep].double(), -1)
    if direction == "forward":
        want_kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    else:
        want_kl = (s_logp.exp() * (s_logp - t_logp)).sum()
    want_ce = -s_logp.gather(-1, ids[:, 1:][keep][:, None]).sum()
    (w_kl * want_kl + w_ce * want_ce).backward()

    assert n == int(keep.sum()) > 14
    assert kl.item() == pytest.approx(want_kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(want_ce.item(), rel=1e-5)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(student.grad.double(), ref.grad.to(dtype).double(), **tol)
    assert student.grad[:, :-1][~keep].abs().max() == 0   # uncounted positions get nothing
