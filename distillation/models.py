"""Models as the pipeline uses them: loading (teacher or student, one strict loader),
tokenizers, and which parameters a stage trains."""
from __future__ import annotations

from pathlib import Path

import torch

# One strict loader for teachers and students (model_type in config.json picks the class).
from vllm_mamba_hybrid.checkpoint import load_causal_lm  # noqa: F401  (re-exported)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.chat_template is None:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template; the pipeline needs one "
                         f"to format prompts the way the teacher was trained")
    return tok


def is_mamba_param(name: str) -> bool:
    return ".mamba." in name


# Embeddings, final norm and head: the parts a small draft shares with its teacher.
_EMBEDDING_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")


def is_trainable(name: str, *, freeze_mlp: bool, freeze_embeddings: bool) -> bool:
    """freeze_mlp: only the Mamba mixers train (the paper's first stage);
    freeze_embeddings: everything but embeddings, final norm and head trains."""
    if freeze_mlp:
        return is_mamba_param(name)
    return not (freeze_embeddings and name.startswith(_EMBEDDING_PREFIXES))
