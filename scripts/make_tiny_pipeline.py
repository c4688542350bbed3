"""Writes a tiny random-weight Stable Diffusion pipeline folder (diffusers save_pretrained layout,
16 px images) to WORKDIR/pipeline, and with --config.pairs=N a pairs table for
`prepare_data.py --config.kind=pairs` to WORKDIR/pairs/pairs.csv (+ images/): everything the
README's 5-minute walkthrough needs, without downloading weights. Needs the torch extra.

    python scripts/make_tiny_pipeline.py --config configs/make_tiny_pipeline.py:sd --workdir tiny \
        --config.pairs=8

Its images are noise: the folder exercises prepare -> train -> export -> load, not quality.
"""

import importlib.util
import json
import os

from safealign_jax import cli
from safealign_jax.configs.make_tiny_pipeline import KINDS
from safealign_jax.errors import UserError

CONFIG = cli.define_flags()


def main(config, workdir):
    if config.kind not in KINDS:
        raise UserError(f"--config.kind={config.kind!r} is not one of {list(KINDS)}.")
    if config.pairs < 0:
        raise UserError(f"--config.pairs={config.pairs} is invalid (expected an integer >= 0).")
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the tiny pipeline needs the torch extra (no {', '.join(missing)}): "
                        "pip install 'safealign_jax[torch]'.")
    from safealign_jax import tiny_pipeline

    write = tiny_pipeline.write_sd if config.kind == "sd" else tiny_pipeline.write_sdxl
    cli.output_folder(workdir)
    out = {"pipeline": write(os.path.join(workdir, "pipeline"))}
    if config.pairs:
        out["pairs"] = tiny_pipeline.write_pairs(os.path.join(workdir, "pairs"), config.pairs, config.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    cli.run(main, CONFIG)
