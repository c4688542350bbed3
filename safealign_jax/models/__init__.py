"""Flax ports of the Stable Diffusion components, loaded from diffusers folders."""

from safealign_jax.models.load import load_unet, param_count
from safealign_jax.models.unet import UNet2DConditionModel
from safealign_jax.models.unet_config import UNetConfig

__all__ = ["UNet2DConditionModel", "UNetConfig", "load_unet", "param_count"]
