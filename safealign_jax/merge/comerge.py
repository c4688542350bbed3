"""Co-Merge selection (docs/METHODS.md section 2; SafetyDPO, arXiv 2412.10493): per weight, keep the expert that is most active on it.

With dW_i (in, out) the dense delta of expert i and E_i (in,) its activation statistic per input
channel k (from `calibration.calibrate`, e.g. E_i|x_k| over the calibration inputs run through
the UNet with expert i), the score of weight (k, j) is s_i[k, j] = |dW_i[k, j]| * E_i[k]
(torch layout: s_i[j, k] for W (out, in)). Granularity:
    "weight": dW[k, j] = dW_{argmax_i s_i[k, j]}[k, j]
    "row":    one expert per output row j (torch row, our column): i* = argmax_i sum_k s_i[k, j],
              dW[:, j] = dW_{i*}[:, j]
Ties go to the lowest expert index.
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from safealign_jax.errors import UserError, check
from safealign_jax.merge.trees import delta_tree, expert_deltas, layer_name

GRANULARITIES = ("weight", "row")


def comerge(trees: Sequence[dict], scales: Sequence[float] | None, statistics: Sequence[dict],
            granularity: str = "weight", names: Sequence[str] | None = None) -> tuple[dict, dict]:
    """Merges the experts by Co-Merge selection.

    Args:
      trees: the experts' LoRA (or delta) trees, same paths and shapes.
      scales: their scales s = alpha / rank (None: 1 each).
      statistics: per expert {P: (in,)} (nested like the params tree, leaf at the module path):
        the input-activation statistic of every adapted layer, e.g. `calibrate(...)`'s result.
      granularity: "weight" or "row" (see the module docstring).
      names: the experts' names for error messages.
    Returns:
      (delta tree {P: {"delta": (in, out)}}, wins {"/"-joined P: [weights won by expert i]})
      where the counts sum to in * out per layer.
    """
    check(granularity in GRANULARITIES,
          f"Co-Merge granularity {granularity!r} is unknown (expected one of {list(GRANULARITIES)}).")
    deltas = expert_deltas(trees, scales, names)
    check(len(statistics) == len(deltas), f"{len(statistics)} activation statistics for {len(deltas)} experts.")
    stats = [traverse_util.flatten_dict(s) for s in statistics]
    merged, wins = {}, {}
    for layer in deltas[0]:
        if any(layer not in s for s in stats):
            raise UserError(f"no activation statistic for layer {layer_name(layer)!r} (calibration incomplete).")
        d = jnp.stack([dl[layer] for dl in deltas])  # (N, in, out)
        e = jnp.stack([jnp.asarray(s[layer], jnp.float32) for s in stats])  # (N, in)
        check(e.shape == d.shape[:2], f"layer {layer_name(layer)!r}: statistic of shape {e.shape[1:]}, "
              f"expected ({d.shape[1]},).")
        merged[layer], winner = _select(d, e, granularity)
        counts = np.bincount(np.asarray(winner).ravel(), minlength=len(deltas))
        wins[layer_name(layer)] = [int(c) * (d.shape[1] if granularity == "row" else 1) for c in counts]
    return delta_tree(merged), wins


@partial(jax.jit, static_argnums=2)
def _select(d: jax.Array, e: jax.Array, granularity: str) -> tuple[jax.Array, jax.Array]:
    """(merged (in, out), winners (in, out) or (out,)) from deltas d (N, in, out), statistics e (N, in)."""
    score = jnp.abs(d) * e[:, :, None]
    if granularity == "weight":
        winner = jnp.argmax(score, axis=0)
        return jnp.take_along_axis(d, winner[None], axis=0)[0], winner
    winner = jnp.argmax(score.sum(1), axis=0)
    return jnp.take_along_axis(d, winner[None, None, :], axis=0)[0], winner
