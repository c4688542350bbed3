"""Import of official PSAlign adapter files (user_proj.* / psa_adapter.<j>.to_{k,v}_user.0.*, j =
the j-th cross-attention in diffusers' attn_processors order, taken here from a diffusers UNet)."""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import save_file

from safealign_jax import adapter
from safealign_jax.convert.adapter_files import load_psalign_adapter
from safealign_jax.errors import UserError
from safealign_jax.models import UNet2DConditionModel, UNetConfig
from safealign_jax.models.load import abstract_params

EMBED = 12
# SDXL-like order: cross-attention in the down, up and mid blocks, several layers per block.
TORCH_CONFIG = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
)


@pytest.fixture(scope="module")
def unet():
    """(abstract params of our UNet, our attn2 paths in diffusers' processor order)."""
    torch_unet = TorchUNet(**TORCH_CONFIG)
    config = UNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel", **torch_unet.config})
    module = UNet2DConditionModel(config)
    params = abstract_params(module, *module.dummy_inputs(size=8, seq_len=3))
    order = [tuple(part.replace(".", "_") for part in _modules(name))
             for name in torch_unet.attn_processors if "attn2" in name]
    return params, order


def _modules(name: str) -> list[str]:
    """'down_blocks.1.attentions.0.attn2.processor' -> ['down_blocks.1', 'attentions.0', 'attn2']."""
    parts, out = name.removesuffix(".processor").split("."), []
    for part in parts:
        if part.isdigit():
            out[-1] += "." + part
        else:
            out.append(part)
    return out


def random_tree(params, tokens=1):
    real = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params)
    tree = adapter.init(jax.random.key(0), real, embed_dim=EMBED, num_tokens=tokens)
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), tree)


def psalign_file(tree, order) -> dict[str, np.ndarray]:
    """The tree in the PSAlign layout, written independently of the importer."""
    out = {"user_proj.proj.weight": np.ascontiguousarray(tree["proj"]["kernel"].T),
           "user_proj.proj.bias": tree["proj"]["bias"],
           "user_proj.norm.weight": tree["norm"]["scale"], "user_proj.norm.bias": tree["norm"]["bias"]}
    for j, path in enumerate(order):
        layer = tree["attn"]
        for part in path:
            layer = layer[part]
        out[f"psa_adapter.{j}.to_k_user.0.weight"] = np.ascontiguousarray(layer["to_k_ip"].T)
        out[f"psa_adapter.{j}.to_v_user.0.weight"] = np.ascontiguousarray(layer["to_v_ip"].T)
    return out


def assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_safetensors_and_bin_import(unet, tmp_path):
    params, order = unet
    assert len(order) == 8 and order[0][0] == "down_blocks_1" and order[-1][0] == "mid_block"
    tree = random_tree(params)
    tensors = psalign_file(tree, order)
    save_file(tensors, str(tmp_path / "psa.safetensors"))
    assert_equal(load_psalign_adapter(str(tmp_path / "psa.safetensors"), params), tree)
    nested = {group: {k.split(".", 1)[1]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith(group)}
              for group in ("user_proj", "psa_adapter")}
    torch.save(nested, tmp_path / "psa.bin")
    assert_equal(load_psalign_adapter(str(tmp_path / "psa.bin"), params, allow_pickle=True), tree)
    with pytest.raises(UserError, match="is a PyTorch pickle"):
        load_psalign_adapter(str(tmp_path / "psa.bin"), params)


def test_two_token_projection_keeps_the_first_token(unet, tmp_path):
    params, order = unet
    tree = random_tree(params, tokens=2)
    save_file(psalign_file(tree, order), str(tmp_path / "psa2.safetensors"))
    loaded = load_psalign_adapter(str(tmp_path / "psa2.safetensors"), params)
    d = tree["norm"]["scale"].shape[0]
    np.testing.assert_array_equal(loaded["proj"]["kernel"], tree["proj"]["kernel"][:, :d])
    np.testing.assert_array_equal(loaded["proj"]["bias"], tree["proj"]["bias"][:d])


def test_wrong_file_is_one_line(unet, tmp_path):
    params, order = unet
    tensors = psalign_file(random_tree(params), order)
    del tensors["psa_adapter.3.to_v_user.0.weight"]
    tensors["psa_adapter.0.to_k_user.0.weight"] = tensors["psa_adapter.0.to_k_user.0.weight"][:, :4].copy()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError) as error:
        load_psalign_adapter(str(tmp_path / "bad.safetensors"), params)
    message = str(error.value)
    assert "\n" not in message and "psa_adapter.3.to_v_user.0.weight" in message
    assert "psa_adapter.0.to_k_user.0.weight has shape" in message
