"""Load a teacher (plain Llama) or a student (hybrid) directory by its config.

One loader for both keeps evaluation and training agnostic of which kind of
checkpoint they get: ``model_type`` in config.json decides the class.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HYBRID_MODEL_TYPE = "llama_mamba_hybrid"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_type(model_dir: str | Path) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    return json.loads(cfg.read_text()).get("model_type", "")


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A LlamaMambaHybridForCausalLM for hybrid dirs, else a LlamaForCausalLM."""
    mt = model_type(model_dir)
    if mt == HYBRID_MODEL_TYPE:
        from vllm_mamba_hybrid.modeling import LlamaMambaHybridForCausalLM
        return LlamaMambaHybridForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if mt == "llama":
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    raise ValueError(f"{model_dir}: model_type {mt!r} is neither 'llama' nor {HYBRID_MODEL_TYPE!r}")


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
