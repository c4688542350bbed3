"""Merging safety experts into one model (docs/METHODS.md section 2; SafetyDPO, arXiv 2412.10493). Presets = methods:
comerge (default), linear, task_arithmetic, ties, dare, fusion (least squares on the cross-attention
key / value layers, keeping each expert's own concepts; the other layers by `fusion_rest`).

    python scripts/merge.py --config configs/merge.py:comerge --workdir runs/merged \
        --config.experts=runs/experts/experts --config.calibration.cache_dir=cache/coprov2 \
        [--config.output.form=svd --config.output.rank=4]
    python scripts/merge.py --config configs/merge.py:fusion --workdir runs/fused \
        --config.experts=runs/experts/experts --config.fusion_concepts=concepts.csv \
        --config.fusion_preserve=keep.txt

The result is a checkpoint (workdir/checkpoints/0) that scripts/export.py and scripts/sample.py
accept like a trained LoRA: form "delta" keeps the full-rank merged delta (export format "unet"),
form "svd" re-factors it to a rank-`output.rank` LoRA (any export format).
"""

import ml_collections

from safealign_jax.configs import choose_preset

PRESETS = ("comerge", "linear", "task_arithmetic", "ties", "dare", "fusion")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    method = choose_preset("merge", arg, PRESETS)
    c = ml_collections.ConfigDict()
    c.method = method
    c.experts = ""  # comma-separated expert workdirs, or one folder: all its subfolders holding runs
    c.model = ""  # base model folder; "" = the path the experts were trained on
    c.weights = ""  # linear / dare: comma-separated weight per expert; "" = equal (1 / N)
    c.lam = 1.0  # task_arithmetic / ties: lambda scaling the merged task vector
    c.density = 0.2  # ties: fraction of each expert's entries kept (by magnitude, per layer)
    c.drop = 0.5  # dare: drop probability p (survivors rescaled by 1 / (1 - p))
    c.seed = 0  # dare masks
    # comerge: each expert's input statistics from the calibration set of all categories (METHODS.md s. 2)
    # ("all"), or from its own training category's prompts ("own_category", its run's data.category)
    c.statistics_from = "all"
    c.fusion_concepts = ""  # fusion: CSV expert,phrase (each expert's concepts; expert = its folder name)
    c.fusion_preserve = ""  # fusion: phrases whose base outputs are kept (.txt one per line, or .csv prompt)
    c.fusion_preserve_weight = 1.0
    c.fusion_ridge = 1e-3
    c.fusion_rest = "linear"  # fusion: the layers that do not read text states: linear | comerge

    c.comerge = ml_collections.ConfigDict()
    c.comerge.granularity = "weight"  # weight | row (one expert per output row)
    c.comerge.statistic = "mean_abs"  # mean_abs (E|x_k|, SafetyDPO) | rms (sqrt(E x_k^2))

    c.calibration = ml_collections.ConfigDict()  # comerge only
    c.calibration.cache_dir = ""  # latent cache (scripts/prepare_data.py): harmful prompts, all categories
    c.calibration.num_examples = 64
    c.calibration.batch_size = 8
    c.calibration.seed = 0  # example order, timesteps and noise
    c.calibration.latents = "noised"  # noised (cached harmful latents at random t) | noise (pure noise)

    c.output = ml_collections.ConfigDict()
    c.output.form = "delta"  # delta (full rank) | svd (rank-`rank` LoRA, reports reconstruction error)
    c.output.rank = 4
    return c
