"""Cheap content fingerprints, to tell whether cached work is still valid."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "generation_config.json")


def of_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def of_model_dir(model_dir: str | Path) -> str:
    """Hash of config/tokenizer files plus size and first/last MiB of each weight file."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for name in _SMALL_FILES:
        p = root / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    for p in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]
