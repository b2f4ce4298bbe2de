"""Batched generation with the reference (transformers) models, for evaluation
and for the student's own samples in automatic DPO pairs."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_answers(model, prompt_ids: list[list[int]], *, eos_id: int, pad_id: int,
                     max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> list[list[int]]:
    """New token ids per prompt, cut after the first EOS (kept, as the model emitted it)."""
    model.eval()
    torch.manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      eos_token_id=eos_id, pad_token_id=pad_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        seqs = model.generate(ids, **kwargs)
        for row in seqs[:, width:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id) + 1]
            out.append(row)
    return out
