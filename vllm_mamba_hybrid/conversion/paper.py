"""Convert a checkpoint in the paper's released MambaInLlama format.

The paper ships ``config.json`` (the teacher's unchanged LlamaConfig),
``mamba_config.json`` (d_model, ssm_cfg, d_inner, d_xb, n_layer, attn_layers,
...) and weights in ``pytorch_model.bin`` or safetensors, loadable only with the
teacher downloaded. The tensor names already match this project's
(``model.layers.{i}.mamba.*``), so conversion is a config translation plus a
strict name/shape check against the reference model; tensors are not touched,
which keeps the paper's numerics (double dt bias, per-head norm, repeat order).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from ..checkpoint import CheckpointError, check_finite
from ..config import LlamaMambaHybridConfig
from ..modeling import LlamaMambaHybridForCausalLM
from .output_dir import atomic_output_dir
from .teacher import check_llama_family

PAPER_MAMBA_CONFIG = "mamba_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
# ssm_cfg options whose non-default values the paper's layers support but this port does not
_UNSUPPORTED = {"mamba2": {"D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                           "repeat_kv_before_conv": False, "d_ssm": None, "bias": False},
                "mamba1": {"proj_x_bias": False, "proj_z_bias": False, "out_proj_bias": False}}


def read_paper_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a paper checkpoint (.bin via weights_only=True, or safetensors, sharded or not)."""
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = src / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(loader(src / shard))
            return out
    if (src / "model.safetensors").is_file():
        return _load_safetensors(src / "model.safetensors")
    if (src / "pytorch_model.bin").is_file():
        return _load_bin(src / "pytorch_model.bin")
    raise FileNotFoundError(f"{src}: no pytorch_model.bin or model.safetensors (sharded or not)")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{path}: cannot load with weights_only=True ({e})") from e


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own error names no file
        raise CheckpointError(f"{path}: unreadable weights file ({type(e).__name__}: {e})") from e


def detect_variant(tensors: dict[str, torch.Tensor]) -> str:
    if any(k.endswith(".mamba.in_proj.weight") for k in tensors):
        return "mamba2"
    if any(k.endswith(".mamba.in_proj_x.weight") for k in tensors):
        return "mamba1"
    raise ValueError("no model.layers.*.mamba.in_proj(.x).weight tensor: not a MambaInLlama checkpoint")


def paper_hybrid_config(teacher: LlamaConfig, mamba_cfg: dict, variant: str) -> LlamaMambaHybridConfig:
    """Translate config.json + mamba_config.json into one hybrid config."""
    ssm = dict(mamba_cfg.get("ssm_cfg") or {})
    for key, default in _UNSUPPORTED[variant].items():
        if key in ssm and ssm[key] != default:
            raise ValueError(f"{PAPER_MAMBA_CONFIG}: ssm_cfg.{key}={ssm[key]!r} is not supported "
                             f"(only {default!r})")
    for key, value in (("d_model", teacher.hidden_size), ("n_layer", teacher.num_hidden_layers),
                       ("vocab_size", teacher.vocab_size)):
        if mamba_cfg.get(key) not in (None, value):
            raise ValueError(f"{PAPER_MAMBA_CONFIG}: {key}={mamba_cfg[key]} but config.json says {value}")
    eps = mamba_cfg.get("rms_norm_eps", teacher.rms_norm_eps)
    if not math.isclose(eps, teacher.rms_norm_eps, rel_tol=1e-6):
        raise ValueError(f"{PAPER_MAMBA_CONFIG}: rms_norm_eps={eps} differs from the teacher's "
                         f"{teacher.rms_norm_eps}; one eps per model is supported")
    d_inner = mamba_cfg.get("d_inner") or teacher.hidden_size * ssm.get("expand", 2)
    default_state = (d_inner // ssm.get("ngroups", 1)) if variant == "mamba2" else 16
    dt_rank = ssm.get("dt_rank", "auto")
    if dt_rank == "auto":
        dt_rank = math.ceil(teacher.hidden_size / 16)
    fields = {k: v for k, v in teacher.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version")}
    fields.update(
        attn_layers=list(mamba_cfg.get("attn_layers") or []), mamba_variant=variant,
        d_inner=d_inner, d_xb=mamba_cfg["d_xb"], d_state=ssm.get("d_state", default_state),
        d_conv=ssm.get("d_conv", 4), conv_bias=ssm.get("conv_bias", True),
        repeat_kv_before_conv=ssm.get("repeat_kv_before_conv", variant == "mamba1"),
        dt_rank=dt_rank if variant == "mamba1" else None,
        architectures=["LlamaMambaHybridForCausalLM"])
    if variant == "mamba2" and ssm.get("ngroups") not in (None, d_inner // fields["d_state"]):
        raise ValueError(f"{PAPER_MAMBA_CONFIG}: ngroups={ssm['ngroups']} must equal "
                         f"d_inner/d_state={d_inner // fields['d_state']} (one SSM head per attention head)")
    return LlamaMambaHybridConfig(**fields)


def check_tensors(config: LlamaMambaHybridConfig, tensors: dict[str, torch.Tensor], src: Path) -> dict:
    """Every tensor the hybrid needs, with the right shape, and nothing else."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlamaMambaHybridForCausalLM(config).state_dict().items()}
    tensors = dict(tensors)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{src}: checkpoint does not match its config: missing tensors {missing[:8]}, "
                         f"unexpected tensors {unexpected[:8]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"{src}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {tuple(shape)}")
        check_finite(name, tensors[name], src)
    return tensors


def convert_paper(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False) -> Path:
    src = Path(src)
    if not (src / "config.json").is_file() or not (src / PAPER_MAMBA_CONFIG).is_file():
        raise FileNotFoundError(f"{src}: a paper checkpoint needs config.json and {PAPER_MAMBA_CONFIG}")
    check_llama_family(src)
    teacher = LlamaConfig.from_pretrained(src)
    mamba_cfg = json.loads((src / PAPER_MAMBA_CONFIG).read_text())
    tensors = read_paper_weights(src)
    config = paper_hybrid_config(teacher, mamba_cfg, detect_variant(tensors))
    tensors = check_tensors(config, tensors, src)
    with atomic_output_dir(dst, overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return Path(dst)
