"""DDIM (Song et al. 2020) as diffusers' DDIMScheduler: deterministic for eta = 0, adding
eta-scaled noise otherwise (eta = 1 is DDPM's posterior variance).

Kept from diffusers on purpose: the previous timestep is always t - T // n (also for the
"trailing" / "linspace" grids), and below t = 0 the final alpha is 1 (set_alpha_to_one) or
alphas_cumprod[0].
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.errors import UserError
from safealign_jax.schedulers.base import SamplerTables, setup, step_noise
from safealign_jax.schedulers.config import COMMON_DEFAULTS, SchedulerConfig
from safealign_jax.schedulers.timesteps import ddim_timesteps

# diffusers DDIMScheduler.__init__ defaults of the fields read here.
DEFAULTS = {
    **COMMON_DEFAULTS,
    "timestep_spacing": "leading",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "thresholding": False,
}


@flax.struct.dataclass
class DDIMSampler(SamplerTables):
    """DDIM over n steps; every table is float32 (n,), indexed by the step i. No state, latents
    fed unscaled.

    Attributes:
      timesteps: model timesteps t_i (integers, descending).
      sqrt_alpha, sqrt_beta: sqrt(a_t), sqrt(1 - a_t) with a = alphas_cumprod.
      sqrt_alpha_prev: sqrt(a) at the previous timestep t - T // n.
      direction_scale: sqrt(1 - a_prev - std**2), the weight of the predicted noise.
      std: eta * the DDIM posterior standard deviation (zeros when eta = 0).
      clip_range (None: no clipping of x0), stochastic (eta > 0): static.
    """

    sqrt_alpha: jax.Array
    sqrt_beta: jax.Array
    sqrt_alpha_prev: jax.Array
    direction_scale: jax.Array
    std: jax.Array
    clip_range: float | None = flax.struct.field(pytree_node=False)
    stochastic: bool = flax.struct.field(pytree_node=False)

    def step(
        self, state: tuple, model_output: jax.Array, i, x: jax.Array, key
    ) -> tuple[jax.Array, tuple]:
        """x_{t_prev} from x_t (B, H, W, C) and the model output; `key` is used when eta > 0."""
        sample, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
        sqrt_alpha, sqrt_beta = self.sqrt_alpha[i], self.sqrt_beta[i]
        if self.prediction_type == "epsilon":
            x0, eps = (sample - sqrt_beta * out) / sqrt_alpha, out
        elif self.prediction_type == "v_prediction":
            x0, eps = sqrt_alpha * sample - sqrt_beta * out, sqrt_alpha * out + sqrt_beta * sample
        else:
            x0, eps = out, (sample - sqrt_alpha * out) / sqrt_beta
        if self.clip_range is not None:
            x0 = jnp.clip(x0, -self.clip_range, self.clip_range)
        prev = self.sqrt_alpha_prev[i] * x0 + self.direction_scale[i] * eps
        if self.stochastic:
            prev = prev + self.std[i] * step_noise(key, x)
        return prev.astype(x.dtype), state


def make_ddim(config: SchedulerConfig, num_steps: int, eta: float = 0.0) -> DDIMSampler:
    """DDIM with `num_steps` steps and noise weight `eta` >= 0 from a scheduler config."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta < float("inf"):
        raise UserError(f"eta={eta!r} for ddim: expected a finite number >= 0.")
    s = setup(config, DEFAULTS, num_steps, "ddim")
    config.require(s.fields, "thresholding", False, "ddim")
    clip = config.flag(s.fields, "clip_sample")
    clip_range = config.number(s.fields, "clip_sample_range") if clip else None

    num_train = s.num_train_timesteps
    t = ddim_timesteps(s.spacing, num_train, num_steps, s.steps_offset)
    if t.max() >= num_train:
        raise config.error(
            "steps_offset",
            s.steps_offset,
            f"a value keeping the {num_steps} timesteps below {num_train}",
        )
    prev_t = t - num_train // num_steps
    alphas = s.alphas_cumprod
    final_alpha = np.float32(1.0) if config.flag(s.fields, "set_alpha_to_one") else alphas[0]
    a_t = alphas[t]
    a_prev = np.where(prev_t >= 0, alphas[np.maximum(prev_t, 0)], final_alpha).astype(np.float32)
    one = np.float32(1.0)
    variance = ((one - a_prev) / (one - a_t)) * (one - a_t / a_prev)
    std = (np.float32(eta) * np.sqrt(variance)).astype(np.float32)
    return DDIMSampler(
        timesteps=jnp.asarray(t, jnp.float32),
        sqrt_alpha=jnp.asarray(np.sqrt(a_t)),
        sqrt_beta=jnp.asarray(np.sqrt(one - a_t)),
        sqrt_alpha_prev=jnp.asarray(np.sqrt(a_prev)),
        direction_scale=jnp.asarray(np.sqrt(one - a_prev - std**2)),
        std=jnp.asarray(std),
        prediction_type=s.prediction_type,
        clip_range=clip_range,
        stochastic=eta > 0,
    )
