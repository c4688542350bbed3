"""CSV reading shared by the readers: UTF-8 (BOM tolerated), any line ending, quoted fields with
embedded newlines, and 1-based line numbers (the header is line 1) of the first line of each row.
"""

from __future__ import annotations

import csv
from pathlib import Path

from safealign_jax.errors import UserError


def read_csv(path) -> tuple[list[str], list[tuple[int, dict[str, str | None]]]]:
    """Returns (columns, [(line, row)]). A row with too few fields has None values, one with
    too many fields an extra None key (callers report those as bad rows)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = []
            start = reader.line_num + 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: not a UTF-8 CSV file ({error}).") from error
    if not columns:
        raise UserError(f"{path}: empty file, expected a CSV header line.")
    return columns, rows


def column(path, columns: list[str], candidates: tuple[str, ...], what: str) -> str:
    """The first of `candidates` present in `columns`; UserError naming the file otherwise."""
    for name in candidates:
        if name in columns:
            return name
    raise UserError(
        f"{path}: no {what} column (expected {' or '.join(map(repr, candidates))}); "
        f"columns found: {', '.join(columns) or 'none'}."
    )


def is_malformed(row: dict) -> bool:
    """True for a row with missing or extra fields."""
    return None in row or any(value is None for value in row.values())
