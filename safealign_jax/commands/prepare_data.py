"""Encodes a data set once (VAE latent moments + text embeddings) into --workdir, the cache read
by training with --config.data.source=cache --config.data.cache_dir=WORKDIR.

Your own pairs (README "Bring your own data"): a CSV / JSONL / parquet table with the columns
prompt, chosen, rejected [, category, safe_prompt], images as paths relative to the table (or
bytes); built into WORKDIR/dataset (or --config.tfds_dir), then encoded:

    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/mine \
        --config.pipeline=/models/sd15 --config.kind=pairs --config.table=pairs/train.csv

A built CoProV2 data set:

    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/sd15 \
        --config.pipeline=/models/sd15 --config.dataset=data/coprov2_pairs/1.0.0

Sage (PSA) split folder (metadata.jsonl + images) instead, for --config.data.source=sage_cache:

    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/sage_sd15 \
        --config.kind=sage --config.pipeline=/models/sd15 --config.sage_split=sage/train \
        --config.users_csv=sage/users/users.csv

Every kind prints the pairs kept, the rows left out per reason, and writes the full report (each
row left out with its file and line) to WORKDIR/data_report.json. Resumable: finished shards are
skipped. Multi-host: run it on every process (after jax.distributed.initialize via the usual
environment); process i encodes shards i::n. Formats: safealign_jax/data/cache.py,
safealign_jax/data/sage_cache.py, safealign_jax/data/pairs.py.

Installed as `safealign-prepare-data` (scripts/prepare_data.py in the checkout).
"""

import json
import os

from safealign_jax import cli
from safealign_jax.errors import UserError
from safealign_jax.models.resolve import resolve_model

KINDS = ("coprov2", "sage", "pairs")
REPORT = "data_report.json"


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
    if not builder.is_built():
        print(f"building the CoProV2 data set from {config.table} into {builder.data_dir}")
    builder.download_and_prepare()
    return str(builder.data_dir)


def built_pairs(config, workdir: str) -> str:
    """The built preference_pairs version folder of --config.table (built unless done)."""
    from safealign_jax.data import pairs
    from safealign_jax.data.tfds_builders import PreferencePairs

    if not config.table:
        raise UserError("--config.kind=pairs needs --config.table: a .csv, .jsonl or .parquet file with "
                        "the columns prompt, chosen, rejected [, category, safe_prompt].")
    table = pairs.load_table(config.table, config.policy)
    builder = PreferencePairs(table=table, data_dir=config.tfds_dir or os.path.join(workdir, "dataset"))
    if builder.is_built():
        if builder.info.metadata.get("table_sha256") != pairs.file_sha256(config.table):
            raise UserError(f"{builder.data_dir}: holds pairs built from another version of "
                            f"{config.table}; delete it or give another --config.tfds_dir.")
    else:
        print(f"building the pairs data set from {config.table} into {builder.data_dir}")
    builder.download_and_prepare()
    return str(builder.data_dir)


def report_data(validation: dict, num_examples: int, workdir: str) -> str:
    """Writes the full validation report to WORKDIR/data_report.json; returns one line with the
    pairs kept and the rows left out per reason."""
    path = os.path.join(workdir, REPORT)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(validation, f, indent=1, ensure_ascii=False)
    counts = validation.get("counts", {})
    reasons = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    return (f"data: kept {num_examples} pair(s); left out {sum(counts.values())} row(s)"
            f"{f' ({reasons})' if reasons else ''}; full report: {path}")


def run(config, workdir):
    from safealign_jax.data import views
    from safealign_jax.data.cache import write_cache

    if not config.pipeline:
        raise UserError("--config.pipeline is empty: give a diffusers pipeline folder.")
    config.pipeline = resolve_model(config.pipeline, "--config.pipeline")  # a hub id: its cache folder
    if config.kind not in KINDS:
        raise UserError(f"--config.kind={config.kind!r} is not one of {list(KINDS)}.")
    if not config.progress_bar:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
    keys = ("num_examples", "shards", "resolution", "dtype")
    if config.kind == "sage":
        from safealign_jax.data.sage_cache import write_sage_cache

        if not (config.sage_split and config.users_csv):
            raise UserError("--config.kind=sage needs --config.sage_split (folder with metadata.jsonl "
                            "and images) and --config.users_csv.")
        metadata = write_sage_cache(config.sage_split, config.users_csv, config.pipeline, workdir,
                                    resolution=config.resolution, dtype=config.dtype,
                                    batch_size=config.batch_size, shard_size=config.shard_size,
                                    policy=config.policy, progress=config.progress_bar)
        print(report_data(metadata["validation"], metadata["num_examples"], workdir))
        print(json.dumps({k: metadata[k] for k in keys}))
        return
    if config.kind == "pairs":
        if not os.path.isfile(os.path.join(config.pipeline, "model_index.json")):
            raise UserError(f"--config.pipeline={config.pipeline}: not a diffusers pipeline folder "
                            "(no model_index.json).")
        dataset = built_pairs(config, workdir)
    else:
        dataset = built_dataset(config)
    metadata = write_cache(dataset, config.pipeline, workdir,
                           resolution=config.resolution, split=config.split, dtype=config.dtype,
                           batch_size=config.batch_size, shard_size=config.shard_size,
                           progress=config.progress_bar)
    validation = views.open_built(dataset, config.split)[1].get("validation", {})
    print(report_data(validation, metadata["num_examples"], workdir))
    print(json.dumps({k: metadata[k] for k in keys}))


def main() -> None:
    cli.main(run)
