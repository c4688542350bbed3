"""scripts/make_tiny_pipeline.py: a tiny random-weight pipeline folder (and pairs) for a
walkthrough without downloaded weights (README "5-minute walkthrough").

    python scripts/make_tiny_pipeline.py --config configs/make_tiny_pipeline.py:sd --workdir tiny \
        --config.pairs=8
"""

import ml_collections

KINDS = ("sd", "sdxl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.kind = arg or "sd"  # sd (SD1-like, DDIM) | sdxl (SDXL-like, Euler)
    config.pairs = 0  # > 0: also write WORKDIR/pairs/pairs.csv with that many pairs and their images
    config.seed = 0  # of the pairs' images
    return config
