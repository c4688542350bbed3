"""The loss the trainer differentiates: Diffusion-DPO of the base UNet plus the trainable tree
({"lora"}, {"adapter"} or both, see `safealign_jax.trained`), w.r.t. that tree only, with the
model's DDPM training schedule. The reference is the frozen base (no LoRA, no adapter).

PSA: the policy's user tokens are `adapter.user_tokens(tree, batch["user_embedding"])`, the
embeddings (B, E) float32; the adapter's lambda is folded into its to_v_ip. Caption dropout
(`step.drop_captions`) replaces the text states only: SPEC.md does not say the user is dropped
too, so every pair keeps its user's embedding.
"""

import os

import jax.numpy as jnp

from safealign_jax import adapter, dpo, lora
from safealign_jax.errors import UserError
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


def policy_collections(trainable: dict, batch: dict, lora_scale: float,
                       adapter_scale: float) -> tuple[dict, dict]:
    """(extra UNet collections of the policy, batch with "user_tokens" (B, N, D) in place of
    "user_embedding" (B, E)) for `trainable` = {"lora"?, "adapter"?}."""
    collections = {}
    if "lora" in trainable:
        collections["lora"] = lora.variables(trainable["lora"], lora_scale)
    if "adapter" in trainable:
        tree = trainable["adapter"]
        if "user_embedding" not in batch:
            raise UserError("PSA training: the batch source yields no 'user_embedding' (B, E) entry.")
        embeddings = batch["user_embedding"]
        width = tree["proj"]["kernel"].shape[0]
        if embeddings.ndim != 2 or embeddings.shape[1] != width:
            raise UserError(f"PSA training: user_embedding has shape {tuple(embeddings.shape)}, "
                            f"expected (B, {width}) (--config.psa.embed_dim).")
        collections["adapter"] = adapter.variables(tree, adapter_scale)
        batch = {k: v for k, v in batch.items() if k != "user_embedding"}
        batch["user_tokens"] = adapter.user_tokens(tree, jnp.asarray(embeddings, jnp.float32))
    return collections, batch


def make_loss_fn(module, lora_scale: float, schedule: DDPMSchedule, beta: float,
                 adapter_scale: float = 1.0):
    """loss_fn(trainable, params, batch, key) -> (loss, metrics) for `step.make_train_step`;
    `trainable` = {"lora": LoRA tree} and/or {"adapter": PSA tree} (see `safealign_jax.trained`)."""

    def loss_fn(trainable, params, batch, key):
        collections, batch = policy_collections(trainable, batch, lora_scale, adapter_scale)
        return dpo.diffusion_dpo_loss(module.apply, params, collections, batch, schedule, key, beta)

    return loss_fn
