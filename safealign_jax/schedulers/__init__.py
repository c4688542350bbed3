"""Noise schedules and samplers configured from a diffusers `scheduler_config.json`.

Training: `ddpm_schedule(folder)` -> DDPMSchedule; `add_noise`, `velocity`, `target`.
Sampling: `make_sampler(name, folder_or_config, num_steps)` -> a sampler pytree whose
`step` runs inside one jitted `lax.fori_loop` (see schedulers/base.py for the loop).
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
from safealign_jax.schedulers.factory import SAMPLER_NAMES, make_sampler

__all__ = [
    "SAMPLER_NAMES",
    "DDIMSampler",
    "DDPMSchedule",
    "DPMSolverSampler",
    "EulerSampler",
    "Sampler",
    "SchedulerConfig",
    "add_noise",
    "ddpm_schedule",
    "make_sampler",
    "read_scheduler_config",
    "scheduler_config_from_dict",
    "step_noise",
    "target",
    "velocity",
]
