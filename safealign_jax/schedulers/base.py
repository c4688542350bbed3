"""The interface every sampler implements, the fields and defaults the samplers here share
(`SamplerTables`), and the config fields all of them read.

A sampler is a pytree (per-step tables as (n,) float32 arrays, settings as static fields),
built once on the host for a fixed number of steps n, so that a whole sampling loop is one
`jax.lax.fori_loop` / `scan` over the step index i:

    state = sampler.init_state(x)                           # x = init_noise_sigma * N(0, I)
    for i in range(sampler.num_steps):
        out = model(sampler.scale_model_input(state, x, i), sampler.timesteps[i])
        x, state = sampler.step(state, out, i, x, jax.random.fold_in(key, i))

x is a latent batch (B, H, W, C) (any shape works); i an int or int32 scalar (traced or not);
`key` a jax PRNG key, used only by stochastic samplers (others accept None).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.errors import UserError
from safealign_jax.schedulers.betas import cumulative_alphas, train_betas
from safealign_jax.schedulers.config import PREDICTION_TYPES, TIMESTEP_SPACINGS, SchedulerConfig


class Sampler(Protocol):
    """timesteps: (n,) float32 model timesteps; init_noise_sigma: scale of the initial noise."""

    timesteps: jax.Array
    init_noise_sigma: float

    @property
    def num_steps(self) -> int: ...

    def init_state(self, x: jax.Array) -> Any:
        """The state carried between steps (history of multistep methods), for latents like x."""

    def scale_model_input(self, state: Any, x: jax.Array, i: jax.Array | int) -> jax.Array:
        """The model input at step i for the current latents x (same shape and dtype)."""

    def step(
        self,
        state: Any,
        model_output: jax.Array,
        i: jax.Array | int,
        x: jax.Array,
        key: jax.Array | None,
    ) -> tuple[jax.Array, Any]:
        """(x at step i+1, new state) from the model output for x at step i; x's shape and dtype."""


@flax.struct.dataclass(kw_only=True)
class SamplerTables:
    """What every sampler pytree here holds beside its own per-step tables, and the defaults of a
    sampler that carries no state and feeds the model the latents unscaled.

    Attributes:
      timesteps: (n,) float32 model timesteps, one per step (or model call).
      prediction_type: static, what the model predicts ("epsilon", "v_prediction", "sample").
      init_noise_sigma: static scale of the initial noise.
    """

    timesteps: jax.Array
    prediction_type: str = flax.struct.field(pytree_node=False)
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def init_state(self, x: jax.Array) -> Any:
        """No state: ()."""
        return ()

    def scale_model_input(self, state: Any, x: jax.Array, i: jax.Array | int) -> jax.Array:
        """The latents unscaled."""
        return x


def step_noise(key: jax.Array, x: jax.Array) -> jax.Array:
    """The float32 N(0, I) noise a stochastic sampler adds in a step with `key`, shaped like x."""
    return jax.random.normal(key, x.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The fields all samplers share, read from a config against one diffusers class's defaults.

    Attributes:
      fields: every field of `defaults`, resolved (see SchedulerConfig.resolve).
      alphas_cumprod: float32 (T,) training schedule.
      prediction_type, spacing ("timestep_spacing"), steps_offset: checked values.
    """

    config: SchedulerConfig
    fields: dict[str, Any]
    alphas_cumprod: np.ndarray
    prediction_type: str
    spacing: str
    steps_offset: int

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def setup(
    config: SchedulerConfig,
    defaults: dict[str, Any],
    num_steps: int,
    sampler: str,
    prediction_types: Sequence[str] = PREDICTION_TYPES,
) -> Setup:
    """Reads and checks the shared fields; `sampler` names the caller in error messages."""
    fields = config.resolve(defaults)
    alphas_cumprod = cumulative_alphas(train_betas(config, fields))
    num_train = alphas_cumprod.shape[0]
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, int)
        or not 1 <= num_steps <= num_train
    ):
        raise UserError(
            f"num_steps={num_steps!r} for {sampler}: expected an integer from 1 to "
            f"num_train_timesteps={num_train} of {config.source}."
        )
    steps_offset = config.number(fields, "steps_offset", integer=True)
    if steps_offset < 0:
        raise config.error("steps_offset", steps_offset, "a non-negative integer")
    return Setup(
        config=config,
        fields=fields,
        alphas_cumprod=alphas_cumprod,
        prediction_type=config.choice(fields, "prediction_type", prediction_types),
        spacing=config.choice(fields, "timestep_spacing", TIMESTEP_SPACINGS),
        steps_offset=steps_offset,
    )
