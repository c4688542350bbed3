"""CoProV2 (SafetyDPO) preference pairs from the released files.

Prompt table `CoProv2_train.csv` (columns prompt,image,category): one row per image and category;
the harmful prompt's image is `u_idx_NNNNNNN_0.jpg`, its safe rewrite's `s_idx_NNNNNNN_0.jpg`
(same index NNNNNNN); a pair with several categories repeats both rows once per category
(32,086 rows -> 15,690 pairs, 321 of them multi-category). One `Pair` per index: the categories
are merged, the file spellings kept.

Images come either from a folder holding those file names (`attach_folder_images`) or from the
parquet release (`attach_parquet_images`: columns jpg_0, jpg_1, label_0, caption; label_0 == 1
means jpg_0 is preferred; two rows per pair, captioned with the harmful and the safe prompt). A
parquet release has no index or category column, so its rows are matched to the prompt table by
their captions. Each of jpg_0 / jpg_1 holds either file names (the released dataset card types
them as strings, opened by the official training script relative to an image folder) or the
image itself (bytes, or a {"bytes", "path"} image struct); `image_column_kind` tells them apart by
the column's Arrow type. Embedded bytes stay in the parquet files (`ParquetImage` references) and
are read in file order by `pair_images`, so a large release is never held in memory.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from safealign_jax.data import categories, eval_prompts, validation
from safealign_jax.data.tables import column, is_malformed, read_csv
from safealign_jax.errors import UserError

IMAGE_NAME = re.compile(r"(?P<kind>[us])_idx_(?P<index>\d+)_(?P<render>\d+)\.[A-Za-z]+")
PARQUET_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


@dataclasses.dataclass(frozen=True)
class ParquetImage:
    """Where one image of the parquet release lives: file, row (0-based) and column."""

    file: str
    row: int
    column: str


@dataclasses.dataclass(frozen=True)
class Pair:
    """One CoProV2 preference pair: the safe image is preferred, the harmful one rejected.

    `preferred`/`rejected` are image file paths, parquet references, or None before images are
    attached. `lines` are (harmful row line, safe row line) of the first rows in `source`.
    """

    pair_id: str
    harmful_prompt: str
    safe_prompt: str
    categories: tuple[str, ...]
    original_categories: tuple[str, ...]
    harmful_image: str
    safe_image: str
    source: str
    lines: tuple[int, int]
    preferred: Path | ParquetImage | None = None
    rejected: Path | ParquetImage | None = None


@dataclasses.dataclass
class _Half:
    prompt: str
    image: str
    line: int


def read_prompt_table(path, report: validation.Report) -> list[Pair]:
    """Pairs (without images) from `CoProv2_train.csv`, sorted by index; bad rows -> `report`."""
    path = Path(path)
    columns, rows = read_csv(path)
    prompt_col = column(path, columns, ("prompt", "caption"), "prompt")
    image_col = column(path, columns, ("image", "file_name"), "image name")
    category_col = column(path, columns, ("category",), "category")

    halves: dict[str, dict[str, _Half]] = collections.defaultdict(dict)
    cats: dict[str, dict[str, str]] = collections.defaultdict(dict)  # canonical -> original
    seen: dict[tuple[str, str, str], int] = {}
    dropped: set[str] = set()
    for line, row in rows:
        if is_malformed(row):
            report.add("bad_row", path, line, f"expected 3 fields {columns}, got {row}")
            continue
        image = row[image_col].strip()
        match = IMAGE_NAME.fullmatch(image)
        if match is None:
            report.add("bad_row", path, line, f"image {image!r} is not u_idx_N_R.jpg/s_idx_N_R.jpg")
            continue
        index, kind, prompt = match["index"], match["kind"], row[prompt_col]
        if not prompt.strip():
            report.add("empty_prompt", path, line, f"empty prompt; pair {index} left out")
            dropped.add(index)
            continue
        category = categories.COPROV2.canonical(row[category_col])
        if category is None:
            report.add(
                "unknown_category", path, line,
                f"category {row[category_col]!r} is not one of "
                f"{', '.join(categories.COPROV2.categories)}; row left out",
            )
            continue
        key = (index, kind, category)
        if key in seen:
            report.add(
                "duplicate_pair", path, line,
                f"repeats line {seen[key]} (pair {index}, {kind}, {category}); row left out",
            )
            continue
        seen[key] = line
        half = halves[index].get(kind)
        if half is None:
            halves[index][kind] = _Half(prompt, image, line)
        elif (half.prompt, half.image) != (prompt, image):
            report.add(
                "conflicting_pair", path, line,
                f"pair {index} {kind} row differs from line {half.line}; pair left out",
            )
            dropped.add(index)
        cats[index].setdefault(category, row[category_col])

    pairs = []
    for index in sorted(halves, key=int):
        if index in dropped:
            continue
        u, s = halves[index].get("u"), halves[index].get("s")
        if u is None or s is None:
            have = u or s
            missing = "harmful (u_idx_)" if u is None else "safe (s_idx_)"
            report.add("incomplete_pair", path, have.line, f"pair {index} has no {missing} row")
            continue
        canonical = categories.COPROV2.sort(cats[index])
        pairs.append(
            Pair(
                pair_id=index,
                harmful_prompt=u.prompt,
                safe_prompt=s.prompt,
                categories=canonical,
                original_categories=tuple(cats[index][c] for c in canonical),
                harmful_image=u.image,
                safe_image=s.image,
                source=str(path),
                lines=(u.line, s.line),
            )
        )
    report.kept["pairs_in_table"] = len(pairs)
    return pairs


def attach_folder_images(
    pairs: Sequence[Pair], image_dir, report: validation.Report
) -> list[Pair]:
    """Pairs whose two image files exist in `image_dir` and decode; others -> `report`."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise UserError(f"CoProV2 image folder {image_dir} does not exist.")
    out = []
    for pair in pairs:
        ok = True
        for name, line in ((pair.harmful_image, pair.lines[0]), (pair.safe_image, pair.lines[1])):
            problem = validation.image_file_problem(image_dir / name)
            if problem is not None:
                report.add(problem[0], pair.source, line, f"{problem[1]}; pair {pair.pair_id} left out")
                ok = False
        if ok:
            out.append(
                dataclasses.replace(
                    pair, preferred=image_dir / pair.safe_image, rejected=image_dir / pair.harmful_image
                )
            )
    report.kept["pairs"] = len(out)
    return out


def _image_value(value) -> bytes | None:
    """Image bytes from an embedded-image parquet cell: raw bytes or a {'bytes', 'path'} struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes) and value else None


def image_column_kind(file, schema, name: str) -> str:
    """"names" for a string column (file names), "bytes" for binary or an image struct with a
    `bytes` field; UserError naming the column and its type otherwise."""
    import pyarrow as pa

    kind = schema.field(name).type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "names"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return "bytes"
    raise UserError(
        f"{file}: parquet column {name} has type {kind}; expected file names (string) or images "
        f"(binary, or a struct with a 'bytes' field)."
    )


def _parquet_rows(files: Sequence[Path], columns: Sequence[str]) -> Iterator[tuple[Path, int, dict]]:
    """(file, 0-based row, {column: value}) for every row of `files`, reading by batches."""
    import pyarrow.parquet as pq  # a tensorflow-datasets dependency; only needed here

    for file in files:
        handle = pq.ParquetFile(file)
        found = handle.schema_arrow.names
        missing = [c for c in columns if c not in found]
        if missing:
            raise UserError(
                f"{file}: missing parquet column(s) {', '.join(missing)}; columns found: "
                f"{', '.join(found)} (expected {', '.join(PARQUET_COLUMNS)})."
            )
        row = 0
        for batch in handle.iter_batches(batch_size=64, columns=list(columns)):
            for values in batch.to_pylist():
                yield file, row, values
                row += 1


def _image_column_kinds(file: Path) -> dict[str, str]:
    """{jpg_0 / jpg_1: "names" | "bytes"} of one parquet file."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    return {c: image_column_kind(file, schema, c) for c in IMAGE_COLUMNS if c in schema.names}


@dataclasses.dataclass(frozen=True)
class _RowImage:
    """One image cell of a parquet row: the SHA-1 of its bytes (rows showing the same image
    agree whether they name it or embed it) and where the pair will read it."""

    digest: bytes
    source: Path | ParquetImage


def _row_image(
    file: Path, row: int, column_name: str, value, kind: str, image_dir: Path | None,
    checked: dict[object, tuple[bytes, tuple[str, str] | None]],
):
    """(_RowImage, None) for a usable cell, (None, (problem kind, detail)) otherwise.
    `checked` caches (digest, problem) per image file or digest (each image is in two rows)."""
    if kind == "bytes":
        data = _image_value(value)
        if data is None:
            return None, ("bad_row", f"{column_name} holds no image bytes")
        source, digest = ParquetImage(str(file), row, column_name), hashlib.sha1(data).digest()
        if digest not in checked:
            reason = validation.image_problem(data)
            problem = reason and ("unreadable_image", f"{column_name} cannot be decoded ({reason})")
            checked[digest] = (digest, problem)
        digest, problem = checked[digest]
    else:
        if not isinstance(value, str) or not value.strip():
            return None, ("bad_row", f"{column_name} holds no file name")
        source = image_dir / value
        if source not in checked:
            problem = validation.image_file_problem(source)
            digest = b"" if problem else hashlib.sha1(source.read_bytes()).digest()
            checked[source] = (digest, problem)
        digest, problem = checked[source]
    if problem is not None:
        return None, problem
    return _RowImage(digest, source), None


def attach_parquet_images(
    pairs: Sequence[Pair], files: Sequence, report: validation.Report, image_dir=None
) -> list[Pair]:
    """Pairs with images from the parquet release, matched by caption; in parquet order.

    jpg_0 / jpg_1 may hold file names, resolved against `image_dir` (then the pair's images are
    those file paths), or embedded images (then `ParquetImage` references); see
    `image_column_kind`. A row whose image is missing or unreadable is reported and left out.
    Rows showing the same (preferred, rejected) images form one group; the group's captions
    must be the harmful and/or safe prompt of a pair of the prompt table. Prompts repeat across
    pairs in the real table, so a group goes to the first such pair not yet given images.
    """
    files = [Path(f) for f in files]
    for file in files:
        if not file.is_file():
            raise UserError(f"CoProV2 parquet file {file} does not exist.")
    kinds = {file: _image_column_kinds(file) for file in files}
    if any("names" in k.values() for k in kinds.values()):
        if image_dir is None or not Path(image_dir).is_dir():
            raise UserError(
                f"CoProV2 parquet jpg_0/jpg_1 hold file names: give the image folder they are "
                f"in (--config.images; got {str(image_dir or '') or 'none'!r})."
            )
        image_dir = Path(image_dir)
    by_prompt: dict[str, set[int]] = collections.defaultdict(set)
    for i, pair in enumerate(pairs):
        by_prompt[pair.harmful_prompt].add(i)
        by_prompt[pair.safe_prompt].add(i)

    groups: dict[bytes, list[tuple[Path, int, str]]] = {}
    checked: dict[object, tuple[bytes, tuple[str, str] | None]] = {}
    sources: dict[tuple[Path, int], tuple[Path | ParquetImage, Path | ParquetImage]] = {}
    for file, row, values in _parquet_rows(files, PARQUET_COLUMNS):
        line = row + 1
        if values["label_0"] not in (0, 1) or not values["caption"]:
            report.add("bad_row", file, line, "needs label_0 0 or 1 and a caption; row left out")
            continue
        order = IMAGE_COLUMNS if values["label_0"] == 1 else IMAGE_COLUMNS[::-1]
        cells, problem = [], None
        for name in order:
            cell, problem = _row_image(
                file, row, name, values[name], kinds[file][name], image_dir, checked
            )
            if problem is not None:
                break
            cells.append(cell)
        if problem is not None:
            report.add(problem[0], file, line, f"{problem[1]}; row left out")
            continue
        preferred, rejected = cells
        key = preferred.digest + rejected.digest
        groups.setdefault(key, []).append((file, row, values["caption"]))
        sources[file, row] = (preferred.source, rejected.source)

    assigned: dict[int, tuple[Path, int]] = {}
    for rows in groups.values():
        candidates = set.intersection(*(by_prompt.get(caption, set()) for _, _, caption in rows))
        file, row, _ = rows[0]
        if not candidates:
            for f, r, caption in rows:
                report.add("caption_not_found", f, r + 1, f"caption {caption[:60]!r} is in no pair")
            continue
        free = sorted(candidates - set(assigned))
        if not free:
            owner = pairs[min(candidates)].pair_id
            report.add(
                "conflicting_pair", file, row + 1,
                f"second set of images for pair {owner}; row(s) left out",
            )
            continue
        assigned[free[0]] = (file, row)

    for i, pair in enumerate(pairs):
        if i not in assigned:
            report.add(
                "missing_image", pair.source, pair.lines[0],
                f"no parquet row has the images of pair {pair.pair_id}; pair left out",
            )
    order = sorted(assigned, key=lambda i: (files.index(assigned[i][0]), assigned[i][1]))
    out = []
    for i in order:
        preferred, rejected = sources[assigned[i]]
        out.append(dataclasses.replace(pairs[i], preferred=preferred, rejected=rejected))
    report.kept["pairs"] = len(out)
    return out


def _parquet_ref(pair: Pair) -> ParquetImage | None:
    """The parquet row a pair reads embedded images from (None if both images are files)."""
    for image in (pair.preferred, pair.rejected):
        if isinstance(image, ParquetImage):
            return image
    return None


def pair_images(pairs: Sequence[Pair]) -> Iterator[tuple[Pair, bytes, bytes]]:
    """(pair, preferred bytes, rejected bytes) for each pair, in order.

    Pairs with embedded parquet images must come in parquet order (as `attach_parquet_images`
    returns them): the files are streamed once.
    """
    wanted = collections.defaultdict(set)
    for pair in pairs:
        ref = _parquet_ref(pair)
        if ref is not None:
            wanted[Path(ref.file)].add(ref.row)
    streams = {
        file: (
            (row, values)
            for _, row, values in _parquet_rows([file], IMAGE_COLUMNS)
            if row in rows
        )
        for file, rows in wanted.items()
    }
    for pair in pairs:
        if pair.preferred is None or pair.rejected is None:
            raise ValueError(f"pair {pair.pair_id} has no images attached")
        ref, values = _parquet_ref(pair), None
        if ref is not None:
            row, values = next(streams[Path(ref.file)])
            if row != ref.row:
                raise ValueError("parquet-backed pairs must be given in parquet order")
        yield pair, *(
            _image_value(values[image.column]) if isinstance(image, ParquetImage)
            else Path(image).read_bytes()
            for image in (pair.preferred, pair.rejected)
        )


def category_index(pairs: Sequence[Pair]) -> dict[str, list[int]]:
    """{canonical category: positions in `pairs` of the pairs listing it} (all 7 keys)."""
    index = {c: [] for c in categories.COPROV2.categories}
    for i, pair in enumerate(pairs):
        for c in pair.categories:
            index[c].append(i)
    return index


def in_category(pairs: Sequence[Pair], category: str) -> list[Pair]:
    """The pairs of one category (any spelling), e.g. to train that category's expert."""
    name = categories.COPROV2.require(category, "CoProV2 category selection")
    return [p for p in pairs if name in p.categories]


def caption_choices(num_pairs: int, both_captions: bool) -> list[tuple[int, str]]:
    """Training examples as (pair position, 'harmful' | 'safe' caption).

    One example per pair captioned with the harmful prompt; with `both_captions` a second one
    captioned with the safe prompt (the safe image is preferred both times), as in the parquet
    release.
    """
    kinds = ("harmful", "safe") if both_captions else ("harmful",)
    return [(i, kind) for kind in kinds for i in range(num_pairs)]


def read_test_prompts(path) -> list[eval_prompts.PromptRow]:
    """`CoProv2_test.csv` (prompt,image,category or caption,file_name,category): the harmful
    test prompts with their categories."""
    return eval_prompts.read_coprov2_test(path)
