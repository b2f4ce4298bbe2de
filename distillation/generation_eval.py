"""Generation-based evaluation: what a model says when it answers on its own.

KL and greedy agreement (``evaluate.TeacherReference.compare``) score a model's next-token
predictions along the *teacher's* answers; they cannot see a student that drifts off
once it conditions on its own tokens. Here every model answers the held-out prompts
greedily (at most ``eval.max_new_tokens`` tokens) and its answers are scored:

* judge: the teacher's mean per-token log-likelihood of the model's answer given the
  prompt (EOS included when emitted), averaged over prompts. The teacher's own greedy
  answers give the ceiling; a higher score than the ceiling is possible (greedy is not
  the teacher's most likely answer, and repetition is likely text), hence
* degeneration: the share of repeated token n-grams within answers, and the share of
  answers that never stop (``max_new_tokens`` reached without EOS);
* short-answer agreement: on ``short_answers.short_answer_prompts``, the share of
  prompts where the answer in the model's reply (``short_answers.extract_answer``)
  equals the one in the teacher's (and, for context, the share that is right).
"""
from __future__ import annotations

import torch

from .generation import generate_answers
from .losses import token_logps
from .short_answers import extract_answer, is_correct
from .tokens import chat_prompt_ids, collate_lm


def never_stops(answer: list[int], eos_id: int) -> bool:
    """The answer ran to the token cap: generate_answers keeps the EOS it stops at."""
    return eos_id not in answer


def repeated_ngrams(tokens: list[int], n: int) -> tuple[int, int]:
    """(n-grams equal to an earlier n-gram of the same list, n-grams in the list)."""
    seen, repeats = set(), 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats, max(len(tokens) - n + 1, 0)


def repeated_ngram_rate(answers: list[list[int]], n: int, eos_id: int) -> float:
    """Repeated n-grams over all n-grams of all answers (EOS left out; 0 if none has n tokens)."""
    repeats = total = 0
    for a in answers:
        r, t = repeated_ngrams([x for x in a if x != eos_id], n)
        repeats, total = repeats + r, total + t
    return repeats / total if total else 0.0


@torch.no_grad()
def judge_logps(judge, prompt_ids: list[list[int]], answers: list[list[int]], pad_id: int,
                batch_size: int = 8) -> list[float]:
    """Per answer, the judge's mean log p(answer token | prompt, earlier answer tokens)."""
    out = []
    for i in range(0, len(answers), batch_size):
        examples = [{"prompt_ids": p, "answer_ids": a}
                    for p, a in zip(prompt_ids[i:i + batch_size], answers[i:i + batch_size])]
        b = {k: v.to(judge.device) for k, v in collate_lm(examples, pad_id, 10 ** 9).items()}
        logits = judge(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        mask = b["loss_mask"][:, 1:]
        sums = (token_logps(logits, b["input_ids"]) * mask).sum(-1)
        out += (sums / mask.sum(-1)).tolist()
    return out


class GenerationReference:
    """The teacher's side of the generation scores, computed once: its answers (the
    judge's ceiling) and its short answers (what agreement compares with)."""

    def __init__(self, teacher, tokenizer, prompt_ids: list[list[int]],
                 teacher_answers: list[list[int]], short_prompts: list[dict], cfg,
                 pad_id: int) -> None:
        self.teacher, self.tokenizer, self.cfg, self.pad_id = teacher, tokenizer, cfg, pad_id
        self.eos_id = tokenizer.eos_token_id
        self.prompt_ids = prompt_ids
        self.short_prompts = short_prompts
        self.short_ids = [chat_prompt_ids(tokenizer, p["instruction"]) for p in short_prompts]
        self.teacher_short = self._short_answers(teacher)
        logps = judge_logps(teacher, prompt_ids, teacher_answers, pad_id)
        self.ceiling = sum(logps) / len(logps)
        self.teacher_metrics = self.score(teacher_answers, self.teacher_short)

    def _short_answers(self, model) -> list[str]:
        ids = generate_answers(model, self.short_ids, eos_id=self.eos_id, pad_id=self.pad_id,
                               max_new_tokens=self.cfg.short_answer_max_new_tokens)
        return [self.tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]

    def evaluate(self, model) -> tuple[dict, list[list[int]]]:
        """The model's free greedy answers to the held-out prompts, and their scores."""
        answers = generate_answers(model, self.prompt_ids, eos_id=self.eos_id, pad_id=self.pad_id,
                                   max_new_tokens=self.cfg.max_new_tokens)
        return self.score(answers, self._short_answers(model)), answers

    def score(self, answers: list[list[int]], short: list[str]) -> dict:
        logps = judge_logps(self.teacher, self.prompt_ids, answers, self.pad_id)
        judge = sum(logps) / len(logps)
        metrics = {
            "judge_logp": judge,
            "judge_gap": self.ceiling - judge,      # nats per token below the ceiling
            # per-token NLL as a multiple of the ceiling's (none if the teacher is certain)
            "judge_ratio": judge / self.ceiling if self.ceiling else None,
            "repeated_ngram_rate": repeated_ngram_rate(answers, self.cfg.ngram, self.eos_id),
            "never_stops": sum(never_stops(a, self.eos_id) for a in answers) / len(answers),
            "mean_answer_tokens": sum(map(len, answers)) / len(answers),
            "short_answer_agreement": None, "short_answer_correct": None,
        }
        if short:
            metrics["short_answer_agreement"] = sum(
                extract_answer(p, s) == extract_answer(p, t)
                for p, s, t in zip(self.short_prompts, short, self.teacher_short)) / len(short)
            metrics["short_answer_correct"] = sum(
                is_correct(p, s) for p, s in zip(self.short_prompts, short)) / len(short)
            metrics["short_answers"] = short
        return metrics
