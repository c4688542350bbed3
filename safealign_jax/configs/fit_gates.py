"""Gates of a user-gated PSA run fitted to users' preference records (safealign_jax/gated.py,
`fit_gates`) instead of trained with DPO: per category, the Bradley-Terry model
P(user u prefers the safe image) = sigmoid(u W_c + b_c), fitted by ridge maximum likelihood to the
harmful-prompt records of a Sage cache (Sage's rule: chosen = the safe image iff the user bans it).

    python scripts/fit_gates.py --config configs/fit_gates.py --workdir runs/gates \
        --config.experts=runs/erase_hate,runs/erase_violence --config.categories=Hate,Violence \
        --config.cache_dir=cache/sage --config.embeddings=embeddings

The result is a gated run (workdir/checkpoints/0) that scripts/sample.py and scripts/export.py
(format gated) accept like one trained with `psa.variant=gated`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.experts = ""  # comma-separated run folders (LoRA or delta runs), one per category, in gate order
    c.categories = ""  # comma-separated category names, same order ("" = the folder names)
    c.rank = 0  # SVD factor rank per layer (0 = exact)
    c.cache_dir = ""  # Sage latent cache (scripts/prepare_data.py --config.kind=sage)
    c.embeddings = ""  # folder of {user_id}.npy user embeddings
    c.embed_dim = 3584  # E (Qwen2.5-7B-Instruct: 3584)
    c.missing_embedding = "error"  # error | zeros
    c.l2 = 1e-3  # ridge on W_c and b_c (mean logistic loss + l2/2 |w|^2)
    c.hard = True  # sampling / export use the gates thresholded at 0.5 (each category on or off)
    return c
