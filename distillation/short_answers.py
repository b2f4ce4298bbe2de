"""Short-answer prompts: questions answered by one word or one number, so that two
models' free answers can be compared as strings (answer-level agreement).

The held-out AlpacaEval prompts are open-ended: two good answers rarely share a
sentence, so string agreement on them says little. These prompts are built
deterministically, never hard-coded, from two sources the student never trained on:

* cloze: a sentence of a held-out essay (``splits.heldout_essays``) without its last
  word, "fill in the blank with one word" -- the teacher's choice among plausible words
  is what the student should reproduce;
* arithmetic: two-digit sums and differences drawn from a seeded generator -- one
  right answer, which also shows whether the teacher itself is right.

Each prompt keeps its ``reference`` (the essay's word, the true result) so the table
can also say how often a model is right, which tells a wrong-but-agreeing student
from a right one. Small models rarely reply with the bare answer ("59 + 63 = 122.",
"But the pool of writers is very, very talented."): ``extract_answer`` takes the
answer out of those two forms, and compares the whole first line otherwise.
"""
from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path

# A clean sentence: capitalised, words of letters (commas, hyphens, apostrophes inside),
# a final full stop. Numbers, quotes, abbreviations and brackets are left out: their
# "last word" would be ambiguous once punctuation is stripped.
_SENTENCE = re.compile(r"[A-Z][A-Za-z,'\- ]+ [A-Za-z]{3,}\.")
_SPLIT = re.compile(r"(?<=[.!?])(?:\s+|(?=[A-Z]))")  # the essays often lack the space
MIN_WORDS, MAX_WORDS = 8, 30


def cloze_sentences(essays: list[Path]) -> list[str]:
    """The clean sentences of ``essays``, in file order."""
    out = []
    for path in essays:
        text = " ".join(path.read_text(encoding="utf-8").split())
        out += [s for s in _SPLIT.split(text)
                if _SENTENCE.fullmatch(s) and MIN_WORDS <= len(s.split()) <= MAX_WORDS]
    return out


def short_answer_prompts(essays: list[Path], n: int, seed: int = 0) -> list[dict]:
    """``n`` prompts ``{"kind", "instruction", "reference"}``, cloze and arithmetic
    alternating; cloze sentences evenly spaced over the essays. Same inputs, same prompts."""
    sentences = cloze_sentences(essays)
    n_cloze = (n + 1) // 2
    if len(sentences) < n_cloze:
        raise ValueError(f"{n} short-answer prompts need {n_cloze} clean sentences from the "
                         f"held-out essays, which have {len(sentences)}")
    cloze = []
    for i in range(n_cloze):
        words = sentences[i * len(sentences) // n_cloze].split()
        cloze.append({"kind": "cloze", "reference": words[-1].rstrip("."),
                      "context": " ".join(words[:-1]),
                      "instruction": "Fill in the blank with one word. Reply with that word "
                                     f"only.\n\n{' '.join(words[:-1])} ____."})
    rng = random.Random(seed)
    arithmetic = []
    for _ in range(n - n_cloze):
        a, b, op = rng.randrange(10, 100), rng.randrange(10, 100), rng.choice("+-")
        arithmetic.append({"kind": "arithmetic", "reference": str(a + b if op == "+" else a - b),
                           "instruction": f"What is {a} {op} {b}? Reply with the number only."})
    return [p for pair in zip(cloze, arithmetic + [None]) for p in pair if p is not None]


def normalize_answer(text: str) -> str:
    """The first non-empty line, lowercased, punctuation dropped (a minus sign before a
    digit kept), whitespace collapsed: "Paris." and "paris" are the same answer."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    chars = [c if not unicodedata.category(c).startswith("P")
             or (c == "-" and nxt.isdigit()) else " "
             for c, nxt in zip(line.lower(), line[1:].lower() + " ")]
    return " ".join("".join(chars).split())


_INTEGER = re.compile(r"-?\d+")


def extract_answer(prompt: dict, text: str) -> str:
    """The answer in a reply to ``prompt``, normalised: arithmetic, the last integer of the
    first line ("59 + 63 = 122." -> "122"); cloze, the word after the sentence when the
    reply repeats it, else a one-word reply. Otherwise the whole normalised first line,
    so that only identical replies agree."""
    line = normalize_answer(text)
    if prompt["kind"] == "arithmetic":
        numbers = _INTEGER.findall(line)
        return numbers[-1] if numbers else line
    context = normalize_answer(prompt["context"])
    if line.startswith(context + " "):
        return line[len(context) + 1:].split()[0]
    return line


def is_correct(prompt: dict, text: str) -> bool:
    return extract_answer(prompt, text) == normalize_answer(prompt["reference"])
