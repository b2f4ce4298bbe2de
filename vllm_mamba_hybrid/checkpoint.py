"""Reading a model directory strictly: every load path of the project goes through here.

A broken checkpoint fails before any work, with one error naming the file and the
tensor: an unreadable or truncated weights file, a tensor that is missing, unexpected
or mis-shaped, or one holding NaN or inf (left alone, a NaN weight surfaces far
downstream as empty text, NaN logprobs or a perplexity of NaN, with exit code 0).
transformers on its own fills a missing tensor with random values and goes on.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_mamba_hybrid.config import LlamaMambaHybridConfig


class CheckpointError(ValueError):
    """A model directory that cannot be used as it is (the message names what)."""


def read_config(model_dir: str | Path) -> dict:
    """config.json of a model directory, or an error that names the directory or file."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir} is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e


def weight_files(model_dir: str | Path) -> list[Path]:
    """The weights files of a model directory (safetensors, else PyTorch .bin)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def tensor_files(model_dir: str | Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint -> the file holding it, read from the files'
    headers (safetensors) or their pickles (.bin, ``weights_only``). An unreadable or
    truncated file is named."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for path in weight_files(model_dir):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
            else:
                names = list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # safetensors and torch raise their own error types
            raise CheckpointError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from e
        for name in names:
            if name in where:
                raise CheckpointError(f"tensor {name!r} is in both {where[name]} and {path}")
            where[name] = path
    return where


def check_finite(name: str, tensor: torch.Tensor, source: str | Path) -> None:
    """Refuse a floating-point tensor holding NaN or inf, naming it and its source."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).sum().item()
        raise CheckpointError(f"tensor {name!r} in {source} has {bad} non-finite value(s) "
                              f"(NaN or inf) of {tensor.numel()}")


def check_model_dir(model_dir: str | Path) -> dict:
    """The cheap checks (config and every file's header), for commands to run before any
    work; returns the config."""
    config = read_config(model_dir)
    tensor_files(model_dir)
    return config


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A LlamaMambaHybridForCausalLM for hybrid directories, a LlamaForCausalLM for Llama
    ones, loaded strictly (see the module doc)."""
    model_dir = Path(model_dir)
    model_type = read_config(model_dir).get("model_type", "")
    if model_type == LlamaMambaHybridConfig.model_type:
        from vllm_mamba_hybrid.modeling import LlamaMambaHybridForCausalLM as cls
    elif model_type == "llama":
        from transformers import LlamaForCausalLM as cls
    else:
        raise CheckpointError(f"{model_dir}: model_type {model_type!r} is neither 'llama' nor "
                              f"{LlamaMambaHybridConfig.model_type!r}")
    where = tensor_files(model_dir)
    model, info = cls.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True,
                                      ignore_mismatched_sizes=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"checkpoint {model_dir} lacks {len(missing)} tensor(s): "
                              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if info["unexpected_keys"]:
        name = sorted(info["unexpected_keys"])[0]
        raise CheckpointError(f"unexpected tensor {name!r} in {where.get(name, model_dir)} "
                              f"({len(info['unexpected_keys'])} in all) for this config")
    if info["mismatched_keys"]:
        name, got, want = sorted(info["mismatched_keys"])[0]
        raise CheckpointError(f"tensor {name!r} in {where.get(name, model_dir)} has shape "
                              f"{tuple(got)}, the config wants {tuple(want)}")
    for name, tensor in model.state_dict().items():
        check_finite(name, tensor, where.get(name, model_dir))
    return model
