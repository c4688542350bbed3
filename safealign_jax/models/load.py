"""Loading the Flax ports from diffusers folders (numpy + safetensors only, never torch)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from safealign_jax.convert.checkpoint import read_config, read_state_dict
from safealign_jax.convert.names import DIFFUSERS_NAMES, params_from_state_dict
from safealign_jax.errors import check
from safealign_jax.models.layers import Dtype
from safealign_jax.models.resolve import resolve_model
from safealign_jax.models.unet import UNet2DConditionModel
from safealign_jax.models.unet_config import UNetConfig


def component_folder(folder: str, component: str) -> str:
    """`folder` itself if it is a component folder, else `folder/component` of a pipeline.

    `folder` may also be a hub id `ORG/NAME` in the local Hugging Face cache (`resolve_model`).
    """
    folder = resolve_model(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    sub = os.path.join(folder, component)
    check(
        os.path.isdir(sub),
        f"{folder}: neither a diffusers {component}/ folder (config.json) nor a pipeline folder with {component}/.",
    )
    return sub


def abstract_params(module, *inputs) -> dict:
    """The params tree of `module` as ShapeDtypeStructs, without computing anything."""
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
    return variables["params"]


def load_unet(
    folder: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    variant: str | None = None,
    remat_policy: str = "none",
) -> tuple[UNet2DConditionModel, dict]:
    """Loads a diffusers UNet2DConditionModel as (Flax module, params).

    Args:
      folder: a diffusers `unet/` folder or a pipeline folder containing `unet/`.
      dtype: compute dtype; param_dtype: dtype the weights are stored in.
      variant: weights variant ("fp16"); default: the plain file, else the fp16 one.
      remat_policy: see `UNet2DConditionModel`.
    Returns:
      (module, params) with params a tree of numpy arrays in `param_dtype`.
    """
    folder = component_folder(folder, "unet")
    config = UNetConfig.from_diffusers(read_config(folder), os.path.join(folder, "config.json"))
    module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)
    factor = 2**config.num_upsamplers
    expected = abstract_params(module, *module.dummy_inputs(size=factor, seq_len=1))
    state_dict = read_state_dict(folder, "diffusion_pytorch_model", variant)
    params = params_from_state_dict(expected, state_dict, DIFFUSERS_NAMES, folder)
    return module, params


def param_count(params) -> int:
    """Number of scalars in a params tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
