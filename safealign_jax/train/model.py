"""The frozen base UNet of a run: loaded from `config.model.path`, or for the tiny preset a tiny
random SD1-structured UNet built in-process. Also its content reference for checkpoints.

`config.model` fixes what the compiled step computes: compute_dtype (activations), param_dtype
(storage of the frozen base weights), remat_policy and attention (see UNet2DConditionModel);
configs written before a field existed get float32 / "none" / "auto". The accelerator presets
store and run the base in bf16; the trainable trees, the optimizer state, the per-image errors
and the DPO loss stay fp32 (BENCHMARKS.md "Precision policy": with beta/2 = 2500 one bf16
rounding of a per-image error would move the logit by about 1).
"""

import os

import jax
import jax.numpy as jnp

from safealign_jax import runs
from safealign_jax.errors import check
from safealign_jax.models import UNet2DConditionModel, UNetConfig, load_unet
from safealign_jax.models.load import component_folder

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


def _dtype(config, field: str):
    name = config.model.get(field, "float32")  # configs saved before the field existed: float32
    check(name in DTYPES, f"--config.model.{field}={name!r} is invalid (expected one of {list(DTYPES)}).")
    return DTYPES[name]


def unet_module(config, structure: UNetConfig) -> UNet2DConditionModel:
    """The UNet of `structure` with the dtypes, remat policy and attention of `config.model`."""
    return UNet2DConditionModel(structure, dtype=_dtype(config, "compute_dtype"),
                                param_dtype=_dtype(config, "param_dtype"),
                                remat_policy=config.model.get("remat_policy", "none"),
                                attention=config.model.get("attention", "auto"))


def load_base(config) -> tuple[UNet2DConditionModel, dict, dict]:
    """(module, params in model.param_dtype, reference {"path", "sha256"}) of the frozen base UNet."""
    if config.model.path:
        module, params = load_unet(config.model.path, param_dtype=_dtype(config, "param_dtype"),
                                   variant=config.model.variant or None)
        folder = os.path.abspath(component_folder(config.model.path, "unet"))
        return unet_module(config, module.config), params, {"path": folder,
                                                             "sha256": runs.hash_folder(folder)}
    module = unet_module(config, UNetConfig(**TINY_UNET))
    inputs = module.dummy_inputs(size=4, seq_len=1)
    params = jax.jit(module.init)(jax.random.key(config.seed), *inputs)["params"]
    reference = {"path": f"<tiny random UNet, seed {config.seed}>",
                 "sha256": runs.hash_json({"unet": TINY_UNET, "seed": config.seed})}
    return module, params, reference
