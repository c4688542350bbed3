"""Training examples over built data sets, in the one schema the loader and trainer use:

    {"id": str, "caption": str, "preferred": image, "rejected": image}
    (+ "user_id": str, "user_embedding": float32 (E,) for Sage)

where an image is the encoded file bytes (decoded by the loader) or, for an encode-once cache
written with the same field names, an array used as is. Views are random-access sources
(`len`, `[i]`) for `grain.MapDataset.source`; indexing reads one record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from safealign_jax.data import categories, coprov2
from safealign_jax.errors import UserError


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_built(dataset, split: str) -> tuple[Sequence[dict], dict]:
    """(random-access source, metadata) of `split` of a built data set: a TFDS builder, or its
    version folder (e.g. DATA_DIR/coprov2_pairs/1.0.0), read without the builder's class."""
    builder = dataset
    if not isinstance(dataset, tfds.core.DatasetBuilder):
        path = Path(dataset)
        if not (path / "dataset_info.json").is_file():
            raise UserError(f"{path} is not a built TFDS data set (no dataset_info.json).")
        builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise UserError(f"{builder.data_dir}: no split {split!r}; splits: {list(builder.info.splits)}.")
    return builder.as_data_source(split), dict(builder.info.metadata or {})


class CoProV2Examples:
    """CoProV2 pairs as training examples: optionally one category's pairs (for its expert),
    optionally each pair twice (`both_captions`: harmful and safe prompt, safe image preferred)."""

    def __init__(
        self,
        source: Sequence[dict],
        category_index: Mapping[str, Sequence[int]] | None = None,
        category: str | None = None,
        both_captions: bool = False,
    ):
        positions: Sequence[int] = range(len(source))
        if category is not None:
            name = categories.COPROV2.require(category, "CoProV2 category selection")
            if category_index is None or name not in category_index:
                raise UserError(f"category {name!r} selected but the data set has no category index.")
            positions = list(category_index[name])
        self._source = source
        self._choices = [
            (positions[i], kind) for i, kind in coprov2.caption_choices(len(positions), both_captions)
        ]

    def __len__(self) -> int:
        return len(self._choices)

    def __getitem__(self, index: int) -> dict:
        position, kind = self._choices[index]
        record = self._source[position]
        return {
            "id": f"{_text(record['pair_id'])}/{kind}",
            "caption": _text(record[f"{kind}_prompt"]),
            "preferred": record["preferred_image"],
            "rejected": record["rejected_image"],
        }


class SageExamples:
    """Sage records as training examples conditioned on the record's user."""

    def __init__(self, source: Sequence[dict]):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        return {
            "id": _text(record["record_id"]),
            "caption": _text(record["caption"]),
            "user_id": _text(record["user_id"]),
            "user_embedding": record["user_embedding"],
            "preferred": record["chosen_image"],
            "rejected": record["rejected_image"],
        }


def coprov2_examples(
    dataset, category: str | None = None, both_captions: bool = False, split: str = "train"
) -> CoProV2Examples:
    """Examples of a built coprov2_pairs data set (builder or version folder)."""
    source, metadata = open_built(dataset, split)
    return CoProV2Examples(source, metadata.get("category_index"), category, both_captions)


def sage_examples(dataset, split: str = "train") -> SageExamples:
    """Examples of one split of a built sage_preferences data set (builder or version folder)."""
    source, _ = open_built(dataset, split)
    return SageExamples(source)
