"""Encode-once cache of a built CoProV2 data set: VAE latent moments and text embeddings.

    write_cache(built_dir, pipeline_dir, out_dir, resolution=512)   # resumable, multi-host
    examples = cached_examples(out_dir, category="Hate")            # loader.make_loader(..., image_size=None)

Layout of `out_dir`:
    metadata.json                     settings, example count, shard names, category index,
                                      VAE scaling_factor / shift_factor
    empty_prompt.npz                  "encoder_hidden_states" (S, D) (+ "pooled" (P,) for SDXL)
                                      of the empty prompt, for caption dropout
    shard-KKKKK-of-NNNNN.array_record one record per pair (in data set order): an `np.savez`
                                      archive with "pair_id", "categories",
                                      "preferred" / "rejected" = VAE [mean, logvar] (h, w, 2C)
                                      and "harmful_states" / "safe_states" (S, D)
                                      (+ "harmful_pooled" / "safe_pooled" (P,) for SDXL)

Mean and logvar are concatenated on the channel axis so the loader's flips mirror both alike;
a training step draws z = mean + exp(logvar / 2) * eps (see `sample_latents`). Shard k holds
pairs [k * shard_size, (k + 1) * shard_size); process i of n encodes shards i::n. A shard is
written to a temporary name and renamed when complete, so a rerun skips finished shards and never
sees a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.data import categories, coprov2, views
from safealign_jax.data.images import decode_image
from safealign_jax.errors import UserError
from safealign_jax.models.embeddings import sdxl_time_ids

FORMAT = "safealign_latent_cache/1"
DTYPES = ("float32", "float16")
METADATA = "metadata.json"
EMPTY = "empty_prompt.npz"


def pack(record: dict[str, np.ndarray]) -> bytes:
    """A dict of numpy arrays -> bytes (an uncompressed `.npz`, read without pickle)."""
    out = io.BytesIO()
    np.savez(out, **record)
    return out.getvalue()


# np.load parses each array header with ast.literal_eval, and CPython 3.11's parser is not safe
# to run in several threads at once ("SystemError: AST constructor recursion depth mismatch",
# seen with the loader's prefetch threads): headers are parsed one thread at a time.
_HEADER_LOCK = threading.Lock()


def unpack(data: bytes) -> dict[str, np.ndarray]:
    with _HEADER_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_encoders(pipeline_dir: str):
    """The VAE, text encoders and tokenizers of a diffusers pipeline folder (no UNet), as a
    `safealign_jax.pipeline.Pipeline` usable by `encode_prompts`."""
    from safealign_jax.convert.checkpoint import read_config
    from safealign_jax.models import load_text_encoder, load_tokenizer, load_vae
    from safealign_jax.pipeline import Pipeline

    if not (Path(pipeline_dir) / "model_index.json").is_file():
        raise UserError(f"{pipeline_dir}: not a diffusers pipeline folder (no model_index.json).")
    suffixes = ["", "_2"] if "text_encoder_2" in read_config(pipeline_dir, "model_index.json") else [""]
    encoders = [load_text_encoder(pipeline_dir, f"text_encoder{s}") for s in suffixes]
    vae, vae_params = load_vae(pipeline_dir)
    return Pipeline(
        unet=None, unet_params=None, vae=vae, vae_params=vae_params,
        text_encoders=[m for m, _ in encoders], text_params=[p for _, p in encoders],
        tokenizers=[load_tokenizer(pipeline_dir, f"tokenizer{s}") for s in suffixes], scheduler=None,
    )


@partial(jax.jit, static_argnums=0)
def _vae_moments(vae, params, images):
    mean, logvar = vae.apply({"params": params}, images, method="encode")
    return jnp.concatenate([mean, logvar], axis=-1)


def encode_texts(pipe, prompts: list[str], batch: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(states (B, S, D), pooled (B, P) or None) float32, as `pipeline.encode_prompts`; with
    `batch`, in chunks of `batch` prompts padded with "" (one compiled shape for any count)."""
    from safealign_jax.pipeline import encode_prompts

    if batch is None:
        states, pooled = encode_prompts(pipe, prompts)
        return np.asarray(states, np.float32), None if pooled is None else np.asarray(pooled, np.float32)
    parts = [encode_texts(pipe, prompts[i:i + batch] + [""] * max(0, i + batch - len(prompts)))
             for i in range(0, len(prompts), batch)]
    states = np.concatenate([s for s, _ in parts])[: len(prompts)]
    pooled = None if parts[0][1] is None else np.concatenate([p for _, p in parts])[: len(prompts)]
    return states, pooled


def encode_images(pipe, images: np.ndarray) -> np.ndarray:
    """(B, S, S, 3) in [-1, 1] -> VAE [mean, logvar] (B, S/f, S/f, 2C) float32."""
    return np.asarray(_vae_moments(pipe.vae, pipe.vae_params, jnp.asarray(images)))


def _shard_names(count: int) -> list[str]:
    return [f"shard-{k:05d}-of-{count:05d}.array_record" for k in range(count)]


def _check_metadata(out: Path, metadata: dict) -> None:
    path = out / METADATA
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(metadata) if old.get(k) != metadata.get(k))
        if changed:
            raise UserError(f"{out}: holds a cache made with other settings ({', '.join(changed)}); "
                            "use another out_dir or delete it.")


def _encode_pairs(pipe, records: list[dict], resolution: int, batch_size: int, dtype: str) -> list[bytes]:
    """Packed cache records of `records` (raw coprov2_pairs records), encoded in batches of
    `batch_size` (the last one padded, so the encoders compile once)."""
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pad = chunk + [chunk[-1]] * (batch_size - len(chunk))
        images = np.stack([decode_image(r[k], resolution) for r in pad
                           for k in ("preferred_image", "rejected_image")])
        moments = encode_images(pipe, images).astype(dtype)
        texts = [views._text(r[f"{kind}_prompt"]) for kind in ("harmful", "safe") for r in pad]
        states, pooled = encode_texts(pipe, texts)
        for i, r in enumerate(chunk):
            record = {
                "pair_id": np.str_(views._text(r["pair_id"])),
                "categories": np.array([views._text(c) for c in r["categories"]], dtype=np.str_),
                "preferred": moments[2 * i], "rejected": moments[2 * i + 1],
                "harmful_states": states[i].astype(dtype), "safe_states": states[batch_size + i].astype(dtype),
            }
            if pooled is not None:
                record["harmful_pooled"] = pooled[i]
                record["safe_pooled"] = pooled[batch_size + i]
            out.append(pack(record))
    return out


def check_settings(dtype: str, resolution: int, batch_size: int, shard_size: int) -> None:
    """UserError unless the cache settings are usable (shared by every kind of cache)."""
    if dtype not in DTYPES:
        raise UserError(f"cache dtype {dtype!r} is not one of {list(DTYPES)}.")
    if resolution < 8 or resolution % 8:
        raise UserError(f"resolution {resolution} is not a positive multiple of 8.")
    if batch_size < 1 or shard_size < 1:
        raise UserError(f"batch_size {batch_size} and shard_size {shard_size} must be >= 1.")


def write_shards(out: Path, pipe, metadata: dict, items, encode: Callable[[list], list[bytes]], *,
                 batch_size: int, shard_size: int, index: int, count: int, desc: str, progress: bool) -> None:
    """Writes a cache into `out` (any kind: `encode(items) -> packed records`, in batches of
    `batch_size`): process 0 first writes the empty prompt's text states and `metadata`, then each
    process encodes its shards index::count of metadata["shards"] not yet present, each written
    to a temporary file that is renamed into place (resumable; no partial shard after a crash)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    _check_metadata(out, metadata)
    if index == 0:
        states, pooled = encode_texts(pipe, [""])
        empty = {"encoder_hidden_states": states[0]} | ({"pooled": pooled[0]} if pooled is not None else {})
        _write_atomic(out / EMPTY, pack(empty))
        _write_atomic(out / METADATA, json.dumps(metadata, indent=1).encode())
    names = metadata["shards"]
    mine = [k for k in range(index, len(names), count) if not (out / names[k]).is_file()]
    todo = sum(min(shard_size, len(items) - k * shard_size) for k in mine)
    with tqdm(total=todo, desc=f"{desc} (process {index})", unit="pair", disable=not progress) as bar:
        for k in mine:
            shard = [items[i] for i in range(k * shard_size, min(len(items), (k + 1) * shard_size))]
            tmp = out / f"{names[k]}.tmp{os.getpid()}"
            writer = ArrayRecordWriter(str(tmp), "group_size:1")
            for start in range(0, len(shard), batch_size):
                for packed in encode(shard[start : start + batch_size]):
                    writer.write(packed)
                bar.update(min(batch_size, len(shard) - start))
            writer.close()
            os.replace(tmp, out / names[k])


def write_cache(built_dir, pipeline_dir: str, out_dir, *, resolution: int, split: str = "train",
                dtype: str = "float32", batch_size: int = 8, shard_size: int = 1024,
                process_index: int | None = None, process_count: int | None = None,
                progress: bool = True) -> dict:
    """Encodes `split` of a built coprov2_pairs data set (builder or version folder) with the
    pipeline's VAE and text encoders into `out_dir`; returns the metadata. Shards already present
    are skipped; this process writes shards process_index::process_count (default: JAX's)."""
    check_settings(dtype, resolution, batch_size, shard_size)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    source, built_meta = views.open_built(built_dir, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_encoders(pipeline_dir)
    names = _shard_names(max(1, -(-len(source) // shard_size)))
    metadata = {
        "format": FORMAT, "source": str(Path(getattr(built_dir, "data_dir", built_dir)).resolve()),
        "split": split, "pipeline": str(Path(pipeline_dir).resolve()), "resolution": resolution,
        "dtype": dtype, "num_examples": len(source), "shard_size": shard_size, "shards": names,
        "category_index": built_meta.get("category_index", {}),
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        "shift_factor": float(pipe.vae.config.shift_factor or 0.0),
        "sdxl": pipe.is_sdxl,
    }
    write_shards(out, pipe, metadata, source, lambda batch: _encode_pairs(pipe, batch, resolution, batch_size, dtype),
                 batch_size=batch_size, shard_size=shard_size, index=index, count=count, desc="cache",
                 progress=progress)
    return metadata


def open_cache(cache_dir, form: str = FORMAT, kind: str = "latent cache", build: str = "scripts/prepare_data.py",
               other: str = "") -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, empty-prompt arrays) of a complete cache of format `form`; fails naming missing
    shards (`kind`, `build`: how messages name the cache and the command that builds it; `other`:
    said after a wrong format)."""
    path = Path(cache_dir)
    if not (path / METADATA).is_file():
        raise UserError(f"{path}: not a {kind} (no {METADATA}); build it with {build}.")
    metadata = json.loads((path / METADATA).read_text())
    if metadata.get("format") != form:
        raise UserError(f"{path / METADATA}: format {metadata.get('format')!r}, expected {form!r}{other}.")
    missing = [n for n in metadata["shards"] if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path}: {len(missing)} shard(s) missing (e.g. {missing[0]}); rerun prepare_data.")
    return metadata, unpack((path / EMPTY).read_bytes())


class CachedExamples:
    """Cached CoProV2 pairs as loader examples: {"id", "caption_kind", "preferred", "rejected"
    (VAE [mean, logvar] arrays), "encoder_hidden_states" (+ "pooled")}; optionally one
    category's pairs (or several: 'Hate,Violence'; any category of the cache's index, free text
    for your own pairs), optionally each pair twice (harmful and safe caption), as CoProV2Examples."""

    def __init__(self, cache_dir, category: str | None = None, both_captions: bool = False):
        import grain

        self.metadata, self.empty = open_cache(cache_dir)
        path = Path(cache_dir)
        self._source = grain.sources.ArrayRecordDataSource([str(path / n) for n in self.metadata["shards"]])
        positions = range(len(self._source))
        if category is not None:  # one category, or several separated by commas
            selected = set()
            index = self.metadata["category_index"]
            for spelling in category.split(","):
                selected.update(index[categories.select(spelling.strip(), index, f"--config.data.category ({path})")])
            positions = sorted(selected)
        self._choices = [(positions[i], kind)
                         for i, kind in coprov2.caption_choices(len(positions), both_captions)]

    def __len__(self) -> int:
        return len(self._choices)

    def __getitem__(self, index: int) -> dict:
        position, kind = self._choices[index]
        record = unpack(self._source[position])
        example = {
            "id": f"{record['pair_id']}/{kind}",
            "preferred": record["preferred"].astype(np.float32),
            "rejected": record["rejected"].astype(np.float32),
            "encoder_hidden_states": record[f"{kind}_states"].astype(np.float32),
        }
        if f"{kind}_pooled" in record:
            example["pooled"] = record[f"{kind}_pooled"].astype(np.float32)
        return example


def sample_latents(moments: np.ndarray, scaling_factor: float, shift_factor: float,
                   seeds: list) -> np.ndarray:
    """UNet latents (B, h, w, C) from VAE moments (B, h, w, 2C): z = mean + exp(logvar / 2) * eps,
    eps of row b from `np.random.default_rng(seeds[b])` (an int or a list of ints), then
    (z - shift) * scaling."""
    mean, logvar = np.split(moments, 2, axis=-1)
    eps = np.stack([np.random.default_rng(s).standard_normal(mean.shape[1:], np.float32) for s in seeds])
    return ((mean + np.exp(0.5 * logvar) * eps) - shift_factor) * scaling_factor


class CachedPairs:
    """The trainer's batch source over a latent cache (see safealign_jax/train/data.py).

    Reads `cached_examples` with `loader.make_loader` (seeded shuffle, this process's rows),
    draws each image's latent from its cached moments with a generator seeded by (seed, batch
    index, global row, image), so a resumed run (`set_state`) continues exactly. `empty_embedding`
    is the cached empty-prompt embedding (S, D) for caption dropout. `num_threads` read and
    unpack records ahead of the trainer (grain prefetch; the order and resume stay exact).
    """

    def __init__(self, cache_dir, *, seed: int, global_rows: int, rows: slice,
                 category: str | None = None, both_captions: bool = False, flip: str = "none",
                 num_threads: int = 4, shard=None):
        self._start(CachedExamples(cache_dir, category, both_captions), seed=seed, global_rows=global_rows,
                    rows=rows, flip=flip, num_threads=num_threads, shard=shard)

    def _start(self, examples, *, seed: int, global_rows: int, rows: slice, flip: str, num_threads: int,
               shard) -> None:
        """Reads `examples` (a cache's examples with "id", "preferred", "rejected",
        "encoder_hidden_states" [, "pooled"]) from the start; the constructors' common part."""
        from safealign_jax.data import loader

        meta = examples.metadata
        self.seed, self.global_rows, self.rows = seed, global_rows, rows
        self.scale, self.shift, self.sdxl = meta["scaling_factor"], meta["shift_factor"], meta["sdxl"]
        self.resolution = meta["resolution"]
        self.empty_embedding = examples.empty["encoder_hidden_states"].astype(np.float32)
        self._dataset = loader.make_loader(examples, global_batch_size=global_rows, seed=seed,
                                           shard=shard or _shard_of(rows, global_rows),
                                           image_size=None, flip=flip, num_threads=num_threads)
        self._iter = iter(self._dataset)
        self.index = 0
        self._last_ids: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        self._last_ids = [x.decode() if isinstance(x, bytes) else str(x) for x in batch["id"]]
        rows = range(self.rows.start, self.rows.start + len(batch["id"]))
        latents = {
            key: sample_latents(batch[name], self.scale, self.shift,
                                [[self.seed, self.index, r, image] for r in rows])
            for image, (key, name) in enumerate((("latents_w", "preferred"), ("latents_l", "rejected")))
        }
        self.index += 1
        out = {**latents, "encoder_hidden_states": batch["encoder_hidden_states"], **self._extra(batch)}
        if self.sdxl:
            size = float(self.resolution)
            out["added_cond"] = {
                "text_embeds": batch["pooled"],
                "time_ids": sdxl_time_ids(len(rows), size),
            }
        return out

    def _extra(self, batch: dict) -> dict:
        """Entries a kind of cache adds to each batch (e.g. the PSA user embeddings); none here."""
        return {}

    def last_ids(self) -> list[str]:
        """Example ids of this process's rows of the batch returned last (for error reports)."""
        return list(self._last_ids)

    def get_state(self) -> dict:
        return {"index": self.index, "loader": self._iter.get_state()}

    def set_state(self, state: dict) -> None:
        self._iter = iter(self._dataset)
        self._iter.set_state(state["loader"])
        self.index = int(state["index"])


def _shard_of(rows: slice, global_rows: int):
    """grain ShardOptions of a process feeding the contiguous `rows` of each global batch."""
    import grain

    size = rows.stop - rows.start
    if size <= 0 or global_rows % size or rows.start % size:
        raise UserError(f"rows {rows.start}:{rows.stop} of {global_rows} are not an equal contiguous share.")
    return grain.sharding.ShardOptions(shard_index=rows.start // size, shard_count=global_rows // size)
