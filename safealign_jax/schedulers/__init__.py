"""Noise schedules and samplers configured from a diffusers `scheduler_config.json`.

Training: `ddpm_schedule(folder)` -> DDPMSchedule; `add_noise`, `velocity`, `target`.
Sampling: `make_sampler(name, folder_or_config, num_steps)` -> a sampler pytree whose `step`
runs inside one jitted `lax.fori_loop` (see schedulers/base.py for the loop); name "pipeline"
picks the sampler of the class the config names, as diffusers' pipelines do.
"""

from safealign_jax.schedulers.base import Sampler, step_noise
from safealign_jax.schedulers.config import (
    SchedulerConfig,
    read_scheduler_config,
    scheduler_config_from_dict,
)
from safealign_jax.schedulers.ddim import DDIMSampler
from safealign_jax.schedulers.ddpm import DDPMSchedule, add_noise, ddpm_schedule, target, velocity
from safealign_jax.schedulers.dpm_solver import DPMSolverSampler
from safealign_jax.schedulers.euler import EulerSampler
from safealign_jax.schedulers.factory import (
    PIPELINE_SAMPLERS,
    SAMPLER_NAMES,
    make_sampler,
    pipeline_sampler,
)
from safealign_jax.schedulers.pndm import PNDMSampler

__all__ = [
    "PIPELINE_SAMPLERS",
    "SAMPLER_NAMES",
    "DDIMSampler",
    "DDPMSchedule",
    "DPMSolverSampler",
    "EulerSampler",
    "PNDMSampler",
    "Sampler",
    "SchedulerConfig",
    "add_noise",
    "ddpm_schedule",
    "make_sampler",
    "pipeline_sampler",
    "read_scheduler_config",
    "scheduler_config_from_dict",
    "step_noise",
    "target",
    "velocity",
]
