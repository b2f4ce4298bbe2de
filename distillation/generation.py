"""Batched generation for evaluation and for the student's own samples in automatic
DPO pairs: the reference (transformers-style) ``generate`` on CPU, the project's
static-cache runtime (CUDA graphs, same tokens) on a GPU."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_answers(model, prompt_ids: list[list[int]], *, eos_id: int, pad_id: int,
                     max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, batch_size: int | None = None
                     ) -> list[list[int]]:
    """New token ids per prompt, cut after the first EOS (kept, as the model emitted it)."""
    model.eval()
    torch.manual_seed(seed)
    device = model.device
    if batch_size is None:
        batch_size = 64 if device.type == "cuda" else 8
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):  # left padding: every prompt ends at the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_id,
                      pad_token_id=pad_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if device.type == "cuda":
            from vllm_mamba_hybrid.runtime import fast_generate
            seqs = fast_generate(model, ids, mask, **kwargs)
        else:
            seqs = model.generate(ids, attention_mask=mask, **kwargs)
        for row in seqs[:, width:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id) + 1]
            out.append(row)
    return out
