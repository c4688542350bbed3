"""The demo (README's `make demo`).

Until the synthetic safety world lands, the demo is the smallest real thing the project does:
build a small random diffusers UNet in PyTorch, save it in the diffusers layout, load it with
the Flax port and compare predictions.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.family = arg or "sd1"  # sd1 | sd2 | sdxl: which UNet structure to check
    config.batch = 2
    config.latent_size = 32
    return config
