"""The DDPM training schedule: noising x0 and the regression target, as pure jax functions.

These are what the Diffusion-DPO step uses: `add_noise` equals diffusers'
`DDPMScheduler.add_noise`, `velocity` its `get_velocity`, `target` picks the model's
prediction target (epsilon, v or x0) from the config's `prediction_type`.
"""

import flax.struct
import jax
import jax.numpy as jnp

from safealign_jax.schedulers.betas import cumulative_alphas, train_betas
from safealign_jax.schedulers.config import (
    COMMON_DEFAULTS,
    PREDICTION_TYPES,
    SchedulerConfig,
    read_scheduler_config,
)

# diffusers DDPMScheduler.__init__ defaults of the fields read here.
DEFAULTS = dict(COMMON_DEFAULTS)


@flax.struct.dataclass
class DDPMSchedule:
    """The training noise schedule; a pytree of float32 (T,) arrays, T = num_train_timesteps.

    Attributes:
      betas: (T,) per-step noise variances.
      alphas_cumprod: (T,) cumulative products of (1 - betas); x_t = sqrt(a) x0 + sqrt(1-a) eps.
      prediction_type: "epsilon", "v_prediction" or "sample" (static).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


def ddpm_schedule(config: SchedulerConfig | str) -> DDPMSchedule:
    """The training schedule of a scheduler config (or a scheduler / pipeline folder)."""
    if isinstance(config, str):
        config = read_scheduler_config(config)
    fields = config.resolve(DEFAULTS)
    betas = train_betas(config, fields)
    return DDPMSchedule(
        betas=jnp.asarray(betas),
        alphas_cumprod=jnp.asarray(cumulative_alphas(betas)),
        prediction_type=config.choice(fields, "prediction_type", PREDICTION_TYPES),
    )


def _coefficients(schedule: DDPMSchedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """(sqrt(a_t), sqrt(1 - a_t)) for (B,) int timesteps, shaped (B, 1, ..., 1) with `ndim` axes."""
    a = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(a), jnp.sqrt(1 - a)


def add_noise(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise.

    x0, noise: (B, H, W, C) (any (B, ...) shape); t: (B,) int32 in [0, T).
    Returns x0's shape and dtype.
    """
    signal, sigma = _coefficients(schedule, t, x0.ndim)
    return (signal * x0 + sigma * noise).astype(x0.dtype)


def velocity(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0; shapes as `add_noise`."""
    signal, sigma = _coefficients(schedule, t, x0.ndim)
    return (signal * noise - sigma * x0).astype(x0.dtype)


def target(schedule: DDPMSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model is trained to predict at x_t: noise, v or x0 by `prediction_type`."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0
