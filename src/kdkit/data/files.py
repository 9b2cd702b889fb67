"""Row files as the ecosystem has them: JSON Lines (kdkit's own strict reader), and through Hugging Face
``datasets`` — Parquet, Arrow, CSV, JSON, and a directory written by ``Dataset.save_to_disk``.

Every reader gives ``(number, row)`` pairs: the line of a JSONL file, the 1-based row of a table, so
that an error still names the file, the row and the field. A table's empty cells (a column another row
uses) are dropped from the row, so a Parquet file with ``prompt``/``completion`` and ``messages``
columns reads as the JSONL file its rows came from.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

# suffix -> the `datasets` builder that reads it
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv", ".json": "json"}
JSONL_SUFFIXES = (".jsonl", ".gz")


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def read_objects(path: str | Path, error: type[Exception]) -> list[tuple[int, dict[str, Any]]]:
    """(number, row) for every row of ``path``; ``error`` names the file (and row) when it cannot be read."""
    return list(iter_objects(path, error))


def iter_objects(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`read_objects` one row at a time, in the file's order: JSONL line by line, a table streamed by
    ``datasets`` (record batches, never the whole table), a saved dataset memory-mapped."""
    from kdkit.util.io import iter_jsonl_objects

    path = Path(path)
    if path.suffix in JSONL_SUFFIXES or (path.is_file() and path.suffix not in TABLE_SUFFIXES):
        yield from iter_jsonl_objects(path, error)
        return
    if not path.exists():
        raise error(f"{path}: no such file or directory")
    n = 0
    for n, row in enumerate(_table_rows(path, error), start=1):
        yield n, {k: v for k, v in row.items() if v is not None}
    if n == 0:
        raise error(f"{path}: no rows")


def _table_rows(path: Path, error: type[Exception]) -> Iterator[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise error(f"{path}: reading {path.suffix or 'a dataset directory'} needs Hugging Face datasets "
                    f"(pip install datasets)") from None
    datasets.disable_progress_bars()
    try:
        yield from _open_table(datasets, path, error)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
        raise error(f"{path}: cannot be read as {path.suffix or 'a saved dataset'} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _open_table(datasets: Any, path: Path, error: type[Exception]) -> Any:
    if not path.is_dir():
        return datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train", streaming=True,
                                     **({"delimiter": "\t"} if path.suffix == ".tsv" else {}))
    if not is_saved_dataset(path):
        raise error(f"{path}: a directory that Dataset.save_to_disk did not write (no dataset_info.json)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise error(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return ds
