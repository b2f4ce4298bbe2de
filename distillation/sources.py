"""Load a ``datasets`` table from a file, a saved directory or a hub name.

The column check happens here, before any model is touched, so a wrong column
name fails in a second with the columns that do exist.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_table(source: str, *, split: str = "train", columns: list[str], what: str):
    """Return a ``datasets.Dataset``; raise ConfigError naming ``what`` and the column."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ConfigError(
                    f"{what}: {path} has an unsupported extension; use one of {sorted(_FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_absolute() or source.startswith("."):
            raise ConfigError(f"{what}: {source} does not exist")
        else:
            ds = datasets.load_dataset(source, split=split)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        raise ConfigError(f"{what}: cannot load dataset {source!r} (split {split!r}): {e}") from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{what}: dataset {source!r} has no column {', '.join(repr(c) for c in missing)}; "
            f"its columns are {ds.column_names}")
    return ds
