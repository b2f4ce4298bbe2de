"""The distillation and DPO losses against direct, loop-by-loop computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from distillation.config import DPO_LOSS_TYPES
from distillation.losses import dpo_loss_sums, kd_loss_sums, token_logps
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


def sequence_logps(logits, input_ids, loss_mask):
    """Per-row sum of log p(answer tokens): the DPO sequence log-likelihood (trl sums
    ``token_logps`` itself; this is the references' side)."""
    return (token_logps(logits, input_ids) * loss_mask[:, 1:]).sum(-1)


def test_token_logps_equal_direct_log_softmax():
    torch.manual_seed(1)
    pairs = [{"prompt_ids": [3, 4, 5], "chosen_ids": [6, 7, 2], "rejected_ids": [8, 2]},
             {"prompt_ids": [3], "chosen_ids": [9, 2], "rejected_ids": [6, 6, 6, 2]}]
    b = collate_pairs(pairs, pad_id=0, max_length=100)
    logits = torch.randn(4, b["input_ids"].shape[1], 10, dtype=torch.float64)
    tok = token_logps(logits, b["input_ids"])
    assert tok.shape == (4, b["input_ids"].shape[1] - 1)

    def direct_logp(row):
        seq = pairs[row % 2]
        ids = seq["prompt_ids"] + (seq["chosen_ids"] if row < 2 else seq["rejected_ids"])
        for t in range(1, len(ids)):
            assert tok[row, t - 1].item() == pytest.approx(
                torch.log_softmax(logits[row, t - 1], -1)[ids[t]].item(), rel=1e-12)
        return sum(torch.log_softmax(logits[row, t - 1], -1)[ids[t]].item()
                   for t in range(len(seq["prompt_ids"]), len(ids)))  # answer tokens only

    got = sequence_logps(logits, b["input_ids"], b["loss_mask"])
    for row in range(4):
        assert got[row].item() == pytest.approx(direct_logp(row), rel=1e-9)


# --- DPO: trl's loss (distillation.losses.dpo_loss_sums) against the formulas by hand ---

def dpo_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """The hand-written sigmoid DPO the trainer used before trl: per-pair
    -log sigma(beta * (chosen log-ratio - rejected log-ratio)) and the reward margins."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin), beta * margin.detach()


def _per_pair_reference(loss_type, c, r, nc, nr, beta, eps):
    """Each loss of DPO_LOSS_TYPES per pair, from its paper: c, r = chosen and rejected
    log-ratios log pi/pi_ref (sums over answer tokens); nc, nr = answer tokens."""
    z = c - r
    if loss_type == "sigmoid":          # DPO (Rafailov et al. 2023), eq. 7
        return dpo_reference(c, r, torch.zeros_like(c), torch.zeros_like(r), beta)[0]
    if loss_type == "hinge":            # SLiC (Zhao et al. 2023)
        return torch.relu(1 - beta * z)
    if loss_type == "ipo":              # IPO (Azar et al. 2023), eq. 17, per-token log-ratios
        return (c / nc - r / nr - 1 / (2 * beta)) ** 2
    if loss_type == "robust":           # rDPO (Chowdhury et al. 2024), eq. 5
        return (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)
    if loss_type == "exo_pair":         # EXO (Ji et al. 2024): KL([q, 1-q] || [1-eps, eps])
        q = torch.sigmoid(beta * z)
        return q * torch.log(q / (1 - eps)) + (1 - q) * torch.log((1 - q) / eps)
    if loss_type == "nca_pair":         # NCA (Chen et al. 2024)
        return (-F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c)
                - 0.5 * F.logsigmoid(-beta * r))
    if loss_type == "bco_pair":         # BCO on pairs (Jung et al. 2024), no reward shift
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":        # SPPO (Wu et al. 2024), P(chosen wins) = 1
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":         # APO (D'Oosterlinck et al. 2024), eq. 7
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":         # APO, eq. 8
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * z)
    if loss_type == "sigmoid_norm":     # DPO on per-token log-ratios
        return -F.logsigmoid(beta * (c / nc - r / nr))
    raise AssertionError(f"no reference for {loss_type}")


def test_every_configurable_loss_has_a_reference():
    for loss_type in DPO_LOSS_TYPES:
        one = torch.ones(1, dtype=torch.float64)
        _per_pair_reference(loss_type, one, -one, one, one, 0.1, 0.1)


def _fixed_pairs():
    """Two pairs of 5-token rows, answers at tokens 2..4 (chosen) and 2..3 (rejected, then
    padding), per-token log-probs written out (column t scores token t+1):
    pair 0: chosen log-ratio (-1-2) - (-1.5-2.5) = 1, rejected (-2-2) - (-1-2) = -1, so z = 2;
    pair 1: policy = reference, z = 0. Prompt and padding positions hold -100 (not counted)."""
    x = -100.0
    policy = torch.tensor([[x, -1.0, -2.0, 0.0],      # chosen 0: answer tokens at 2, 3, 4
                           [x, -0.5, -0.5, -1.0],     # chosen 1
                           [x, -2.0, -2.0, x],        # rejected 0: answer at 2, 3, pad at 4
                           [x, -3.0, -1.0, x]], dtype=torch.float64)
    ref = policy.clone()
    ref[0, 1:3] = torch.tensor([-1.5, -2.5])
    ref[2, 1:3] = torch.tensor([-1.0, -2.0])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1],
                              [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])
    attention = torch.tensor([[1] * 5, [1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    ids = torch.arange(20).reshape(4, 5) * attention
    return policy, ref, ids, attention, loss_mask


@pytest.mark.parametrize("loss_type,beta,want", [
    # beta z = log 3: sigma = 3/4, loss log(4/3); pair 1: log 2
    ("sigmoid", math.log(3) / 2, [math.log(4 / 3), math.log(2)]),
    # 1 - beta z = 1 - 0.5; pair 1: 1
    ("hinge", 0.25, [0.5, 1.0]),
    # per token: c/3 - r/2 = 1/3 + 1/2 = 5/6, minus 1/(2 beta) = 2: (5/6 - 2)^2 = 49/36; pair 1: 4
    ("ipo", 0.25, [49 / 36, 4.0]),
])
def test_trl_dpo_loss_hand_computed(loss_type, beta, want):
    policy, ref, ids, attention, loss_mask = _fixed_pairs()
    policy.requires_grad_()
    loss, stats = dpo_loss_sums(policy, ref, ids, attention, loss_mask, loss_type=loss_type,
                                beta=beta)
    assert loss.item() == pytest.approx(sum(want), rel=1e-12)
    assert stats["reward_chosen"] == pytest.approx(beta * 1, rel=1e-12)     # pair 0: beta * 1
    assert stats["reward_rejected"] == pytest.approx(beta * -1, rel=1e-12)  # pair 0: beta * -1
    assert stats["reward_margin"] == pytest.approx(2 * beta, rel=1e-12)
    assert stats["reward_accuracy"] == 1.0      # pair 0 only: a tie (pair 1) is no success
    loss.backward()
    # prompt and padding positions get no gradient; answer tokens of a pair the same one
    assert policy.grad[:, 0].abs().max() == 0 and policy.grad[2:, 3].abs().max() == 0
    if loss_type == "sigmoid":                  # d/dc -log sigma(beta z) = -beta (1 - sigma)
        assert policy.grad[0, 1].item() == pytest.approx(-beta / 4, rel=1e-12)
        assert policy.grad[2, 1].item() == pytest.approx(beta / 4, rel=1e-12)
        assert policy.grad[1, 1].item() == pytest.approx(-beta / 2, rel=1e-12)


def _random_pairs(n_pairs, vocab):
    pairs = [{"prompt_ids": torch.randint(1, vocab, (int(torch.randint(1, 5, ())),)).tolist(),
              "chosen_ids": torch.randint(1, vocab, (int(torch.randint(1, 7, ())),)).tolist(),
              "rejected_ids": torch.randint(1, vocab, (int(torch.randint(1, 7, ())),)).tolist()}
             for _ in range(n_pairs)]
    return collate_pairs(pairs, pad_id=0, max_length=100)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_trl_dpo_loss_equals_reference_on_random_inputs(loss_type):
    """Fresh random logits each run (float64): loss, reward statistics and the gradient
    w.r.t. the policy logits through trl against the formula above."""
    n_pairs, vocab = 5, 13
    b = _random_pairs(n_pairs, vocab)
    length = b["input_ids"].shape[1]
    policy = (2 * torch.randn(2 * n_pairs, length, vocab, dtype=torch.float64)).requires_grad_()
    ref = 2 * torch.randn(2 * n_pairs, length, vocab, dtype=torch.float64)
    beta = float(torch.empty(()).uniform_(0.05, 1.0))
    eps = float(torch.empty(()).uniform_(0.01, 0.4)) if loss_type in ("robust", "exo_pair") else 0.0

    loss, stats = dpo_loss_sums(token_logps(policy, b["input_ids"]),
                                token_logps(ref, b["input_ids"]), b["input_ids"],
                                b["attention_mask"], b["loss_mask"], loss_type=loss_type,
                                beta=beta, label_smoothing=eps)
    loss.backward()

    mine = policy.detach().clone().requires_grad_()
    pol = sequence_logps(mine, b["input_ids"], b["loss_mask"])
    rf = sequence_logps(ref, b["input_ids"], b["loss_mask"])
    n_tok = b["loss_mask"].sum(1).double()
    c, r = pol[:n_pairs] - rf[:n_pairs], pol[n_pairs:] - rf[n_pairs:]
    want = _per_pair_reference(loss_type, c, r, n_tok[:n_pairs], n_tok[n_pairs:], beta, eps)
    want.sum().backward()

    # exo_pair: trl takes log(eps) of a float32 tensor, so ~1e-7 relative there
    tol = dict(rel=1e-6) if loss_type == "exo_pair" else dict(rel=1e-10)
    assert loss.item() == pytest.approx(want.sum().item(), **tol)
    torch.testing.assert_close(policy.grad, mine.grad, rtol=tol["rel"], atol=tol["rel"] * 1e-2)
    _, margins = dpo_reference(pol[:n_pairs], pol[n_pairs:], rf[:n_pairs], rf[n_pairs:], beta)
    assert stats["reward_chosen"] == pytest.approx((beta * c).sum().item(), rel=1e-10, abs=1e-12)
    assert stats["reward_rejected"] == pytest.approx((beta * r).sum().item(), rel=1e-10, abs=1e-12)
    assert stats["reward_margin"] == pytest.approx(margins.sum().item(), rel=1e-10, abs=1e-12)
    assert stats["reward_accuracy"] == pytest.approx(float((margins > 0).sum()), abs=1e-9)


def test_trl_sigmoid_dpo_equals_the_earlier_formula():
    """Identical policy and reference: log 2 per pair, as at the start of DPO; and the
    earlier hand-written loss on random sequence log-probs."""
    b = _random_pairs(3, 11)
    logits = torch.randn(6, b["input_ids"].shape[1], 11, dtype=torch.float64)
    tok = token_logps(logits, b["input_ids"])
    loss, _ = dpo_loss_sums(tok, tok, b["input_ids"], b["attention_mask"], b["loss_mask"], beta=0.3)
    assert loss.item() == pytest.approx(3 * math.log(2), rel=1e-12)

    ref = torch.randn_like(logits)
    loss, _ = dpo_loss_sums(tok, token_logps(ref, b["input_ids"]), b["input_ids"],
                            b["attention_mask"], b["loss_mask"], beta=0.3)
    pol = sequence_logps(logits, b["input_ids"], b["loss_mask"])
    rf = sequence_logps(ref, b["input_ids"], b["loss_mask"])
    want, _ = dpo_reference(pol[:3], pol[3:], rf[:3], rf[3:], 0.3)
    assert loss.item() == pytest.approx(want.sum().item(), rel=1e-12)


def test_dpo_loss_refuses_batch_dependent_trl_losses():
    policy, ref, ids, attention, loss_mask = _fixed_pairs()
    with pytest.raises(ValueError, match="aot"):
        dpo_loss_sums(policy, ref, ids, attention, loss_mask, loss_type="aot")


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
