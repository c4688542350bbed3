"""TFDS builders for CoProV2 pairs, Sage records and your own pairs tables (`pairs.py`), built
from local files, read without TensorFlow.

Only the array_record file format works without TensorFlow, so the builders force it; features
are Text, Sequence(Text) and `Tensor` (images as the original encoded JPEG/PNG file bytes in a
scalar `np.object_` tensor, embeddings as float32 vectors): none of them needs TF to encode or
decode. Examples are written in generation order (`disable_shuffling`; grain shuffles at read
time), so `metadata["category_index"]` can list the example positions of each category, and the
validation report is saved in `metadata["validation"]` (and kept as `builder.report`).

Sources are local files only: pass the paths to the constructor, or put the released files in
the TFDS manual dir (`download_config=tfds.download.DownloadConfig(manual_dir=...)`, layout in
`MANUAL_DOWNLOAD_INSTRUCTIONS`). Reading back needs no source: `builder.as_data_source(split)`,
or `tfds.builder_from_directory(dataset_dir)` without this module.

A later encode-once cache of VAE latents / text embeddings is another builder writing the same
example keys with arrays in place of the image bytes; `views.py` and `loader.py` read both.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from safealign_jax.data import categories, coprov2, pairs, sage, users, validation
from safealign_jax.errors import UserError

ARRAY_RECORD = "array_record"


def encoded_image() -> tfds.features.Tensor:
    """An image kept as its encoded file bytes (decoded by the loader, not by TFDS)."""
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def _pairs_info(builder, description: str) -> tfds.core.DatasetInfo:
    """The DatasetInfo of a preference-pairs data set (CoProV2 or a user's table): one example per
    pair, its prompts, categories and the two encoded images."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(
            {
                "pair_id": tfds.features.Text(),
                "harmful_prompt": tfds.features.Text(),
                "safe_prompt": tfds.features.Text(),
                "categories": tfds.features.Sequence(tfds.features.Text()),
                "original_categories": tfds.features.Sequence(tfds.features.Text()),
                "preferred_image": encoded_image(),
                "rejected_image": encoded_image(),
            }
        ),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )


def _array_record_only(kwargs: dict) -> dict:
    file_format = kwargs.setdefault("file_format", ARRAY_RECORD)
    if str(getattr(file_format, "value", file_format)) != ARRAY_RECORD:
        raise UserError(
            f"file_format {file_format!r}: only 'array_record' builds and reads without TensorFlow."
        )
    return kwargs


def _manual_dir(dl_manager, what: str) -> Path:
    try:
        return Path(dl_manager.manual_dir)
    except (AssertionError, ValueError) as error:
        raise UserError(f"{what}: no source paths given and no usable TFDS manual dir ({error}).") from error


def _require_examples(count: int, what: str, report: validation.Report) -> None:
    if count == 0:
        raise UserError(f"{what}: no usable example left; {report.summary()}")


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder of local files: TFDS's "Downloading and preparing dataset" and "downloaded and
    prepared" lines are not printed (the scripts print their own)."""

    code_path = None  # local files only: no checksums file (and tfds 4.9.10 fails looking one up)

    def is_built(self) -> bool:
        """Whether this version is built (TFDS's `is_prepared` logs a warning when it is not)."""
        return (Path(self.data_dir) / "dataset_info.json").is_file()

    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


class CoProV2Pairs(LocalBuilder):
    """CoProV2 preference pairs, one example per pair (multi-category pairs once)."""

    name = "coprov2_pairs"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Pairs from CoProv2_train.csv with an image folder or the parquet release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put CoProv2_train.csv in the manual dir together with either a folder images/ holding "
        "u_idx_NNNNNNN_0.jpg / s_idx_NNNNNNN_0.jpg, or the parquet release (*.parquet)."
    )

    def __init__(self, *, table=None, images=None, parquet=(), policy: str = "fail", **kwargs):
        """`table`: CoProv2_train.csv; `images`: image folder; `parquet`: parquet files (used
        instead of `images` when given; their jpg_0/jpg_1 file names, if any, are resolved
        against `images`); `policy`: "fail" or "skip" (see validation.py)."""
        validation.check_policy(policy)
        self._table, self._images, self._parquet = table, images, tuple(parquet)
        self._policy = policy
        self.report: validation.Report | None = None
        super().__init__(**_array_record_only(kwargs))

    def _info(self) -> tfds.core.DatasetInfo:
        return _pairs_info(self, "CoProV2 (SafetyDPO) pairs: preferred = image of the safe rewrite, "
                                 "rejected = image of the harmful prompt.")

    def _sources(self, dl_manager) -> tuple[Path, Path | None, list[Path]]:
        if self._table is not None:
            images = Path(self._images) if self._images is not None else None
            return Path(self._table), images, [Path(p) for p in self._parquet]
        root = _manual_dir(dl_manager, "CoProV2 build")
        return root / "CoProv2_train.csv", root / "images", sorted(root.glob("*.parquet"))

    def _split_generators(self, dl_manager):
        table, images, parquet = self._sources(dl_manager)
        report = validation.Report()
        pairs = coprov2.read_prompt_table(table, report)
        if parquet:
            pairs = coprov2.attach_parquet_images(pairs, parquet, report, image_dir=images)
        elif images is not None:
            pairs = coprov2.attach_folder_images(pairs, images, report)
        else:
            raise UserError(f"CoProV2 build from {table}: give an image folder or parquet files.")
        self.report = validation.enforce(report, self._policy, f"CoProV2 build from {table}")
        _require_examples(len(pairs), f"CoProV2 build from {table}", report)
        self.info.metadata["category_index"] = coprov2.category_index(pairs)
        self.info.metadata["validation"] = report.to_dict()
        return {"train": self._generate_examples(pairs)}

    def _generate_examples(self, pairs):
        for pair, preferred, rejected in coprov2.pair_images(pairs):
            yield pair.pair_id, {
                "pair_id": pair.pair_id,
                "harmful_prompt": pair.harmful_prompt,
                "safe_prompt": pair.safe_prompt,
                "categories": list(pair.categories),
                "original_categories": list(pair.original_categories),
                "preferred_image": preferred,
                "rejected_image": rejected,
            }


class SagePreferences(LocalBuilder):
    """Sage records (one per metadata.jsonl line) with the user's embedding, one split per
    released split folder."""

    name = "sage_preferences"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Sage metadata.jsonl splits, users.csv, per-user embeddings."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the Sage release in the manual dir: {train,val,test_seen,test_unseen}/metadata.jsonl "
        "with the images next to each metadata.jsonl, users/users.csv, embeddings/NNNNNNN.npy."
    )

    def __init__(
        self,
        *,
        root=None,
        users_csv=None,
        embeddings=None,
        splits=None,
        embedding_dim: int = 3584,
        policy: str = "fail",
        **kwargs,
    ):
        """`root`: folder with one sub-folder per split (metadata.jsonl + images); `users_csv`
        (default root/users/users.csv); `embeddings`: folder of NNNNNNN.npy (default
        root/embeddings); `splits`: which to build (default: every split folder present);
        `embedding_dim`: expected embedding size; `policy`: "fail" or "skip"."""
        validation.check_policy(policy)
        self._root, self._users_csv, self._embeddings = root, users_csv, embeddings
        self._splits = tuple(splits) if splits is not None else None
        self._embedding_dim = int(embedding_dim)
        self._policy = policy
        self.report: validation.Report | None = None
        super().__init__(**_array_record_only(kwargs))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Sage (PSA) personalised preference records; chosen/rejected follow the "
            "record's user's banned categories.",
            features=tfds.features.FeaturesDict(
                {
                    "record_id": tfds.features.Text(),
                    "user_id": tfds.features.Text(),
                    "user_embedding": tfds.features.Tensor(shape=(None,), dtype=np.float32),
                    "category": tfds.features.Text(),
                    "concept": tfds.features.Text(),
                    "prompt_kind": tfds.features.Text(),
                    "caption": tfds.features.Text(),
                    "chosen_image": encoded_image(),
                    "rejected_image": encoded_image(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = Path(self._root) if self._root is not None else _manual_dir(dl_manager, "Sage build")
        splits = self._splits or tuple(s for s in sage.SPLITS if (root / s / "metadata.jsonl").is_file())
        if not splits:
            raise UserError(f"Sage build: no {{{','.join(sage.SPLITS)}}}/metadata.jsonl under {root}.")
        unknown = [s for s in splits if s not in sage.SPLITS]
        if unknown:
            raise UserError(f"Sage build: unknown split(s) {unknown}; expected some of {sage.SPLITS}.")
        profiles = users.read_users(self._users_csv or root / "users" / "users.csv")
        report = validation.Report()
        per_split = {
            s: sage.read_split(root / s / "metadata.jsonl", root / s, profiles, report) for s in splits
        }
        user_ids = {r.user_id for records in per_split.values() for r in records}
        vectors = sage.load_embeddings(
            self._embeddings or root / "embeddings", user_ids, self._embedding_dim, report
        )
        for s, records in per_split.items():
            records = sage.keep_with_embeddings(records, vectors, report)
            per_split[s] = sage.check_images(records, report)
            report.kept[s] = len(per_split[s])
        self.report = validation.enforce(report, self._policy, f"Sage build from {root}")
        for s, records in per_split.items():
            _require_examples(len(records), f"Sage build from {root}, split {s}", report)
        self.info.metadata["validation"] = report.to_dict()
        self.info.metadata["embedding_dim"] = self._embedding_dim
        self.info.metadata["categories"] = list(categories.SAGE.categories)
        return {s: self._generate_examples(per_split[s], vectors) for s in splits}

    def _generate_examples(self, records, vectors):
        for record in records:
            yield record.record_id, {
                "record_id": record.record_id,
                "user_id": record.user_id,
                "user_embedding": vectors[record.user_id],
                "category": record.category,
                "concept": record.concept,
                "prompt_kind": record.prompt_kind,
                "caption": record.caption,
                "chosen_image": record.chosen.read_bytes(),
                "rejected_image": record.rejected.read_bytes(),
            }


class PreferencePairs(LocalBuilder):
    """Your own pairs (a table validated by `pairs.load_table`) in the coprov2_pairs schema, so
    the latent cache and the trainer read them alike: the table's `prompt` is stored as
    "harmful_prompt" (the caption trained on), its `safe_prompt` as "safe_prompt", its free-text
    categories as "categories"; `metadata["table_sha256"]` identifies the table built."""

    name = "preference_pairs"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "prompt, chosen, rejected [, category, safe_prompt] tables."}

    def __init__(self, *, table: pairs.PairsTable | None = None, **kwargs):
        """`table`: the validated table to build (None only to read a built one back)."""
        self._table = table
        super().__init__(**_array_record_only(kwargs))

    def _info(self) -> tfds.core.DatasetInfo:
        return _pairs_info(self, "Preference pairs from a user table: preferred = chosen, rejected = rejected.")

    def _split_generators(self, dl_manager):
        if self._table is None:
            raise UserError(f"{self.data_dir}: not built, and no pairs table given to build it from.")
        self.info.metadata["category_index"] = pairs.category_index(self._table.pairs)
        self.info.metadata["validation"] = self._table.report.to_dict()
        self.info.metadata["table"] = str(self._table.path.resolve())
        self.info.metadata["table_sha256"] = pairs.file_sha256(self._table.path)
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for pair, chosen, rejected in pairs.pair_images(self._table.path, self._table.pairs):
            yield pair.pair_id, {
                "pair_id": pair.pair_id,
                "harmful_prompt": pair.prompt,
                "safe_prompt": pair.safe_prompt,
                "categories": list(pair.categories),
                "original_categories": list(pair.categories),
                "preferred_image": chosen,
                "rejected_image": rejected,
            }
