"""PNDM as diffusers' PNDMScheduler with skip_prk_steps=True: the pseudo linear multistep (PLMS)
sampler Stable Diffusion 1.x names in its scheduler_config.json.

For n inference steps on the ascending grid t_0 < ... < t_{n-1}, with r = T // n, it makes n + 1
model calls (one for n = 1), at t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0:
  call 0: x at t_{n-1} -> t_{n-1} - r with e_0 (and keeps x);
  call 1: restarts from the kept x and goes t_{n-1} -> t_{n-2} with (e_0 + e_1) / 2, where e_1
          is the output at t_{n-2}; e_1 is not kept in the history;
  call k >= 2: t -> t - r with the Adams-Bashforth combination of the current and up to three
          previous kept outputs, of order min(k, 4) (weights (3, -1) / 2, (23, -16, 5) / 12,
          (55, -59, 37, -9) / 24).
Each move t -> t' is DDIM's deterministic update written as
x' = sqrt(a_t' / a_t) x - (a_t' - a_t) e / (a_t sqrt(1 - a_t') + sqrt(a_t (1 - a_t) a_t')),
a = alphas_cumprod, a_t' = final alpha below t' = 0 (1 with set_alpha_to_one, else a_0); a
v-prediction combination is turned into e at t with the step's sample. As in diffusers, t - r is
used even where the grid ("trailing", "linspace") spaces its points otherwise.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.schedulers.base import SamplerTables, setup
from safealign_jax.schedulers.config import COMMON_DEFAULTS, SchedulerConfig
from safealign_jax.schedulers.timesteps import ddim_timesteps

# diffusers PNDMScheduler.__init__ defaults (it has no rescale_betas_zero_snr and ignores one).
DEFAULTS = {
    **{k: v for k, v in COMMON_DEFAULTS.items() if k != "rescale_betas_zero_snr"},
    "timestep_spacing": "leading",
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
}
# (current output, previous kept outputs newest first) per Adams-Bashforth order 1..4.
ADAMS_BASHFORTH = (
    (1.0, 0.0, 0.0, 0.0),
    (3 / 2, -1 / 2, 0.0, 0.0),
    (23 / 12, -16 / 12, 5 / 12, 0.0),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


@flax.struct.dataclass
class PNDMSampler(SamplerTables):
    """PNDM (PLMS) over n + 1 model calls; every table is float32, indexed by the call i. Latents
    fed unscaled.

    Attributes:
      timesteps: (m,) model timesteps of the calls (integers, see the module docstring).
      weights: (m, 4) weights of the current output and the three previous kept outputs.
      keep: (m,) 1 where the current output joins the history (0 on call 1).
      restart: (m,) 1 where the call starts from call 0's latents (call 1).
      sample_coeff, eps_coeff: (m,) x' = sample_coeff x - eps_coeff e.
      sqrt_alpha, sqrt_beta: (m,) sqrt(a_t), sqrt(1 - a_t) at the move's start t (v -> e).
      prediction_type: "epsilon" or "v_prediction".
    """

    weights: jax.Array
    keep: jax.Array
    restart: jax.Array
    sample_coeff: jax.Array
    eps_coeff: jax.Array
    sqrt_alpha: jax.Array
    sqrt_beta: jax.Array

    def init_state(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """(three previous kept outputs newest first, call 0's latents): float32 zeros like x."""
        return tuple(jnp.zeros(x.shape, jnp.float32) for _ in range(4))

    def step(
        self, state: tuple, model_output: jax.Array, i, x: jax.Array, key
    ) -> tuple[jax.Array, tuple]:
        """(x after call i, new state) from latents x (B, H, W, C) and the model output; no
        noise. State entries may come without x's batch axis (the pipeline vmaps per image);
        the new state has x's shape."""
        *history, kept = state
        out, sample = model_output.astype(jnp.float32), x.astype(jnp.float32)
        kept = jnp.where(i == 0, sample, kept)
        sample = jnp.where(self.restart[i] > 0, kept, sample)
        w = self.weights[i]
        combined = w[0] * out + w[1] * history[0] + w[2] * history[1] + w[3] * history[2]
        if self.prediction_type == "v_prediction":
            combined = self.sqrt_alpha[i] * combined + self.sqrt_beta[i] * sample
        prev = self.sample_coeff[i] * sample - self.eps_coeff[i] * combined
        keep = self.keep[i] > 0
        history = [jnp.where(keep, new, old) for new, old in zip([out, *history[:2]], history, strict=True)]
        new_state = tuple(jnp.broadcast_to(a, x.shape) for a in (*history, kept))
        return prev.astype(x.dtype), new_state


def plms_timesteps(grid: np.ndarray) -> np.ndarray:
    """The calls' timesteps from the ascending grid: t_{n-1}, t_{n-2}, t_{n-2}, ..., t_0."""
    return np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()


def make_pndm(config: SchedulerConfig, num_steps: int) -> PNDMSampler:
    """PNDM with skip_prk_steps (PLMS) over `num_steps` inference steps from a scheduler config."""
    values = {k: v for k, v in config.values.items() if k != "rescale_betas_zero_snr"}
    config = dataclasses.replace(config, values=values)
    s = setup(
        config, {**DEFAULTS, "rescale_betas_zero_snr": False}, num_steps, "pndm",
        prediction_types=("epsilon", "v_prediction"),
    )
    config.require(s.fields, "skip_prk_steps", True, "pndm")
    num_train, ratio = s.num_train_timesteps, s.num_train_timesteps // num_steps
    grid = ddim_timesteps(s.spacing, num_train, num_steps, s.steps_offset)[::-1]
    calls = plms_timesteps(grid)
    m = calls.shape[0]
    start, end = calls.copy(), calls - ratio  # the move of each call: t -> t - r ...
    if m > 1:
        start[1], end[1] = calls[1] + ratio, calls[1]  # ... but call 1 redoes call 0's move
    if start.max() >= num_train:
        raise config.error(
            "steps_offset", s.steps_offset, f"a value keeping the {num_steps} timesteps below {num_train}"
        )
    alphas = s.alphas_cumprod
    final_alpha = np.float32(1.0) if config.flag(s.fields, "set_alpha_to_one") else alphas[0]
    a_t = alphas[start]
    a_prev = np.where(end >= 0, alphas[np.maximum(end, 0)], final_alpha).astype(np.float32)
    one = np.float32(1.0)
    denom = a_t * np.sqrt(one - a_prev) + np.sqrt(a_t * (one - a_t) * a_prev)

    # call k >= 2 combines k outputs (at most 4): Adams-Bashforth order min(k, 4); call 0 order 1
    order = np.minimum(np.maximum(np.arange(m) - 1, 0), 3)
    weights = np.asarray(ADAMS_BASHFORTH, np.float32)[order]
    keep, restart = np.ones(m, np.float32), np.zeros(m, np.float32)
    if m > 1:
        weights[1], keep[1], restart[1] = (0.5, 0.5, 0.0, 0.0), 0.0, 1.0
    return PNDMSampler(
        timesteps=jnp.asarray(calls, jnp.float32),
        weights=jnp.asarray(weights),
        keep=jnp.asarray(keep),
        restart=jnp.asarray(restart),
        sample_coeff=jnp.asarray(np.sqrt(a_prev / a_t)),
        eps_coeff=jnp.asarray((a_prev - a_t) / denom),
        sqrt_alpha=jnp.asarray(np.sqrt(a_t)),
        sqrt_beta=jnp.asarray(np.sqrt(one - a_t)),
        prediction_type=s.prediction_type,
    )
