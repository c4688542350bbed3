"""Encode-once cache of a Sage split for PSA training: VAE latent moments, text states, user ids.

    write_sage_cache("sage/train", "sage/users/users.csv", pipeline_dir, out_dir, resolution=512)
    source = SageCachedPairs(out_dir, "sage/embeddings", seed=0, global_rows=8, rows=slice(0, 8))

Layout of `out_dir` (as `safealign_jax.data.cache`, format "safealign_sage_cache/1"):
    metadata.json                     settings, example count, shard names, VAE factors, and
                                      "user_ids": the user id of every record in data set order
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

import json
import os
from pathlib import Path

import jax
import numpy as np

from safealign_jax.data import cache, sage, users, validation
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
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    if dtype not in cache.DTYPES:
        raise UserError(f"cache dtype {dtype!r} is not one of {list(cache.DTYPES)}.")
    if resolution < 8 or resolution % 8:
        raise UserError(f"resolution {resolution} is not a positive multiple of 8.")
    if batch_size < 1 or shard_size < 1:
        raise UserError(f"batch_size {batch_size} and shard_size {shard_size} must be >= 1.")
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
        "shards": names, "user_ids": [r.user_id for r in records], "validation": report,
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "shift_factor": float(pipe.vae.config.shift_factor or 0.0), "sdxl": pipe.is_sdxl,
    }
    cache._check_metadata(out, metadata)
    if index == 0:
        states, pooled = cache.encode_texts(pipe, [""])
        empty = {"encoder_hidden_states": states[0]} | ({"pooled": pooled[0]} if pooled is not None else {})
        cache._write_atomic(out / cache.EMPTY, cache.pack(empty))
        cache._write_atomic(out / cache.METADATA, json.dumps(metadata, indent=1).encode())
    mine = [k for k in range(index, len(names), count) if not (out / names[k]).is_file()]
    todo = sum(len(records[k * shard_size : (k + 1) * shard_size]) for k in mine)
    with tqdm(total=todo, desc=f"sage cache (process {index})", unit="pair", disable=not progress) as bar:
        for k in mine:
            shard = records[k * shard_size : (k + 1) * shard_size]
            tmp = out / f"{names[k]}.tmp{os.getpid()}"
            writer = ArrayRecordWriter(str(tmp), "group_size:1")
            for start in range(0, len(shard), batch_size):
                for packed in _encode(pipe, shard[start : start + batch_size], resolution, batch_size, dtype):
                    writer.write(packed)
                bar.update(min(batch_size, len(shard) - start))
            writer.close()
            os.replace(tmp, out / names[k])
    return metadata


def open_sage_cache(cache_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, empty-prompt arrays) of a complete Sage cache; fails naming missing shards."""
    path = Path(cache_dir)
    if not (path / cache.METADATA).is_file():
        raise UserError(f"{path}: not a Sage latent cache (no {cache.METADATA}); build it with "
                        "scripts/prepare_data.py --config.kind=sage.")
    metadata = json.loads((path / cache.METADATA).read_text())
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path / cache.METADATA}: format {metadata.get('format')!r}, expected {FORMAT!r} "
                        "(a CoProV2 cache? use --config.data.source=cache).")
    missing = [n for n in metadata["shards"] if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: {len(missing)} shard(s) missing (e.g. {missing[0]}); rerun prepare_data.")
    return metadata, cache.unpack((path / cache.EMPTY).read_bytes())


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


class SageCachedPairs:
    """The trainer's PSA batch source over a Sage cache (see safealign_jax/train/data.py): as
    `cache.CachedPairs` (seeded shuffle, per-process rows, latents drawn from the moments with a
    generator seeded by (seed, batch index, global row, image), exact resume), plus
    "user_embedding" (B, E) float32 from the `embeddings` folder (`missing_embedding`: see
    `cache_embeddings`)."""

    def __init__(self, cache_dir, embeddings, *, seed: int, global_rows: int, rows: slice,
                 embed_dim: int = 3584, flip: str = "none", num_threads: int = 4, shard=None,
                 missing_embedding: str = "error"):
        from safealign_jax.data import loader

        examples = SageCachedExamples(cache_dir)
        meta = examples.metadata
        self.vectors = cache_embeddings(embeddings, meta["user_ids"], embed_dim, missing_embedding)
        self.seed, self.global_rows, self.rows = seed, global_rows, rows
        self.scale, self.shift, self.sdxl = meta["scaling_factor"], meta["shift_factor"], meta["sdxl"]
        self.resolution = meta["resolution"]
        self.empty_embedding = examples.empty["encoder_hidden_states"].astype(np.float32)
        self._dataset = loader.make_loader(examples, global_batch_size=global_rows, seed=seed,
                                           shard=shard or cache._shard_of(rows, global_rows),
                                           image_size=None, flip=flip, num_threads=num_threads)
        self._iter = iter(self._dataset)
        self.index = 0
        self._ids: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        rows = range(self.rows.start, self.rows.start + len(batch["id"]))
        out = {
            key: cache.sample_latents(batch[name], self.scale, self.shift,
                                      [[self.seed, self.index, r, image] for r in rows])
            for image, (key, name) in enumerate((("latents_w", "preferred"), ("latents_l", "rejected")))
        }
        self.index += 1
        self._ids = [str(i) for i in batch["id"]]
        out["encoder_hidden_states"] = batch["encoder_hidden_states"]
        out["user_embedding"] = np.stack([self.vectors[str(u)] for u in batch["user_id"]])
        if self.sdxl:
            size = float(self.resolution)
            out["added_cond"] = {
                "text_embeds": batch["pooled"],
                "time_ids": np.tile(np.float32([[size, size, 0, 0, size, size]]), (len(rows), 1)),
            }
        return out

    def last_ids(self) -> list[str]:
        """Record ids (Sage file_name) of this process's rows of the batch returned last."""
        return list(self._ids)

    def get_state(self) -> dict:
        return {"index": self.index, "loader": self._iter.get_state()}

    def set_state(self, state: dict) -> None:
        self._iter = iter(self._dataset)
        self._iter.set_state(state["loader"])
        self.index = int(state["index"])
