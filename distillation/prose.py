"""Plain text as distillation data: KL to the teacher on every token of real prose.

Answers to chat prompts teach the student the teacher's chat behaviour; prose
(``data.text_dir``) teaches it the teacher's distribution on ordinary text, which
is what held-out perplexity measures. Files are cut into consecutive windows of
``max_length`` tokens; the essays held out for evaluation are never used.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError


def text_files(text_dir: Path, exclude: list[Path]) -> list[Path]:
    """The .txt files of ``text_dir`` (sorted), minus ``exclude`` (compared resolved)."""
    if not text_dir.is_dir():
        raise ConfigError(f"`data.text_dir`: {text_dir} is not a directory")
    skip = {p.resolve() for p in exclude}
    files = [p for p in sorted(text_dir.glob("*.txt")) if p.resolve() not in skip]
    if not files:
        raise ConfigError(f"`data.text_dir`: {text_dir} has no .txt files outside the "
                          f"held-out evaluation essays")
    return files


def prose_examples(tokenizer, files: list[Path], max_length: int) -> list[dict]:
    """One example per window: empty prompt, every token learned (see tokens.collate_lm)."""
    examples = []
    for path in files:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, max_length):
            window = ids[start:start + max_length]
            if len(window) >= 2:
                examples.append({"prompt_ids": [], "answer_ids": window})
    return examples


def prose_prefixes(windows: list[dict], tokens: int, stride: int = 0) -> list[list[int]]:
    """Prompts for the teacher to continue: ``tokens`` tokens of each window, taken at
    its start (``stride`` 0) or every ``stride`` tokens along it, each leaving at least
    one token of the window after it (pseudo_labels.prose_prefix_tokens / _stride)."""
    out = []
    for w in windows:
        ids = w["answer_ids"]
        out += [ids[o:o + tokens] for o in range(0, len(ids) - tokens, stride or len(ids))]
    return out
