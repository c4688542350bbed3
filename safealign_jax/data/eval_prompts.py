"""Readers for the evaluation prompt sets (../shared/data/eval_prompts/).

| set          | file               | rows   | prompt column | also                                  |
| i2p          | i2p_4073.csv       | 4,703  | caption       | categories ('violence, self-harm'), sd_seed |
| ud           | ud_1434.csv        | 1,434  | caption       |                                       |
| coprov2      | CoProv2_test.csv   | 8,000  | caption/prompt| category (CoProV2 spellings)          |
| coco         | coco_10k.csv       | 10,000 | caption       | (captions with embedded newlines)     |
| sage_seen    | sage_seen.csv      | 1,050  | caption       | user_id ('33'), category in file_name |
| sage_unseen  | sage_unseen.csv    | 1,050  | caption       | same                                  |

Prompt text is kept exactly as written (no stripping). `id` is the file_name column (the name
the official scripts save the generated image under), else the row index.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safealign_jax.data import categories, sage
from safealign_jax.data.tables import column, is_malformed, read_csv
from safealign_jax.data.users import format_user_id
from safealign_jax.errors import UserError

PROMPT_COLUMNS = ("prompt", "caption")


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """One evaluation prompt.

    Attributes:
      index: the row's 0-based position in the file; id: its file_name / image cell, else str(index).
      prompt: the text as written; category: the file's category text, categories: its
        canonical names; seed: the row's generation seed; user_id: the Sage user (7 digits).
    """

    index: int
    id: str
    prompt: str
    category: str | None = None
    categories: tuple[str, ...] = ()
    seed: int | None = None
    user_id: str | None = None


def read_prompt_csv(
    path,
    *,
    taxonomy: categories.Taxonomy | None = None,
    category_column: str | None = None,
    seed_column: str | None = None,
    user_column: str | None = None,
) -> list[PromptRow]:
    """Rows of a prompt CSV; named optional columns must exist. A category cell may list several
    categories separated by ','. Raises UserError naming the file, line and column on bad cells."""
    path = Path(path)
    columns, rows = read_csv(path)
    prompt_col = column(path, columns, PROMPT_COLUMNS, "prompt/caption")
    for name in (category_column, seed_column, user_column):
        if name is not None:
            column(path, columns, (name,), name)
    out = []
    for index, (line, row) in enumerate(rows):
        where = f"{path}:{line}"
        if is_malformed(row):
            raise UserError(f"{where}: row does not have the {len(columns)} fields {columns}.")
        text = row[category_column] if category_column else None
        names = ()
        if text is not None and taxonomy is not None and text.strip():
            names = taxonomy.sort(
                taxonomy.require(part, f"{where} column {category_column}")
                for part in text.split(",") if part.strip()
            )
        seed = None
        if seed_column:
            try:
                seed = int(row[seed_column])
            except ValueError as error:
                raise UserError(f"{where}: {seed_column} {row[seed_column]!r} is not an integer.") from error
        user = format_user_id(row[user_column], f"{where} {user_column}") if user_column else None
        out.append(
            PromptRow(
                index=index,
                id=row.get("file_name") or row.get("image") or str(index),
                prompt=row[prompt_col],
                category=text,
                categories=names,
                seed=seed,
                user_id=user,
            )
        )
    return out


def read_i2p(path) -> list[PromptRow]:
    return read_prompt_csv(
        path, taxonomy=categories.COPROV2, category_column="categories", seed_column="sd_seed"
    )


def read_ud(path) -> list[PromptRow]:
    return read_prompt_csv(path)


def read_coco(path) -> list[PromptRow]:
    return read_prompt_csv(path)


def read_coprov2_test(path) -> list[PromptRow]:
    return read_prompt_csv(path, taxonomy=categories.COPROV2, category_column="category")


def read_sage_prompts(path) -> list[PromptRow]:
    """Sage seen/unseen prompts; the category comes from the file_name."""
    rows = read_prompt_csv(path, user_column="user_id")
    out = []
    for row in rows:
        name = sage.parse_image_name(row.id)
        if name is None:
            raise UserError(f"{path}: file_name {row.id!r} (row {row.index}) names no Sage category.")
        out.append(
            dataclasses.replace(row, category=name.category_original, categories=(name.category,))
        )
    return out


PROMPT_SETS = {
    "i2p": ("i2p_4073.csv", read_i2p),
    "ud": ("ud_1434.csv", read_ud),
    "coprov2": ("CoProv2_test.csv", read_coprov2_test),
    "coco": ("coco_10k.csv", read_coco),
    "sage_seen": ("sage_seen.csv", read_sage_prompts),
    "sage_unseen": ("sage_unseen.csv", read_sage_prompts),
}


def read_prompt_set(name: str, folder) -> list[PromptRow]:
    """One of `PROMPT_SETS` from `folder` under its released file name."""
    if name not in PROMPT_SETS:
        raise UserError(f"unknown prompt set {name!r}; expected one of {', '.join(PROMPT_SETS)}.")
    file, reader = PROMPT_SETS[name]
    return reader(Path(folder) / file)
