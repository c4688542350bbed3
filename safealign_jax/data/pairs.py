"""Your own preference pairs: one table (CSV, JSONL or parquet), one row per pair.

Columns: `prompt` (the caption trained on), `chosen` (the preferred image), `rejected`; optional
`category` (free text; several separated by commas, or a list in JSONL / parquet; empty = none)
and `safe_prompt` (the caption of `--config.data.both_captions`' second example; default the
prompt). An image cell is a path relative to the table's folder (or absolute), a
`data:image/...;base64,` URI, raw bytes (parquet binary), or a {"bytes", "path"} image struct as
Hugging Face `datasets` writes it.

    table = load_table("pairs/train.jsonl", policy="skip")    # validated, >= 1 pair
    for pair, chosen, rejected in pair_images(table.path, table.pairs): ...

Rows repeating a pair (same prompts and images) with another category add that category to the
first row's pair, as CoProV2 repeats a pair per category. Every row left out is in the report:
bad_row (malformed row, no image cell, chosen and rejected the same image), empty_prompt,
missing_image, unreadable_image, duplicate_pair. Rows are numbered by their line (CSV: header =
line 1; JSONL: line in the file) or, for parquet, by row (first row = 1). Images are not held in
memory: `pair_images` reads the table again, streaming.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from safealign_jax.data import validation
from safealign_jax.data.jsonl import jsonl_lines
from safealign_jax.data.tables import is_malformed, read_csv
from safealign_jax.errors import UserError

REQUIRED = ("prompt", "chosen", "rejected")
FORMATS = (".csv", ".jsonl", ".parquet")
IMAGES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One pair: `chosen` preferred over `rejected` for `prompt`, read from row `line`."""

    pair_id: str  # the line (row) number of its first row, as text
    line: int
    prompt: str
    safe_prompt: str
    categories: tuple[str, ...]  # free text, stripped, in first-seen order


@dataclasses.dataclass(frozen=True)
class PairsTable:
    """A validated pairs table: its path, its pairs (table order) and the validation report."""

    path: Path
    pairs: list[PreferencePair]
    report: validation.Report


def table_rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    """(line or row number, row dict or None for an unparseable row) of a CSV / JSONL / parquet
    table; UserError for an unknown suffix or a table lacking a required column."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: unknown pairs table format {suffix!r}; expected one of {', '.join(FORMATS)}.")
    if not path.is_file():
        raise UserError(f"{path}: file not found.")
    if suffix == ".csv":
        columns, rows = read_csv(path)
        _require_columns(path, columns)
        for line, row in rows:
            yield line, None if is_malformed(row) else row
    elif suffix == ".jsonl":
        yield from _jsonl_rows(path)
    else:
        yield from _parquet_rows(path)


def _require_columns(path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(missing)} (expected {', '.join(REQUIRED)}"
                        f"[, category, safe_prompt]); columns found: {', '.join(columns) or 'none'}.")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    for line, text in jsonl_lines(path):
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        yield line, row if isinstance(row, dict) else None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except pa.ArrowException as error:
        raise UserError(f"{path}: not a parquet file ({error}).") from error
    names = handle.schema_arrow.names
    _require_columns(path, names)
    row = 0
    for batch in handle.iter_batches(batch_size=64):
        for values in batch.to_pylist():
            row += 1
            yield row, values


def image_bytes(value, folder: Path) -> bytes | tuple[str, str]:
    """The image of a `chosen` / `rejected` cell, or (problem kind, detail) if there is none."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes) and value:
        return value
    if not isinstance(value, str) or not value.strip():
        return "bad_row", "holds no image (expected a path, a data: URI or image bytes)"
    if value.startswith("data:"):
        try:
            return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
        except (IndexError, binascii.Error):
            return "unreadable_image", "is a data: URI without valid base64 image data"
    file = folder / value.strip()
    if not file.is_file():
        return "missing_image", f"image {file} does not exist"
    return file.read_bytes()


def _categories(value) -> tuple[str, ...] | None:
    """Category names of a `category` cell (None / "" = none); None if it is not text."""
    if value is None:
        return ()
    parts = value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) for p in parts):
        return None
    names = [n.strip() for p in parts for n in p.split(",")]
    return tuple(dict.fromkeys(n for n in names if n))


def read_pairs(path, report: validation.Report) -> list[PreferencePair]:
    """The usable pairs of a table, in table order; every row left out -> `report`."""
    path = Path(path)
    folder = path.parent
    checked: dict[bytes, str | None] = {}  # digest -> decode problem (an image may recur)
    first: dict[tuple, int] = {}  # (prompt, safe_prompt, chosen digest, rejected digest) -> index
    pairs: list[PreferencePair] = []
    rows = 0
    for line, row in table_rows(path):
        rows += 1
        if row is None or any(c not in row for c in REQUIRED):
            report.add("bad_row", path, line, f"not a row with fields {', '.join(REQUIRED)}; row left out")
            continue
        prompt, safe = row["prompt"], row.get("safe_prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            report.add("empty_prompt", path, line, "empty prompt; row left out")
            continue
        safe = safe if isinstance(safe, str) and safe.strip() else prompt
        cats = _categories(row.get("category"))
        if cats is None:
            report.add("bad_row", path, line, f"category {row.get('category')!r} is not text; row left out")
            continue
        digests = []
        for name in IMAGES:
            data = image_bytes(row[name], folder)
            if isinstance(data, tuple):
                report.add(data[0], path, line, f"{name} {data[1]}; row left out")
                break
            digest = hashlib.sha1(data).digest()
            if digest not in checked:
                checked[digest] = validation.image_problem(data)
            if checked[digest] is not None:
                report.add("unreadable_image", path, line,
                           f"{name} cannot be decoded ({checked[digest]}); row left out")
                break
            digests.append(digest)
        if len(digests) < 2:
            continue
        if digests[0] == digests[1]:
            report.add("bad_row", path, line, "chosen and rejected are the same image; row left out")
            continue
        key = (prompt, safe, *digests)
        if key in first:
            pair = pairs[first[key]]
            new = tuple(c for c in cats if c not in pair.categories)
            if not new:
                report.add("duplicate_pair", path, line, f"repeats line {pair.line}; row left out")
                continue
            pairs[first[key]] = dataclasses.replace(pair, categories=pair.categories + new)
            continue
        first[key] = len(pairs)
        pairs.append(PreferencePair(str(line), line, prompt, safe, cats))
    report.kept["rows"] = rows - len(report.problems)
    report.kept["pairs"] = len(pairs)
    return pairs


def load_table(path, policy: str) -> PairsTable:
    """`read_pairs` with the validation `policy` applied; UserError if no pair is left."""
    validation.check_policy(policy)
    report = validation.Report()
    pairs = read_pairs(path, report)
    validation.enforce(report, policy, f"pairs table {path}")
    if not pairs:
        raise UserError(f"pairs table {path}: no usable pair left; {_one_line(report)}")
    return PairsTable(Path(path), pairs, report)


def _one_line(report: validation.Report) -> str:
    first = f"; first: {report.problems[0]}" if report.problems else ""
    return f"{len(report.problems)} row(s) left out {report.counts()}{first}."


def pair_images(path, pairs: Sequence[PreferencePair]) -> Iterator[tuple[PreferencePair, bytes, bytes]]:
    """(pair, chosen bytes, rejected bytes) of `pairs` (from `read_pairs(path)`, table order),
    reading the table again row by row."""
    path = Path(path)
    wanted = {p.line: p for p in pairs}
    for line, row in table_rows(path):
        pair = wanted.get(line)
        if pair is not None:
            chosen, rejected = (image_bytes(row[name], path.parent) for name in IMAGES)
            if isinstance(chosen, tuple) or isinstance(rejected, tuple):
                raise UserError(f"{path}:{line}: an image changed while the data set was built.")
            yield pair, chosen, rejected


def file_sha256(path) -> str:
    """Hex SHA-256 of a file (which table a built data set came from)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def category_index(pairs: Sequence[PreferencePair]) -> dict[str, list[int]]:
    """{category: positions in `pairs` of the pairs listing it}, categories in first-seen order."""
    index: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        for c in pair.categories:
            index.setdefault(c, []).append(i)
    return index
