"""merge_summary.json of a merge: per layer the merged delta's Frobenius norm, the weights each
expert won (Co-Merge) and the SVD relative reconstruction error (output form svd); totals; timings."""

import numpy as np
from flax import traverse_util

from safealign_jax.merge.pipeline import Merged


def summarize(config, names: list[str], merged: Merged, errors: dict, timings: dict, folder: str) -> dict:
    """The summary dict of `merged` (experts `names`, `errors` {layer: SVD relative error} or {},
    `timings` in seconds) saved in checkpoint `folder`."""
    norms = {"/".join(path[:-1]): float(np.linalg.norm(np.asarray(value)))
             for path, value in traverse_util.flatten_dict(merged.delta).items()}
    wins = merged.wins
    summary = {
        "method": config.method, "experts": names, "checkpoint": folder, "form": config.output.form,
        "delta_norm": merged.delta_norm, "timings_s": timings,
        "layers": {layer: {"delta_norm": norm,
                           **({"wins": dict(zip(names, wins[layer], strict=True))} if layer in wins else {}),
                           **({"relative_error": errors[layer]} if layer in errors else {})}
                   for layer, norm in sorted(norms.items())},
    }
    if wins:
        summary["total_wins"] = {n: sum(w[i] for w in wins.values()) for i, n in enumerate(names)}
    if errors:
        summary["max_relative_error"] = max(errors.values())
    return summary
