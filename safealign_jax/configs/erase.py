"""Closed-form concept editing of the UNet's cross-attention key / value layers (UCE / MACE family;
safealign_jax/erase.py): no training, one least-squares solve.

    python scripts/erase.py --config configs/erase.py --workdir runs/erase \
        --config.model=/models/sd15 --config.edits=edits.csv [--config.preserve=keep.txt] \
        [--config.preserve_weight=1.0] [--config.ridge=1e-3] [--config.output.form=svd]

edits: CSV with columns source,target (a word, phrase or whole prompt each; an empty target erases
toward the empty prompt). preserve: phrases whose outputs are kept, one per line (.txt) or a
.csv with a prompt column. The result is a run (workdir/checkpoints/0) that scripts/sample.py,
export.py and evaluate.py accept like a merge: form "delta" keeps the full-rank edit (export
format "unet"), form "svd" re-factors it to a rank-`output.rank` LoRA (any export format).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.model = ""  # diffusers pipeline folder (text encoder(s) + UNet)
    c.variant = ""  # weights variant, e.g. "fp16"
    c.edits = ""  # CSV source,target
    c.preserve = ""  # .txt (one phrase per line) or .csv (prompt column); "" = preserve nothing
    c.preserve_weight = 1.0  # lambda_p: 1 keeps safe words (adherence); 0.1 erases harder
    c.ridge = 1e-3  # pull of the edited kernels towards the base ones
    c.layers = r"(^|/)attn2/(to_k|to_v)$"  # edited Dense layers (must read text states); = erase.TEXT_KEYED
    c.output = ml_collections.ConfigDict()
    c.output.form = "delta"  # delta (full rank) | svd (rank-`rank` LoRA, reports reconstruction error)
    c.output.rank = 4
    return c
