"""DPM-Solver++(2M) (Lu et al. 2022) as diffusers' DPMSolverMultistepScheduler with
algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint".

The method works on the data prediction x0 and carries the previous step's x0 as its
state. Steps are first order at the start and, as diffusers decides it, at the end
(final sigma 0, `euler_at_final`, or `lower_order_final` with fewer than 15 steps);
all others are second order. Both kinds are one formula here with per-step weights
(the second-order weight is 0 on first-order steps), so no step branches at run time.
"""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.schedulers import sigmas as sigma_lib
from safealign_jax.schedulers.base import SamplerTables, Setup, setup
from safealign_jax.schedulers.config import COMMON_DEFAULTS, SchedulerConfig
from safealign_jax.schedulers.timesteps import dpm_timesteps

# diffusers DPMSolverMultistepScheduler.__init__ defaults of the fields read here. The
# algorithm fields (algorithm_type, solver_order, solver_type) are fixed by this module.
DEFAULTS = {
    **COMMON_DEFAULTS,
    **sigma_lib.SIGMA_DEFAULTS,
    "thresholding": False,
    "lower_order_final": True,
    "euler_at_final": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
}
# Not __init__ arguments of the class, but read for Karras grids when a config has them.
KARRAS_BOUNDS = {"sigma_min": None, "sigma_max": None}


@flax.struct.dataclass
class DPMSolverSampler(SamplerTables):
    """DPM-Solver++(2M) over n steps; every table is float32 (n,), indexed by the step i. Latents
    fed unscaled.

    With (alpha_i, sigma_i) the signal and noise scales at step i and lambda = log(alpha/sigma):
    x_{i+1} = ratio x_i - phi D0 - half_phi_2 D1, D0 = x0_i, D1 = inv_r0 (x0_i - x0_{i-1}).

    Attributes:
      timesteps: model timesteps (integers, descending).
      alpha, sigma: scales at step i, to turn the model output into x0.
      ratio: sigma_{i+1} / sigma_i.  phi: alpha_{i+1} (exp(-h) - 1), h = lambda_{i+1} - lambda_i.
      half_phi_2: phi / 2 on second-order steps, else 0.
      inv_r0: h / (lambda_i - lambda_{i-1}) on second-order steps, else 0.
    """

    alpha: jax.Array
    sigma: jax.Array
    ratio: jax.Array
    phi: jax.Array
    half_phi_2: jax.Array
    inv_r0: jax.Array

    def init_state(self, x: jax.Array) -> jax.Array:
        """The previous step's x0 prediction: float32 zeros shaped like x (unused at step 0)."""
        return jnp.zeros(x.shape, jnp.float32)

    def step(
        self, state: jax.Array, model_output: jax.Array, i, x: jax.Array, key
    ) -> tuple[jax.Array, jax.Array]:
        """(latents at step i+1, x0 prediction of step i) from latents x (B, H, W, C); no noise."""
        sample, out = x.astype(jnp.float32), model_output.astype(jnp.float32)
        alpha, sigma = self.alpha[i], self.sigma[i]
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma * out) / alpha
        elif self.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * out
        else:
            x0 = out
        d1 = self.inv_r0[i] * (x0 - state)
        prev = self.ratio[i] * sample - self.phi[i] * x0 - self.half_phi_2[i] * d1
        return prev.astype(x.dtype), x0


def _lambda_clip_timestep(s: Setup, alphas: np.ndarray) -> int:
    """The last training timestep + 1 kept by `lambda_min_clipped` (num_train when -inf)."""
    clip = s.fields["lambda_min_clipped"]
    if isinstance(clip, bool) or not isinstance(clip, int | float) or math.isnan(clip):
        raise s.config.error("lambda_min_clipped", clip, "a number")
    lambdas = np.log(np.sqrt(alphas)) - np.log(np.sqrt(np.float32(1) - alphas))
    return s.num_train_timesteps - int(np.searchsorted(lambdas[::-1], clip, side="left"))


def _schedule(s: Setup, num_steps: int, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(int64 (n,) timesteps, float32 (n+1,) sigmas ending in the final sigma)."""
    fields = s.fields
    alphas = sigma_lib.sigma_alphas(s.alphas_cumprod, fields["rescale_betas_zero_snr"])
    last_timestep = _lambda_clip_timestep(s, alphas)
    if last_timestep < num_steps:
        raise s.config.error(
            "lambda_min_clipped",
            s.fields["lambda_min_clipped"],
            f"a value keeping at least num_steps={num_steps} training timesteps",
        )
    timesteps = dpm_timesteps(
        s.spacing, s.num_train_timesteps, num_steps, s.steps_offset, last_timestep
    )
    base = sigma_lib.train_sigmas(alphas)
    if karras:
        bounds = sigma_lib.config_sigma_bounds(s.config, fields)
        sigmas, timesteps = sigma_lib.karras_grid(bounds, base[::-1].copy(), base, num_steps)
        if fields["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        sigmas = sigma_lib.interpolate_sigmas(timesteps, base)
    final = s.config.choice(fields, "final_sigmas_type", sigma_lib.FINAL_SIGMAS)
    return timesteps.astype(np.int64), sigma_lib.with_final_sigma(sigmas, alphas, final)


def _first_order(s: Setup, n: int) -> np.ndarray:
    """bool (n,): which steps diffusers takes with the first-order update."""
    lower_final = s.config.flag(s.fields, "lower_order_final") and n < 15
    final = (
        s.config.flag(s.fields, "euler_at_final")
        or lower_final
        or s.fields["final_sigmas_type"] == "zero"
    )
    first = np.zeros(n, bool)
    first[0] = True
    first[-1] |= final
    return first


def make_dpm_solver(
    config: SchedulerConfig, num_steps: int, karras: bool = False
) -> DPMSolverSampler:
    """DPM-Solver++(2M) from a scheduler config; Karras sigmas when `karras` or the config's
    `use_karras_sigmas` is set."""
    s = setup(config, {**DEFAULTS, **KARRAS_BOUNDS}, num_steps, "dpmpp_2m")
    sigma_lib.require_plain_sigmas(config, s.fields, "dpmpp_2m")
    for name in ("thresholding", "use_lu_lambdas", "use_flow_sigmas"):
        config.require(s.fields, name, False, "dpmpp_2m")
    if s.fields["variance_type"] in ("learned", "learned_range"):
        raise config.error(
            "variance_type",
            s.fields["variance_type"],
            "None: learned variances are not implemented",
        )
    karras = karras or config.flag(s.fields, "use_karras_sigmas")
    timesteps, sigmas = _schedule(s, num_steps, karras)
    n = timesteps.shape[0]

    with np.errstate(divide="ignore"):
        alpha = np.float32(1) / np.sqrt(sigmas**2 + np.float32(1))
        sigma = sigmas * alpha
        lam = np.log(alpha) - np.log(sigma)
        h = lam[1:] - lam[:-1]
        phi = alpha[1:] * (np.exp(-h) - np.float32(1))
        ratio = sigma[1:] / sigma[:-1]
        second = ~_first_order(s, n)
        h0 = np.concatenate([[np.float32(1)], lam[1:-1] - lam[:-2]]).astype(np.float32)
        inv_r0 = np.where(second, np.float32(1) / np.where(second, h0 / h, 1), 0)
    return DPMSolverSampler(
        timesteps=jnp.asarray(timesteps, jnp.float32),
        alpha=jnp.asarray(alpha[:-1]),
        sigma=jnp.asarray(sigma[:-1]),
        ratio=jnp.asarray(ratio),
        phi=jnp.asarray(phi),
        half_phi_2=jnp.asarray(np.where(second, np.float32(0.5) * phi, 0).astype(np.float32)),
        inv_r0=jnp.asarray(inv_r0.astype(np.float32)),
        prediction_type=s.prediction_type,
    )
