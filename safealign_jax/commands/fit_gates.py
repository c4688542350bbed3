"""Gates of a user-gated PSA run fitted to a Sage cache's preference records; see configs/fit_gates.py.

    python scripts/fit_gates.py --config configs/fit_gates.py --workdir runs/gates \
        --config.experts=runs/erase_hate,runs/erase_violence --config.categories=Hate,Violence \
        --config.cache_dir=cache/sage --config.embeddings=embeddings

Writes workdir/checkpoints/0 (a {"gated"} run) and workdir/fit_gates_summary.json; prints, per
category, the records used, the share whose user chose the safe image and how many of them the
thresholded gate gets right, then the summary as one JSON line.

Installed as `safealign-fit-gates` (scripts/fit_gates.py in the checkout).
"""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from safealign_jax import cli, gated
from safealign_jax.data.sage_cache import preference_records
from safealign_jax.errors import check
from safealign_jax.runs import save_trained
from safealign_jax.trained import load_trained


def run(config, workdir):
    check(bool(config.cache_dir), "--config.cache_dir is empty: give a Sage latent cache.")
    check(bool(config.embeddings), "--config.embeddings is empty: give the folder of {user_id}.npy embeddings.")
    check(not os.path.isdir(os.path.join(workdir, "checkpoints", "0")),
          f"{workdir}: already holds a checkpoint 0; choose another workdir.")
    from safealign_jax.train.loop import gated_experts

    psa = {"enable": True, "variant": "gated", "embed_dim": config.embed_dim,
           "gated": {"experts": config.experts, "categories": config.categories, "rank": config.rank,
                     "hard": config.hard}}
    deltas, names = gated_experts(ml_collections.ConfigDict({"psa": psa}))
    psa["gated"]["categories"] = ",".join(names)
    embeddings, index, prefers_safe = preference_records(config.cache_dir, config.embeddings, names,
                                                         embed_dim=config.embed_dim,
                                                         missing_embedding=config.missing_embedding)
    tree = gated.init(deltas, config.embed_dim, rank=config.rank or None)
    tree["gate"] = gated.fit_gates(embeddings, index, prefers_safe, len(names), l2=config.l2)
    opened = np.asarray(gated.gates(tree, jnp.asarray(embeddings), hard=True))[np.arange(len(index)), index] > 0
    per_category = {name: {"records": int((index == c).sum()),
                           "prefers_safe": float(prefers_safe[index == c].mean()),
                           "fit_accuracy": float((opened == prefers_safe)[index == c].mean())}
                    for c, name in enumerate(names)}
    cli.output_folder(workdir)
    base_model = load_trained(config.experts.split(",")[0].strip()).base_model
    folder = save_trained(workdir, {"gated": tree}, {"psa": psa, "fit_gates": config.to_dict()}, base_model)
    summary = {"checkpoint": folder, "categories": per_category, "records": len(index), "l2": config.l2,
               "hard": config.hard}
    with open(os.path.join(workdir, "fit_gates_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for name, row in per_category.items():
        print(f"  {name}: {row['records']} records, {row['prefers_safe']:.0%} chose the safe image, "
              f"gate right on {row['fit_accuracy']:.1%}")
    print(json.dumps(summary))


def main() -> None:
    cli.main(run)
