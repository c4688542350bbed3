"""Tiny random diffusers pipelines (SD-like and SDXL-like) saved to folders, for end-to-end tests."""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from fixtures_tokenizer import write_tiny_clip_tokenizer
from torch_reference import randomise
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT = dict(vocab_size=530, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=528, eos_token_id=529,
            pad_token_id=529)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _tokenizer(tmp):
    return CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp / "tok_src", model_max_length=16))


def _vae():
    torch.manual_seed(1)
    return randomise(AutoencoderKL(**VAE), std=0.1)


def build_sd(tmp) -> str:
    """A tiny SD1-like pipeline (DDIM scheduler) saved to tmp/sd; returns the folder."""
    torch.manual_seed(0)
    unet = randomise(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=8,
    ), std=0.05)
    text = randomise(CLIPTextModel(CLIPTextConfig(**TEXT)), std=0.2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=_tokenizer(tmp), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd")
    return str(tmp / "sd")


def build_sdxl(tmp) -> str:
    """A tiny SDXL-like pipeline (Euler scheduler) saved to tmp/sdxl; returns the folder."""
    torch.manual_seed(0)
    unet = randomise(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ), std=0.05)
    text = randomise(CLIPTextModel(CLIPTextConfig(**TEXT)), std=0.2)
    text_2 = randomise(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=16)), std=0.2, seed=1)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=text, text_encoder_2=text_2,
                                     tokenizer=_tokenizer(tmp), tokenizer_2=_tokenizer(tmp), unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(tmp / "sdxl")
    return str(tmp / "sdxl")
