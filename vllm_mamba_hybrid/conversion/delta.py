"""A checkpoint as its difference from a base (its teacher): ship only what training changed.

A student trained with frozen parts (MLPs frozen, or a draft with the teacher's
embeddings) holds many tensors bit-equal to the teacher's. ``write_delta`` keeps
only the others, in shards under a size limit (e.g. the 16 MiB a file may weigh
on its way back from the lent GPU machine); ``apply_delta`` rebuilds the full
directory from the base. Tensors are compared by name and value, so nothing is
assumed about which parts were frozen.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .output_dir import atomic_output_dir

_META_KEY = "vllm_mamba_hybrid_delta"


def _read(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no .safetensors files")
    return _read(files)


def write_delta(model_dir: str | os.PathLike, base_dir: str | os.PathLike,
                out_prefix: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                max_shard_bytes: int = 15 << 20) -> list[Path]:
    """Write ``{out_prefix}-NNNNN.safetensors`` shards holding the tensors of
    ``model_dir`` that ``base_dir`` lacks or holds with other values (cast to ``dtype``);
    the first shard's metadata carries config.json and the names taken from the base."""
    model_dir, base_dir = Path(model_dir), Path(base_dir)
    model, base = _tensors(model_dir), _tensors(base_dir)
    if json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings"):
        model.pop("lm_head.weight", None)  # the embeddings' alias: loaders tie it again
    changed, same = {}, []
    for name, t in model.items():
        b = base.get(name)
        if b is not None and b.shape == t.shape and torch.equal(t.to(b.dtype), b) \
                and torch.equal(b.to(t.dtype), t):
            same.append(name)
        else:
            changed[name] = t.to(dtype).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in changed.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > max_shard_bytes:
            raise ValueError(f"tensor {name} ({nbytes} bytes) exceeds max_shard_bytes")
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"config": (model_dir / "config.json").read_text(), "from_base": same,
            "num_shards": len(shards)}
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        meta["generation_config"] = gen.read_text()
    paths = []
    for i, shard in enumerate(shards):
        path = Path(f"{out_prefix}-{i + 1:05d}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(shard, str(path), metadata={_META_KEY: json.dumps(meta)} if i == 0 else None)
        paths.append(path)
    return paths


def apply_delta(base_dir: str | os.PathLike, shards: list[str | os.PathLike],
                out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Rebuild the full model directory (weights, config, base's tokenizer) from the
    delta ``shards`` and ``base_dir``; fails naming any tensor it cannot account for."""
    from transformers import AutoTokenizer
    base_dir = Path(base_dir)
    shards = sorted(Path(s) for s in shards)
    if not shards:
        raise ValueError(f"no delta shards given to rebuild {out_dir} from {base_dir}")
    with safe_open(str(shards[0]), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{shards[0]} is not the first shard of a delta (no {_META_KEY} metadata)")
    meta = json.loads(raw)
    if len(shards) != meta["num_shards"]:
        raise ValueError(f"delta has {meta['num_shards']} shards, got {len(shards)}: {shards}")
    tensors = _read(shards)
    base = _tensors(base_dir)
    missing = [n for n in meta["from_base"] if n not in base]
    if missing:
        raise ValueError(f"base {base_dir} lacks tensors the delta takes from it: {missing[:4]}")
    dtype = next(iter(tensors.values())).dtype if tensors else torch.bfloat16
    for name in meta["from_base"]:
        tensors[name] = base[name].to(dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(meta["config"])
        if "generation_config" in meta:
            (tmp / "generation_config.json").write_text(meta["generation_config"])
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    return Path(out_dir)
