"""The frozen base UNet of a run: loaded from `config.model.path`, or for the tiny preset a tiny
random SD1-structured UNet built in-process. Also its content reference for checkpoints."""

import os

import jax
import jax.numpy as jnp

from safealign_jax.models import UNet2DConditionModel, UNetConfig, load_unet
from safealign_jax.models.load import component_folder
from safealign_jax.train import checkpoint

# One level (cross-attention down, mid and up blocks): SD1-like, and quick to compile on CPU.
TINY_UNET = dict(
    block_out_channels=(32,),
    layers_per_block=(1,),
    transformer_layers_per_block=(1,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    cross_attention_dim=32,
    attention_head_dim=(4,),
    norm_num_groups=8,
    sample_size=16,
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_base(config) -> tuple[UNet2DConditionModel, dict, dict]:
    """(module, fp32 params, reference {"path", "sha256"}) of the frozen base UNet."""
    dtype = DTYPES[config.model.compute_dtype]
    if config.model.path:
        module, params = load_unet(
            config.model.path, dtype=dtype, variant=config.model.variant or None,
            remat_policy=config.model.remat_policy,
        )
        folder = os.path.abspath(component_folder(config.model.path, "unet"))
        return module, params, {"path": folder, "sha256": checkpoint.hash_folder(folder)}
    module = UNet2DConditionModel(UNetConfig(**TINY_UNET), dtype=dtype,
                                  remat_policy=config.model.remat_policy)
    inputs = module.dummy_inputs(size=4, seq_len=1)
    params = jax.jit(module.init)(jax.random.key(config.seed), *inputs)["params"]
    reference = {"path": f"<tiny random UNet, seed {config.seed}>",
                 "sha256": checkpoint.hash_json({"unet": TINY_UNET, "seed": config.seed})}
    return module, params, reference
