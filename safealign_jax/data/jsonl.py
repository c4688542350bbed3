"""JSONL reading shared by the readers: UTF-8 (BOM tolerated), blank lines skipped, 1-based line
numbers; parsing each line is left to the reader, which reports its own bad lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from safealign_jax.errors import UserError


def jsonl_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSONL file; UserError naming the file if it
    is not UTF-8 (raised while iterating, when the bad bytes are reached)."""
    try:
        with Path(path).open(encoding="utf-8-sig") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    yield line, text
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a UTF-8 JSONL file ({error}).") from error
