"""scripts/prepare_data.py: encode a data set once into a latent cache.

    # your own pairs: a CSV / JSONL / parquet table with prompt, chosen, rejected
    # [, category, safe_prompt] (README "Bring your own data")
    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/mine \
        --config.pipeline=/models/sd15 --config.kind=pairs --config.table=pairs/train.csv

    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/sd15 \
        --config.pipeline=/models/sd15 --config.dataset=data/coprov2_pairs/1.0.0
    # or build the TFDS data set first from the released CSV + image folder (or parquet):
    python scripts/prepare_data.py --config configs/prepare_data.py --workdir cache/sd15 \
        --config.pipeline=/models/sd15 --config.table=CoProv2_train.csv --config.images=images \
        --config.tfds_dir=data
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.kind = "coprov2"  # coprov2 | sage (PSA: a Sage split folder, see sage_split) | pairs (your table)
    config.sage_split = ""  # kind=sage: split folder with metadata.jsonl and the images
    config.users_csv = ""  # kind=sage: sage/users/users.csv
    config.pipeline = ""  # diffusers SD / SDXL pipeline folder (its VAE and text encoders)
    config.dataset = ""  # built coprov2_pairs version folder; "" = build from table + images/parquet
    config.table = ""  # CoProv2_train.csv (when dataset is ""); kind=pairs: the pairs table (.csv/.jsonl/.parquet)
    config.images = ""  # image folder (u_idx_NNNNNNN_0.jpg / s_idx_...; or the parquet's file names)
    config.parquet = ""  # comma-separated parquet files; jpg_0/jpg_1 file names resolve against images
    config.tfds_dir = ""  # where the TFDS data set is built (when dataset is ""); kind=pairs: "" = WORKDIR/dataset
    config.policy = "skip"  # bad source rows: skip (reported in the metadata) or fail
    config.split = "train"
    config.resolution = 512  # pixels (shorter side resized, centre crop); 1024 for SDXL
    config.dtype = "float32"  # float32 | float16 storage of latent moments and text states
    config.batch_size = 8  # pairs per encoder call
    config.shard_size = 1024  # pairs per array_record shard (the unit of resuming)
    config.progress_bar = True
    return config
