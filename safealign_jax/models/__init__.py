"""Flax ports of the Stable Diffusion components, loaded from diffusers folders."""

from safealign_jax.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextOutput,
    load_text_encoder,
    load_tokenizer,
    tokenize,
)
from safealign_jax.models.load import load_unet, param_count
from safealign_jax.models.unet import UNet2DConditionModel
from safealign_jax.models.unet_config import UNetConfig
from safealign_jax.models.vae import AutoencoderKL, VAEConfig, load_vae, sample_latent

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "load_text_encoder",
    "load_tokenizer",
    "load_unet",
    "load_vae",
    "param_count",
    "sample_latent",
    "tokenize",
]
