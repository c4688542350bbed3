"""Euler's method on the probability-flow ODE in sigma (Karras et al. 2022), deterministic
(diffusers' EulerDiscreteScheduler, churn 0) or ancestral (EulerAncestralDiscreteScheduler).

Latents live at scale sqrt(sigma**2 + 1) relative to the model's x_t: the initial noise is
multiplied by `init_noise_sigma` and the model input divided by sqrt(sigma_i**2 + 1).
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.schedulers import sigmas as sigma_lib
from safealign_jax.schedulers.base import SamplerTables, Setup, setup, step_noise
from safealign_jax.schedulers.config import COMMON_DEFAULTS, SchedulerConfig
from safealign_jax.schedulers.timesteps import euler_timesteps

# diffusers EulerDiscreteScheduler.__init__ defaults of the fields read here.
DEFAULTS = {
    **COMMON_DEFAULTS,
    **sigma_lib.SIGMA_DEFAULTS,
    "interpolation_type": "linear",
    "sigma_min": None,
    "sigma_max": None,
    "timestep_type": "discrete",
}
# diffusers EulerAncestralDiscreteScheduler.__init__ defaults of the fields read here.
ANCESTRAL_DEFAULTS = {**COMMON_DEFAULTS, "timestep_spacing": "linspace"}


@flax.struct.dataclass
class EulerSampler(SamplerTables):
    """Euler over n steps; every table is float32 (n,), indexed by the step i. No state.

    Attributes:
      timesteps: model timesteps (fractional for "linspace" and Karras grids).
      sigma: noise level sigma_i of the latents at step i.
      sigma_to: where the Euler step lands: sigma_{i+1}, or sigma_down for ancestral.
      sigma_up: standard deviation of the fresh noise added (ancestral only, else zeros).
      ancestral: static.
    """

    sigma: jax.Array
    sigma_to: jax.Array
    sigma_up: jax.Array
    ancestral: bool = flax.struct.field(pytree_node=False)

    def scale_model_input(self, state: tuple, x: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i**2 + 1): the model's x_t for latents x (B, H, W, C)."""
        sigma = self.sigma[i]
        return (x / jnp.sqrt(sigma**2 + 1)).astype(x.dtype)

    def step(
        self, state: tuple, model_output: jax.Array, i, x: jax.Array, key
    ) -> tuple[jax.Array, tuple]:
        """Latents at step i+1 from latents x (B, H, W, C) at step i; `key` used when ancestral."""
        sample, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
        sigma = self.sigma[i]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * out
        elif self.prediction_type == "v_prediction":
            x0 = out * (-sigma / jnp.sqrt(sigma**2 + 1)) + (sample / (sigma**2 + 1))
        else:
            x0 = out
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (self.sigma_to[i] - sigma)
        if self.ancestral:
            prev = prev + step_noise(key, x) * self.sigma_up[i]
        return prev.astype(x.dtype), state


def _init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """diffusers' init_noise_sigma: max sigma, or sqrt(max**2 + 1) for "leading" grids."""
    top = sigmas.max()
    return float(top if spacing in ("linspace", "trailing") else np.sqrt(top**2 + np.float32(1)))


def _schedule(
    s: Setup,
    num_steps: int,
    karras: bool = False,
    bounds: tuple[float | None, float | None] = (None, None),
    final_sigma: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n,) timesteps, float32 (n+1,) sigmas ending in the final sigma).

    karras: Karras grid between `bounds` (sigma_min, sigma_max; None: the grid's own ends).
    final_sigma: "zero" or "sigma_min" (the smallest training sigma).
    """
    alphas = sigma_lib.sigma_alphas(s.alphas_cumprod, s.fields["rescale_betas_zero_snr"])
    base = sigma_lib.train_sigmas(alphas)
    timesteps = euler_timesteps(s.spacing, s.num_train_timesteps, num_steps, s.steps_offset)
    sigmas = sigma_lib.interpolate_sigmas(timesteps, base)
    if karras:
        sigmas, timesteps = sigma_lib.karras_grid(bounds, sigmas, base, num_steps)
    return timesteps.astype(np.float32), sigma_lib.with_final_sigma(sigmas, alphas, final_sigma)


def make_euler(config: SchedulerConfig, num_steps: int) -> EulerSampler:
    """Deterministic Euler (diffusers' EulerDiscreteScheduler) from a scheduler config,
    with Karras sigmas when the config sets `use_karras_sigmas`."""
    s = setup(config, DEFAULTS, num_steps, "euler")
    fields = s.fields
    config.require(fields, "interpolation_type", "linear", "euler")
    sigma_lib.require_plain_sigmas(config, fields, "euler")
    if s.prediction_type == "v_prediction":
        config.require(fields, "timestep_type", "discrete", "euler with v_prediction")
    timesteps, sigmas = _schedule(
        s,
        num_steps,
        karras=config.flag(fields, "use_karras_sigmas"),
        bounds=sigma_lib.config_sigma_bounds(config, fields),
        final_sigma=config.choice(fields, "final_sigmas_type", sigma_lib.FINAL_SIGMAS),
    )
    return EulerSampler(
        timesteps=jnp.asarray(timesteps),
        sigma=jnp.asarray(sigmas[:-1]),
        sigma_to=jnp.asarray(sigmas[1:]),
        sigma_up=jnp.zeros_like(sigmas[:-1]),
        prediction_type=s.prediction_type,
        ancestral=False,
        init_noise_sigma=_init_noise_sigma(sigmas, s.spacing),
    )


def make_euler_ancestral(config: SchedulerConfig, num_steps: int) -> EulerSampler:
    """Euler ancestral (diffusers' EulerAncestralDiscreteScheduler) from a scheduler config."""
    s = setup(config, ANCESTRAL_DEFAULTS, num_steps, "euler_ancestral", ("epsilon", "v_prediction"))
    timesteps, sigmas = _schedule(s, num_steps)
    sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
    sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_down = np.sqrt(sigma_to**2 - sigma_up**2)
    return EulerSampler(
        timesteps=jnp.asarray(timesteps),
        sigma=jnp.asarray(sigma_from),
        sigma_to=jnp.asarray(sigma_down),
        sigma_up=jnp.asarray(sigma_up),
        prediction_type=s.prediction_type,
        ancestral=True,
        init_noise_sigma=_init_noise_sigma(sigmas, s.spacing),
    )
