"""The loss the trainer differentiates: Diffusion-DPO of base UNet + LoRA, w.r.t. the LoRA tree,
with the model's DDPM training schedule."""

import os

from safealign_jax import dpo, lora
from safealign_jax.schedulers import DDPMSchedule, ddpm_schedule, scheduler_config_from_dict

# Stable Diffusion's training schedule, used when the model folder has no scheduler config.
SD_SCHEDULE = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
               "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def training_schedule(model_path: str, prediction_type: str) -> DDPMSchedule:
    """The DDPM schedule of the pipeline holding `model_path` (a pipeline or its unet/ folder),
    else SD's with `prediction_type`."""
    for folder in (model_path, os.path.dirname(os.path.normpath(model_path))) if model_path else ():
        if os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
            return ddpm_schedule(folder)
    return ddpm_schedule(scheduler_config_from_dict(
        dict(SD_SCHEDULE, prediction_type=prediction_type), "built-in SD schedule"))


def make_loss_fn(module, lora_scale: float, schedule: DDPMSchedule, beta: float):
    """loss_fn(trainable, params, batch, key) -> (loss, metrics) for `step.make_train_step`;
    `trainable` = {"lora": LoRA tree} (see `safealign_jax.trained`)."""

    def loss_fn(trainable, params, batch, key):
        collections = {"lora": lora.variables(trainable["lora"], lora_scale)}
        return dpo.diffusion_dpo_loss(module.apply, params, collections, batch, schedule, key, beta)

    return loss_fn
