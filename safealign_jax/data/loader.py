"""grain input pipeline: global shuffle, per-process shards, seeded augmentation, numpy batches.

    ds = make_loader(views.coprov2_examples(built, category="Violence"), global_batch_size=64,
                     seed=0)                      # shards by jax.process_index()/process_count()
    it = iter(ds)
    batch = next(it)   # {"id": (B,) str, "caption": (B,) str, "preferred": (B, H, W, 3) f32, ...}
    state = it.get_state()            # small dict of ints: save it in the checkpoint
    it = iter(ds); it.set_state(state)  # same data, same order, same flips from there on

Order of operations on the GLOBAL example stream: shuffle (seeded, reshuffled every epoch) ->
repeat -> cut to whole global batches -> decode -> flip / caption dropout (seeded by the global
position) -> batches of B = global_batch_size / P rows -> this process's batches. Process p of P
gets rows [p*B, (p+1)*B) of every global batch, the layout `jax.make_array_from_process_local_data`
expects: concatenated in process order, the local batches of step k are exactly the k-th global
batch, so neither content, order nor augmentation depends on P. Each process reads only its rows.

Images: `image_size` set -> the "preferred"/"rejected" values are encoded bytes, decoded to
float32 (S, S, 3) in [-1, 1]; `image_size=None` -> they are arrays already (cached latents,
HWC) and pass unchanged. Flips mirror the W axis of either.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from safealign_jax.data.images import decode_image, hflip
from safealign_jax.errors import UserError

PAIR_KEYS = ("preferred", "rejected")
FLIPS = ("shared", "independent", "none")


class DecodePair(grain.transforms.Map):
    """Encoded bytes of the pair -> float32 (size, size, 3) arrays in [-1, 1]."""

    def __init__(self, size: int):
        self.size = size

    def map(self, element: dict) -> dict:
        out = dict(element)
        for key in PAIR_KEYS:
            out[key] = decode_image(element[key], self.size)
        return out


class CheckArrays(grain.transforms.Map):
    """Fails clearly if images come encoded while no `image_size` was set."""

    def map(self, element: dict) -> dict:
        for key in PAIR_KEYS:
            if not isinstance(element[key], np.ndarray):
                raise UserError(
                    f"example {element.get('id')!r}: {key} is {type(element[key]).__name__}, "
                    "not an array; set image_size to decode encoded images."
                )
        return element


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip with probability 1/2: one coin for the pair ("shared", default, keeps
    the two images aligned) or one per image ("independent", the official scripts)."""

    def __init__(self, mode: str):
        self.mode = mode

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        coins = rng.random(len(PAIR_KEYS)) < 0.5
        if self.mode == "shared":
            coins[:] = coins[0]
        out = dict(element)
        for key, coin in zip(PAIR_KEYS, coins, strict=True):
            if coin:
                out[key] = hflip(element[key])
        return out


class CaptionDropout(grain.transforms.RandomMap):
    """Replaces the caption by "" with probability `rate`; "caption_dropped" records it (for
    pipelines that swap cached text embeddings instead)."""

    def __init__(self, rate: float):
        self.rate = rate

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        dropped = bool(rng.random() < self.rate)
        return {**element, "caption": "" if dropped else element["caption"], "caption_dropped": dropped}


def shard_options(shard: grain.sharding.ShardOptions | None) -> grain.sharding.ShardOptions:
    """The given shard, or this JAX process's (index, count)."""
    return shard if shard is not None else grain.sharding.ShardByJaxProcess(drop_remainder=True)


def make_loader(
    examples: Sequence[dict] | grain.MapDataset,
    *,
    global_batch_size: int,
    seed: int,
    shard: grain.sharding.ShardOptions | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    image_size: int | None = 512,
    flip: str = "shared",
    caption_dropout: float = 0.0,
    num_threads: int = 8,
    prefetch_batches: int = 4,
) -> grain.IterDataset:
    """This process's batches of `examples` (see the module docstring).

    `num_epochs=None` repeats forever; with a number, the stream ends after that many epochs,
    cut to whole global batches. `seed` drives shuffling and augmentation. `num_threads` read
    and decode batches in parallel (0 = in the caller's thread).
    """
    shard = shard_options(shard)
    if global_batch_size <= 0 or global_batch_size % shard.shard_count:
        raise UserError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"{shard.shard_count} data process(es)."
        )
    if flip not in FLIPS:
        raise UserError(f"flip {flip!r} is not one of {', '.join(FLIPS)}.")
    if not 0.0 <= caption_dropout <= 1.0:
        raise UserError(f"caption_dropout {caption_dropout} is not a probability in [0, 1].")
    ds = examples if isinstance(examples, grain.MapDataset) else grain.MapDataset.source(examples)
    if len(ds) < global_batch_size:
        raise UserError(f"{len(ds)} examples cannot fill one global batch of {global_batch_size}.")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        ds = ds[: len(ds) // global_batch_size * global_batch_size]
    ds = ds.map(DecodePair(image_size) if image_size else CheckArrays())
    if flip != "none":
        ds = ds.random_map(RandomFlip(flip), seed=seed + 1)
    if caption_dropout:
        ds = ds.random_map(CaptionDropout(caption_dropout), seed=seed + 2)
    # Rows of one process are consecutive: mini-batch m holds global positions [m*B, (m+1)*B),
    # global batch k is mini-batches [k*P, (k+1)*P), and process p keeps mini-batch k*P + p.
    ds = ds.batch(global_batch_size // shard.shard_count, drop_remainder=True)
    ds = ds[shard.shard_index :: shard.shard_count]
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    )
