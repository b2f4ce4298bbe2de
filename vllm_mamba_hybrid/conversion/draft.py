"""Small draft models for speculative decoding, cut from the teacher.

A draft must share the target's tokenizer; the cheapest one that does is the
teacher itself with most layers dropped (embeddings, final norm and lm_head
kept). Untrained, such a subset almost never predicts the target's next token
(measured 0-1% on SmolLM2 with 4-15 layers kept): it is a starting point that
must be distilled (``student.layers`` in the distillation config) before it is
worth serving.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from .output_dir import atomic_output_dir, check_output_dir
from .teacher import load_teacher


def layer_subset(teacher: LlamaForCausalLM, layers: list[int]) -> LlamaForCausalLM:
    """A Llama holding only the teacher's ``layers`` (in that order), renumbered from 0,
    with the teacher's embeddings, final norm and head (tensors shared, not copied)."""
    n = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices in [0, {n}), got {layers}")
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in layers]
    subset = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            if int(i) not in layers:
                continue
            key = f"model.layers.{layers.index(int(i))}.{rest}"
        subset[key] = value
    with torch.device("meta"):
        draft = LlamaForCausalLM(config)
    result = draft.load_state_dict(subset, strict=False, assign=True)
    missing = [k for k in result.missing_keys
               if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ValueError(f"layer subset does not fit the draft: missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]}")
    if config.tie_word_embeddings:
        draft.tie_weights()
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them.
    draft.model.rotary_emb = type(teacher.model.rotary_emb)(config=config)
    draft.generation_config = teacher.generation_config
    return draft


def make_layer_subset_draft(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            layers: list[int], *, overwrite: bool = False,
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a Llama with only the teacher's ``layers`` (in that order) to ``out_dir``,
    with the teacher's tokenizer; serve it as the draft of ``HybridDraftProposer``."""
    from transformers import AutoTokenizer

    check_output_dir(out_dir, overwrite)       # before the teacher loads
    draft = layer_subset(load_teacher(teacher_dir, dtype=torch.float32), layers)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        draft.to(dtype).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp)
    return Path(out_dir)
