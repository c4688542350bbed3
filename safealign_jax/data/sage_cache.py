"""Encode-once cache of a Sage split for PSA training: VAE latent moments, text states, user ids.

    write_sage_cache("sage/train", "sage/users/users.csv", pipeline_dir, out_dir, resolution=512)
    source = SageCachedPairs(out_dir, "sage/embeddings", seed=0, global_rows=8, rows=slice(0, 8))

Layout of `out_dir` (as `safealign_jax.data.cache`, format "safealign_sage_cache/1"):
    metadata.json                     settings, example count, shard names, VAE factors, and
                                      per record in data set order: "user_ids", "categories",
                                      "harmful" (a harmful-prompt record) and "prefers_safe"
                                      (the chosen image is the safe one): the users' preference
                                      records (`preference_records`, for `gated.fit_gates`)
    empty_prompt.npz                  "encoder_hidden_states" (S, D) (+ "pooled" (P,) for SDXL)
    shard-KKKKK-of-NNNNN.array_record one record per Sage record (metadata.jsonl order, after
                                      validation): an `np.savez` archive with "record_id",
                                      "user_id", "chosen" / "rejected" = VAE [mean, logvar]
                                      (h, w, 2C), "states" (S, D) of the record's caption
                                      (+ "pooled" (P,) for SDXL)

User embeddings are NOT cached: `SageCachedPairs` reads them from a folder of {user_id}.npy when
training starts (so one cache serves embeddings from any LLM); a user of the cache without a
usable embedding is a UserError, except that with `missing_embedding="zeros"` a user without an
embedding file gets the zero vector, as the official PSA code substitutes (unreadable, wrong-size
or non-finite files stay errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from safealign_jax.data import cache, categories, sage, users, validation
from safealign_jax.data.images import decode_image
from safealign_jax.errors import UserError

FORMAT = "safealign_sage_cache/1"
MISSING_EMBEDDING = ("error", "zeros")  # what a user without an {id}.npy file gets


def read_records(split_dir, users_csv, policy: str = "fail") -> tuple[list[sage.SageRecord], dict]:
    """Validated records of one split folder (metadata.jsonl + images) and the report dict."""
    validation.check_policy(policy)
    split_dir = Path(split_dir)
    report = validation.Report()
    records = sage.read_split(split_dir / "metadata.jsonl", split_dir, users.read_users(users_csv), report)
    records = sage.check_images(records, report)
    report.kept[split_dir.name] = len(records)
    validation.enforce(report, policy, f"Sage split {split_dir}")
    if not records:
        raise UserError(f"Sage split {split_dir}: no usable records.")
    return records, report.to_dict()


def _encode(pipe, records: list[sage.SageRecord], resolution: int, batch_size: int, dtype: str) -> list[bytes]:
    """Packed cache records, encoded in batches of `batch_size` (last one padded: one compile)."""
    pad = records + [records[-1]] * (batch_size - len(records))
    images = np.stack([decode_image(path.read_bytes(), resolution)
                       for r in pad for path in (r.chosen, r.rejected)])
    moments = cache.encode_images(pipe, images).astype(dtype)
    states, pooled = cache.encode_texts(pipe, [r.caption for r in pad])
    out = []
    for i, r in enumerate(records):
        record = {"record_id": np.str_(r.record_id), "user_id": np.str_(r.user_id),
                  "chosen": moments[2 * i], "rejected": moments[2 * i + 1],
                  "states": states[i].astype(dtype)}
        if pooled is not None:
            record["pooled"] = pooled[i]
        out.append(cache.pack(record))
    return out


def write_sage_cache(split_dir, users_csv, pipeline_dir: str, out_dir, *, resolution: int,
                     dtype: str = "float32", batch_size: int = 8, shard_size: int = 1024,
                     policy: str = "fail", process_index: int | None = None,
                     process_count: int | None = None, progress: bool = True) -> dict:
    """Encodes the Sage split folder `split_dir` with the pipeline's VAE and text encoders into
    `out_dir`; returns the metadata. Resumable and multi-process like `cache.write_cache`."""
    cache.check_settings(dtype, resolution, batch_size, shard_size)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    records, report = read_records(split_dir, users_csv, policy)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = cache.load_encoders(pipeline_dir)
    names = cache._shard_names(-(-len(records) // shard_size))
    metadata = {
        "format": FORMAT, "source": str(Path(split_dir).resolve()), "pipeline": str(Path(pipeline_dir).resolve()),
        "resolution": resolution, "dtype": dtype, "num_examples": len(records), "shard_size": shard_size,
        "shards": names, "user_ids": [r.user_id for r in records], "categories": [r.category for r in records],
        "harmful": [r.prompt_kind == "harmful" for r in records],
        "prefers_safe": [r.chosen.name.endswith("_s.jpg") for r in records], "validation": report,
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "shift_factor": float(pipe.vae.config.shift_factor or 0.0), "sdxl": pipe.is_sdxl,
    }
    cache.write_shards(out, pipe, metadata, records, lambda batch: _encode(pipe, batch, resolution, batch_size, dtype),
                       batch_size=batch_size, shard_size=shard_size, index=index, count=count, desc="sage cache",
                       progress=progress)
    return metadata


def open_sage_cache(cache_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, empty-prompt arrays) of a complete Sage cache; fails naming missing shards."""
    return cache.open_cache(cache_dir, FORMAT, "Sage latent cache", "scripts/prepare_data.py --config.kind=sage",
                            " (a CoProV2 cache? use --config.data.source=cache)")


def cache_embeddings(folder, user_ids, dim: int, missing: str = "error") -> dict[str, np.ndarray]:
    """{user id: (dim,) float32} for every id of `user_ids`; any user without a usable
    `{id}.npy` in `folder` (missing, unreadable, wrong size, not finite) is a UserError, except
    that `missing="zeros"` gives users without a file the zero vector."""
    if missing not in MISSING_EMBEDDING:
        raise UserError(f"missing_embedding={missing!r} is not one of {', '.join(MISSING_EMBEDDING)}.")
    report = validation.Report()
    vectors = sage.load_embeddings(folder, user_ids, dim, report)
    problems = [p for p in report.problems if missing == "error" or p.kind != "missing_embedding"]
    if problems:
        first = problems[0]
        hint = (" (data.missing_embedding=zeros gives users without a file the zero vector)"
                if first.kind == "missing_embedding" else "")
        raise UserError(f"{len(problems)} user(s) of the Sage cache have no usable embedding in "
                        f"{folder}, e.g. {first.file}: {first.detail}{hint}.")
    return {u: vectors.get(u, np.zeros(dim, np.float32)) for u in sorted(set(user_ids))}


def preference_records(cache_dir, embeddings, gated_categories: Sequence[str], *, embed_dim: int,
                       missing_embedding: str = "error") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The users' preferences a Sage cache holds, for `gated.fit_gates`: its harmful-prompt records
    of the gated categories as (user embeddings (N, E) float32 from the `embeddings` folder, the
    category's position in `gated_categories` (N,) int32, prefers_safe (N,) bool: the user chose
    the safe image, i.e. bans the category). Names are matched as `categories.select` does."""
    metadata, _ = open_sage_cache(cache_dir)
    if "prefers_safe" not in metadata:
        raise UserError(f"Sage cache {cache_dir} was written before it recorded the users' preferences: rebuild it "
                        "with scripts/prepare_data.py --config.kind=sage.")
    index = np.array([categories.position(c, gated_categories) for c in metadata["categories"]], np.int32)
    rows = np.flatnonzero(np.asarray(metadata["harmful"], bool) & (index >= 0))
    if not rows.size:
        raise UserError(f"Sage cache {cache_dir} holds no harmful-prompt records of the categories "
                        f"{', '.join(gated_categories)}.")
    users = [metadata["user_ids"][r] for r in rows]
    vectors = cache_embeddings(embeddings, users, embed_dim, missing_embedding)
    return (np.stack([vectors[u] for u in users]), index[rows],
            np.asarray(metadata["prefers_safe"], bool)[rows])


class SageCachedExamples:
    """Cached Sage records as loader examples: {"id", "user_id", "preferred", "rejected"
    (VAE [mean, logvar]), "encoder_hidden_states" (+ "pooled")}."""

    def __init__(self, cache_dir):
        import grain

        self.metadata, self.empty = open_sage_cache(cache_dir)
        path = Path(cache_dir)
        self._source = grain.sources.ArrayRecordDataSource([str(path / n) for n in self.metadata["shards"]])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = cache.unpack(self._source[index])
        example = {"id": str(record["record_id"]), "user_id": str(record["user_id"]),
                   "preferred": record["chosen"].astype(np.float32),
                   "rejected": record["rejected"].astype(np.float32),
                   "encoder_hidden_states": record["states"].astype(np.float32)}
        if "pooled" in record:
            example["pooled"] = record["pooled"].astype(np.float32)
        return example


class SageCachedPairs(cache.CachedPairs):
    """The trainer's PSA batch source over a Sage cache (see safealign_jax/train/data.py): as
    `cache.CachedPairs` (seeded shuffle, per-process rows, latents drawn from the moments with a
    generator seeded by (seed, batch index, global row, image), exact resume), plus
    "user_embedding" (B, E) float32 from the `embeddings` folder (`missing_embedding`: see
    `cache_embeddings`). With `gated_categories` (the category order of a gated PSA tree) batches
    also carry "category_index" (B,) int32: where each record's category (named in its record id)
    stands there, -1 if absent (`psa.gated.route`; names matched as `categories.select` does)."""

    def __init__(self, cache_dir, embeddings, *, seed: int, global_rows: int, rows: slice,
                 embed_dim: int = 3584, flip: str = "none", num_threads: int = 4, shard=None,
                 missing_embedding: str = "error", gated_categories: Sequence[str] | None = None):
        examples = SageCachedExamples(cache_dir)
        self.vectors = cache_embeddings(embeddings, examples.metadata["user_ids"], embed_dim, missing_embedding)
        self.positions = None  # {Sage category: its gate index or -1} with gated_categories
        if gated_categories is not None:
            self.positions = {c: categories.position(c, gated_categories) for c in categories.SAGE.categories}
        self._start(examples, seed=seed, global_rows=global_rows, rows=rows, flip=flip, num_threads=num_threads,
                    shard=shard)

    def _extra(self, batch: dict) -> dict:
        out = {"user_embedding": np.stack([self.vectors[str(u)] for u in batch["user_id"]])}
        if self.positions is not None:
            out["category_index"] = np.array([self.positions[sage.parse_image_name(i).category]
                                              for i in self.last_ids()], np.int32)
        return out
