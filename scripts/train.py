"""Diffusion-DPO LoRA training (SafetyDPO). Resumes automatically from `--workdir`.

    python scripts/train.py --config configs/train.py[:tiny|sd15|sd21|sdxl] --workdir runs/x \
        [--config.model.path=/models/sd15 --config.train.steps=2000 ...]
"""

import json

from safealign_jax import cli
from safealign_jax.train.loop import train

CONFIG = cli.define_flags()


def main(config, workdir):
    _, summary = train(config, workdir)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run(main, CONFIG)
