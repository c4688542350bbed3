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

The command is safealign_jax/commands/prepare_data.py (installed as `safealign-prepare-data`); `main(config, workdir)`
is its work, as in every script.
"""

from safealign_jax.commands import prepare_data as command

main = command.run

if __name__ == "__main__":
    command.main()
