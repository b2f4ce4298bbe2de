"""Chat-formatted token sequences and their padded batches.

A training example is ``prompt_ids + answer_ids``; only answer tokens are
learned (the loss mask), so prompts and padding never count.
"""
from __future__ import annotations

import pickle

import torch


PACKED = "token-lists/1"


def save_examples(examples: list[dict], path) -> None:
    """Examples (dicts of token id lists, the same keys in each) as one flat tensor per
    key plus lengths: loads with ``weights_only=True`` as fast as a tensor does (a pickled
    list of 27M Python ints takes ~5x longer)."""
    keys = sorted(examples[0]) if examples else []
    if any(sorted(e) != keys for e in examples):
        raise ValueError(f"{path}: every example needs the same fields {keys}")
    packed = {"format": PACKED, "fields": keys, "count": len(examples)}
    for k in keys:
        packed[k] = torch.tensor([t for e in examples for t in e[k]], dtype=torch.int64)
        packed[k + ".lengths"] = torch.tensor([len(e[k]) for e in examples], dtype=torch.int64)
    torch.save(packed, path)


def load_examples(path) -> list[dict]:
    """The examples :func:`save_examples` wrote (or a plain list of such dicts), loaded with
    ``weights_only=True``: reading them cannot run code. The pipeline's are caches,
    rebuilt when deleted."""
    try:
        data = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise RuntimeError(f"{path}: not an examples file readable with weights_only=True "
                           f"({e}); if the pipeline wrote it, delete it to have it rebuilt") from None
    if isinstance(data, dict) and data.get("format") == PACKED:
        try:
            columns = {k: [t.tolist() for t in data[k].split(data[k + ".lengths"].tolist())]
                       for k in data["fields"]}
            return [{k: columns[k][i] for k in data["fields"]} for i in range(data["count"])]
        except (KeyError, IndexError, RuntimeError) as e:
            raise RuntimeError(f"{path}: a damaged examples file ({type(e).__name__}: {e}); "
                               f"if the pipeline wrote it, delete it to have it rebuilt") from None
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise RuntimeError(f"{path}: expected examples (save_examples' format or a list of "
                           f"dicts of token id lists), got {type(data).__name__}")
    return data


def chat_prompt_ids(tokenizer, instruction: str) -> list[int]:
    """Token ids of a one-turn user chat, ending with the assistant header."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Answer text as the model would emit it after the header, closed by EOS."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_lm(examples: list[dict], pad_id: int, max_length: int,
               pad_multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``loss_mask`` = 1 on answer tokens. The longest row sets
    the width, rounded up to a multiple of ``pad_multiple`` (at most ``max_length``): a
    compiled model then sees a few static shapes, or one with ``pad_multiple=max_length``.

    ``examples``: dicts with ``prompt_ids`` and ``answer_ids`` (lists of ints).
    Right padding keeps every real token's causal context identical to the
    unpadded sequence, for attention and Mamba layers alike.
    """
    seqs, masks = [], []
    for ex in examples:
        ids = (list(ex["prompt_ids"]) + list(ex["answer_ids"]))[:max_length]
        mask = ([0] * len(ex["prompt_ids"]) + [1] * len(ex["answer_ids"]))[:max_length]
        seqs.append(ids)
        masks.append(mask)
    width = padded_width(max(len(s) for s in seqs), max_length, pad_multiple)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def padded_width(longest: int, max_length: int, multiple: int | None) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (None: as is), at most ``max_length``."""
    if not multiple:
        return longest
    return min(max_length, -(-longest // multiple) * multiple)


def collate_pairs(examples: list[dict], pad_id: int, max_length: int,
                  pad_multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Preference pairs as one batch: rows [chosen_0..chosen_n, rejected_0..rejected_n]."""
    chosen = [{"prompt_ids": e["prompt_ids"], "answer_ids": e["chosen_ids"]} for e in examples]
    rejected = [{"prompt_ids": e["prompt_ids"], "answer_ids": e["rejected_ids"]} for e in examples]
    return collate_lm(chosen + rejected, pad_id, max_length, pad_multiple)
