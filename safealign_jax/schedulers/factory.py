"""`make_sampler(name, config, num_steps)`: a sampler by name, configured from the model's
diffusers scheduler config (whatever its `_class_name`), as diffusers' `from_config` would.

Names and the diffusers scheduler each one equals:
  pipeline          the one the config's `_class_name` names (PIPELINE_SAMPLERS), as diffusers'
                    pipelines and the official scripts sample
  pndm              PNDMScheduler with skip_prk_steps=True (Stable Diffusion 1.x's own)
  ddim              DDIMScheduler (eta = 0 deterministic, eta > 0 stochastic)
  euler             EulerDiscreteScheduler
  euler_ancestral   EulerAncestralDiscreteScheduler
  dpmpp_2m          DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint)
  dpmpp_2m_karras   the same with use_karras_sigmas=True
"euler" and "dpmpp_2m" also use Karras sigmas when the config sets `use_karras_sigmas`.
"""

from safealign_jax.errors import UserError
from safealign_jax.schedulers.base import Sampler
from safealign_jax.schedulers.config import SchedulerConfig, read_scheduler_config
from safealign_jax.schedulers.ddim import make_ddim
from safealign_jax.schedulers.dpm_solver import make_dpm_solver
from safealign_jax.schedulers.euler import make_euler, make_euler_ancestral
from safealign_jax.schedulers.pndm import make_pndm

SAMPLER_NAMES = ("pipeline", "pndm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras")
# scheduler_config.json `_class_name` -> the sampler "pipeline" runs for it.
PIPELINE_SAMPLERS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
}


def pipeline_sampler(config: SchedulerConfig) -> str:
    """The sampler name for the scheduler class `config` names; UserError for other classes."""
    if config.class_name not in PIPELINE_SAMPLERS:
        raise UserError(
            f"{config.source}: sampler 'pipeline' has no sampler for _class_name="
            f"{config.class_name!r} (supported: {', '.join(PIPELINE_SAMPLERS)}); choose one of "
            f"{', '.join(SAMPLER_NAMES[1:])}."
        )
    return PIPELINE_SAMPLERS[config.class_name]


def make_sampler(
    name: str, config: SchedulerConfig | str, num_steps: int, *, eta: float = 0.0
) -> Sampler:
    """The sampler `name` over `num_steps` steps.

    Args:
      name: one of SAMPLER_NAMES ("pipeline": the class the config names).
      config: a SchedulerConfig, or a scheduler / pipeline folder to read it from.
      num_steps: number of denoising steps (static: it sets the tables' length).
      eta: DDIM's noise weight (0: deterministic); only "ddim" accepts eta != 0.
    """
    if name not in SAMPLER_NAMES:
        raise UserError(f"sampler {name!r} is unknown; expected one of {', '.join(SAMPLER_NAMES)}.")
    if isinstance(config, str):
        config = read_scheduler_config(config)
    if name == "pipeline":
        name = pipeline_sampler(config)
    if name != "ddim" and eta != 0:
        raise UserError(f"eta={eta!r} applies only to the ddim sampler, not to {name}.")
    if name == "pndm":
        return make_pndm(config, num_steps)
    if name == "ddim":
        return make_ddim(config, num_steps, eta)
    if name == "euler":
        return make_euler(config, num_steps)
    if name == "euler_ancestral":
        return make_euler_ancestral(config, num_steps)
    return make_dpm_solver(config, num_steps, karras=name == "dpmpp_2m_karras")
