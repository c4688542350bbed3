"""Timestep embeddings, as diffusers' get_timestep_embedding / TimestepEmbedding, and SDXL's
micro-conditioning `time_ids`."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from safealign_jax.models.layers import DtypeModule


def sdxl_time_ids(batch: int, height: float, width: float | None = None, *, crop: Sequence[float] = (0, 0),
                  original: Sequence[float] | None = None, target: Sequence[float] | None = None) -> np.ndarray:
    """SDXL's added `time_ids` (batch, 6) float32, one row per example: the original size (h, w),
    the crop's top-left corner (top, left) and the target size (h, w) in pixels; original and
    target default to (height, width) (width defaults to height)."""
    size = (height, height if width is None else width)
    row = np.float32([*(original or size), *crop, *(target or size)])
    return np.tile(row[None], (batch, 1))


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> jax.Array:
    """Sinusoidal embedding of (N,) timesteps (may be fractional) -> (N, dim) float32."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(DtypeModule):
    """linear_1 -> SiLU -> linear_2."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(self.features, "linear_2")(nn.silu(self.dense(self.features, "linear_1")(x)))
