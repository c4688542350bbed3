"""Encodes a CoProV2 data set once (VAE latent moments + text embeddings) into --workdir, the
cache read by training with --config.data.source=cache --config.data.cache_dir=WORKDIR.

    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/sd15 \
        --config.pipeline=/models/sd15 --config.dataset=data/coprov2_pairs/1.0.0

Sage (PSA) split folder (metadata.jsonl + images) instead, for --config.data.source=sage_cache:

    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/sage_sd15 \
        --config.kind=sage --config.pipeline=/models/sd15 --config.sage_split=sage/train \
        --config.users_csv=sage/users/users.csv

Resumable: finished shards are skipped. Multi-host: run it on every process (after
jax.distributed.initialize via the usual environment); process i encodes shards i::n.
Formats: safealign_jax/data/cache.py, safealign_jax/data/sage_cache.py.
"""

import json

from safealign_jax import cli
from safealign_jax.errors import UserError

CONFIG = cli.define_flags()


def built_dataset(config) -> str:
    """The built coprov2_pairs version folder: config.dataset, or built from the sources."""
    if config.dataset:
        return config.dataset
    if not (config.table and config.tfds_dir and (config.images or config.parquet)):
        raise UserError("--config.dataset is empty: give it, or --config.table, --config.tfds_dir "
                        "and --config.images or --config.parquet to build it.")
    from safealign_jax.data.tfds_builders import CoProV2Pairs

    parquet = [p for p in config.parquet.split(",") if p]
    builder = CoProV2Pairs(table=config.table, images=config.images or None, parquet=parquet,
                           policy=config.policy, data_dir=config.tfds_dir)
    builder.download_and_prepare()
    return str(builder.data_dir)


def main(config, workdir):
    from safealign_jax.data.cache import write_cache

    if not config.pipeline:
        raise UserError("--config.pipeline is empty: give a diffusers pipeline folder.")
    if config.kind not in ("coprov2", "sage"):
        raise UserError(f"--config.kind={config.kind!r} is not one of ['coprov2', 'sage'].")
    if config.kind == "sage":
        from safealign_jax.data.sage_cache import write_sage_cache

        if not (config.sage_split and config.users_csv):
            raise UserError("--config.kind=sage needs --config.sage_split (folder with metadata.jsonl "
                            "and images) and --config.users_csv.")
        metadata = write_sage_cache(config.sage_split, config.users_csv, config.pipeline, workdir,
                                    resolution=config.resolution, dtype=config.dtype,
                                    batch_size=config.batch_size, shard_size=config.shard_size,
                                    policy=config.policy, progress=config.progress_bar)
        print(json.dumps({k: metadata[k] for k in ("num_examples", "shards", "resolution", "dtype")}))
        return
    metadata = write_cache(built_dataset(config), config.pipeline, workdir,
                           resolution=config.resolution, split=config.split, dtype=config.dtype,
                           batch_size=config.batch_size, shard_size=config.shard_size,
                           progress=config.progress_bar)
    print(json.dumps({k: metadata[k] for k in ("num_examples", "shards", "resolution", "dtype")}))


if __name__ == "__main__":
    cli.run(main, CONFIG)
