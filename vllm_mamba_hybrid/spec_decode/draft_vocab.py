"""A draft's output head cut to the tokens the target commonly produces.

A draft cut from a small teacher is mostly its head: SmolLM2's tied embedding is
28 M of a 2-layer draft's 35 M parameters, and on a 2-core CPU its 49,152-row head
is ~3/4 of a draft step (benchmarks/draft_vocab.py). Proposing only from the most frequent tokens of the
target's typical text makes each step several times cheaper (the idea of FR-Spec
and of EAGLE-3's reduced draft vocabulary). It cannot change what is generated: the
target verifies every draft. It cannot lower acceptance by more than the share of
target tokens outside the kept set either: wherever the full head's argmax is kept,
the cut head's argmax is the same token.

The kept ids live beside the draft's weights in ``draft_vocab.json``, so any draft
(layer subset, distilled export, hybrid) can carry one; `HybridDraftProposer` (vLLM)
and ``mamba-hybrid generate --draft`` (the static-cache runtime) use it when present.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

DRAFT_VOCAB_FILE = "draft_vocab.json"
TEXT_SUFFIXES = (".txt", ".md")


def iter_texts(paths: Iterable[str | os.PathLike], field: str | None = None) -> Iterator[str]:
    """Texts of ``.txt``/``.md`` files (whole), ``.jsonl`` files (``field`` of each record,
    or all its string values) and directories of such files (sorted)."""
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES + (".jsonl",))
            if not files:
                raise FileNotFoundError(f"{path}: no .txt, .md or .jsonl files")
            yield from iter_texts(files, field)
        elif not path.is_file():
            raise FileNotFoundError(f"{path}: no such file or directory")
        elif path.suffix == ".jsonl":
            yield from _jsonl_texts(path, field)
        elif path.suffix in TEXT_SUFFIXES:
            yield path.read_text(encoding="utf-8")
        else:
            raise ValueError(f"{path}: expected .txt, .md, .jsonl or a directory of them")


def _jsonl_texts(path: Path, field: str | None) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {n}: not a JSON object")
            if field is None:
                yield from (v for v in record.values() if isinstance(v, str))
            elif not isinstance(record.get(field), str):
                raise ValueError(f"{path}, line {n}: no string field {field!r}")
            else:
                yield record[field]


def rank_tokens(tokenizer, texts: Iterable[str], size: int, always: Iterable[int] = ()) -> tuple[list[int], int]:
    """The ``size`` most frequent token ids of ``texts`` (ties: lower id first), after the
    ids in ``always`` (special tokens: EOS must stay proposable); returns them sorted
    and the number of tokens counted."""
    vocab = len(tokenizer)
    if not 0 < size <= vocab:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab}], got {size}")
    counts = collections.Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not counts:
        raise ValueError("no tokens in the given texts")
    keep = list(dict.fromkeys(int(i) for i in always))[:size]
    chosen = set(keep)
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) == size:
            break
        if token not in chosen:
            keep.append(token)
            chosen.add(token)
    for token in range(vocab):          # fewer distinct tokens than ``size``: fill by id
        if len(keep) == size:
            break
        if token not in chosen:
            keep.append(token)
            chosen.add(token)
    return sorted(keep), sum(counts.values())


def save_draft_vocab(draft_dir: str | os.PathLike, token_ids: list[int], vocab_size: int,
                     sources: list[str], tokens_counted: int) -> Path:
    """Write ``draft_vocab.json`` into ``draft_dir`` (replaced atomically)."""
    path = Path(draft_dir) / DRAFT_VOCAB_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"token_ids": token_ids, "vocab_size": vocab_size,
                               "sources": sources, "tokens_counted": tokens_counted}) + "\n")
    os.replace(tmp, path)
    return path


def load_draft_vocab(draft_dir: str | os.PathLike, vocab_size: int) -> torch.Tensor | None:
    """The kept ids of ``draft_dir``'s ``draft_vocab.json`` (int64, sorted), or None where
    the draft has none; ``vocab_size``: rows of the draft's full head."""
    path = Path(draft_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        ids = data["token_ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected JSON with a 'token_ids' list ({e})") from None
    if data.get("vocab_size") != vocab_size:
        raise ValueError(f"{path} was made for a vocabulary of {data.get('vocab_size')} tokens, "
                         f"the draft's head has {vocab_size}")
    if (not ids or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids)
            or len(set(ids)) != len(ids)):
        raise ValueError(f"{path}: token_ids must be distinct ints in [0, {vocab_size})")
    return torch.tensor(sorted(ids), dtype=torch.long)


def cut_head(head: torch.nn.Linear, token_ids: torch.Tensor) -> torch.nn.Linear:
    """A head over ``token_ids`` only: its output i is the full head's output token_ids[i]
    (a copy of those rows; a tied input embedding keeps every row)."""
    cut = torch.nn.Linear(head.in_features, len(token_ids), bias=head.bias is not None,
                          device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        cut.weight.copy_(head.weight[token_ids.to(head.weight.device)])
        if head.bias is not None:
            cut.bias.copy_(head.bias[token_ids.to(head.bias.device)])
    return cut.requires_grad_(False)


def make_draft_vocab(draft_dir: str | os.PathLike, size: int, texts: list[str],
                     field: str | None = None) -> Path:
    """Rank the tokens of ``texts`` (paths, see `iter_texts`) with ``draft_dir``'s
    tokenizer and write its ``draft_vocab.json``: the ``size`` most frequent, special
    tokens and EOS always among them."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    import vllm_mamba_hybrid.modeling  # noqa: F401  (registers the hybrid config with transformers)
    draft_dir = Path(draft_dir)
    if not (draft_dir / "config.json").is_file():
        raise FileNotFoundError(f"{draft_dir}: not a model directory (no config.json)")
    vocab_size = AutoConfig.from_pretrained(draft_dir).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(draft_dir)
    always = list(tokenizer.all_special_ids)
    if (draft_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(draft_dir).eos_token_id
        always += [eos] if isinstance(eos, int) else list(eos or [])
    if not 0 < size <= vocab_size:
        raise ValueError(f"--size must be in [1, {vocab_size}] (the draft's vocabulary), got {size}")
    ids, counted = rank_tokens(tokenizer, iter_texts(texts, field), min(size, len(tokenizer)),
                               always)
    return save_draft_vocab(draft_dir, ids, vocab_size, [str(t) for t in texts], counted)
