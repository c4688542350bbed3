"""Shared session fixtures: a tiny random SD1-structured UNet saved by diffusers and loaded by us.

torch / diffusers are imported inside the fixtures so test modules that do not use them pay nothing.
"""

import pytest

# The SD1 structure at toy size: one cross-attention down block, one cross-attention up block and
# the mid block, i.e. 1 + 2 + 1 = 4 transformer blocks with 2 attentions each.
TINY_SD1 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory) -> str:
    """A diffusers UNet2DConditionModel folder (TINY_SD1, every parameter ~ N(0, 0.2))."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch_reference import randomise

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_unet")
    randomise(UNet2DConditionModel(**TINY_SD1)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_unet(tiny_unet_dir):
    """(Flax module, params) of `tiny_unet_dir`, float32."""
    from safealign_jax.models import load_unet

    return load_unet(tiny_unet_dir)
