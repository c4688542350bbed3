"""Data-free merges of experts' dense deltas: linear average, task arithmetic, TIES and DARE.

Every function takes the experts (LoRA or delta trees, see `trees`) and their scales and returns
one delta tree {P: {"delta": (in, out)} float32} with the experts' paths and shapes.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from safealign_jax.errors import check
from safealign_jax.merge.trees import delta_tree, expert_deltas


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    check(len(weights) == count, f"{len(weights)} merge weights given for {count} experts.")
    return [float(w) for w in weights]


def linear(trees: Sequence[dict], scales: Sequence[float] | None = None,
           weights: Sequence[float] | None = None, names: Sequence[str] | None = None) -> dict:
    """dW = sum_i w_i dW_i; default w_i = 1 / N (the average)."""
    deltas = expert_deltas(trees, scales, names)
    w = _weights(weights, len(deltas))
    return delta_tree({layer: sum(wi * d[layer] for wi, d in zip(w, deltas, strict=True))
                       for layer in deltas[0]})


def task_arithmetic(trees: Sequence[dict], scales: Sequence[float] | None = None, lam: float = 1.0,
                    names: Sequence[str] | None = None) -> dict:
    """dW = lam * sum_i dW_i (task vectors added, then scaled by lambda)."""
    return linear(trees, scales, [lam] * len(trees), names)


def trim(delta: jax.Array, density: float) -> jax.Array:
    """`delta` with all but its ceil(density * size) largest-magnitude entries set to 0 (entries
    tied with the smallest kept magnitude are kept too); density 1 keeps everything."""
    check(0.0 <= density <= 1.0, f"TIES density {density} is invalid (expected a fraction in [0, 1]).")
    keep = math.ceil(density * delta.size)
    if keep >= delta.size:
        return delta
    if keep == 0:
        return jnp.zeros_like(delta)
    magnitude = jnp.abs(delta)
    threshold = jnp.sort(magnitude.ravel())[delta.size - keep]
    return jnp.where(magnitude >= threshold, delta, 0.0)


def ties(trees: Sequence[dict], scales: Sequence[float] | None = None, density: float = 0.2,
         lam: float = 1.0, names: Sequence[str] | None = None) -> dict:
    """TIES-merging (Yadav et al. 2023) per layer on the dense deltas:
    1. trim: keep each expert's top `density` fraction of entries by magnitude (per layer);
    2. elect: sign gamma = sign(sum_i trimmed_i) per entry;
    3. disjoint mean: mean of the trimmed entries whose sign equals gamma (0 if none), times lam.
    """
    deltas = expert_deltas(trees, scales, names)
    check(0.0 <= density <= 1.0, f"TIES density {density} is invalid (expected a fraction in [0, 1]).")
    return delta_tree({layer: lam * _disjoint_mean(jnp.stack([trim(d[layer], density) for d in deltas]))
                       for layer in deltas[0]})


@jax.jit
def _disjoint_mean(trimmed: jax.Array) -> jax.Array:
    """TIES elect + disjoint mean of trimmed deltas (N, in, out) -> (in, out)."""
    elected = jnp.sign(trimmed.sum(0))
    agree = (jnp.sign(trimmed) == elected) & (trimmed != 0)
    return jnp.where(agree, trimmed, 0.0).sum(0) / jnp.maximum(agree.sum(0), 1)


def dare(trees: Sequence[dict], scales: Sequence[float] | None = None, *, key: jax.Array,
         drop: float = 0.5, weights: Sequence[float] | None = None,
         names: Sequence[str] | None = None) -> dict:
    """DARE (Yu et al. 2024): each expert's delta entries are dropped with probability `drop` and
    the survivors rescaled by 1 / (1 - drop) (so the expectation is unchanged), then combined as
    `linear` with `weights` (default the average). Expert i, layer j (sorted path order) draw
    their mask from fold_in(fold_in(key, i), j): deterministic given `key`.
    """
    check(0.0 <= drop < 1.0, f"DARE drop probability {drop} is invalid (expected 0 <= p < 1).")
    deltas = expert_deltas(trees, scales, names)
    w = _weights(weights, len(deltas))
    out = {}
    for j, layer in enumerate(deltas[0]):
        total = 0.0
        for i, (wi, d) in enumerate(zip(w, deltas, strict=True)):
            mask = jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(key, i), j), 1.0 - drop,
                                        d[layer].shape)
            total = total + wi * jnp.where(mask, d[layer] / (1.0 - drop), 0.0)
        out[layer] = total
    return delta_tree(out)
