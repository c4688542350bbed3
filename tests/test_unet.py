"""UNet port parity against diffusers for the SD1 / SD2 / SDXL structures, and load errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file
from torch_reference import nchw, nhwc, randomise, relative_error

from safealign_jax import UserError
from safealign_jax.models import load_unet, param_count

SD1 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
SD2 = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)
SDXL = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    norm_num_groups=8,
)
FAMILIES = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def inputs(config: dict, batch: int = 2, seq: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, 16, 4), np.float32)
    t = np.array([3, 911][:batch], np.int32)
    context = rng.standard_normal((batch, seq, config["cross_attention_dim"]), np.float32)
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = {
            "text_embeds": rng.standard_normal((batch, 16), np.float32),
            "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (batch, 1)),
        }
    return x, t, context, added


def torch_predict(model, x, t, context, added):
    kwargs = {}
    if added is not None:
        kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        out = model(nchw(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs).sample
    return nhwc(out)


def jax_predict(folder, x, t, context, added, **load_kw):
    module, params = load_unet(folder, **load_kw)
    return np.asarray(module.apply({"params": params}, x, t, context, added))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (torch model, folder)} of tiny random UNets saved as safetensors."""
    out = {}
    for name, config in FAMILIES.items():
        torch.manual_seed(0)
        model = randomise(TorchUNet(**config))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_diffusers(saved, family):
    model, folder = saved[family]
    args = inputs(FAMILIES[family])
    err = relative_error(jax_predict(folder, *args), torch_predict(model, *args))
    print(f"{family}: relative max abs error {err:.2e}")
    assert err <= 1e-4


def test_fp16_variant_and_pipeline_folder(tmp_path):
    torch.manual_seed(0)
    model = randomise(TorchUNet(**SD1)).half()
    model.save_pretrained(tmp_path / "unet", variant="fp16")
    (tmp_path / "model_index.json").write_text("{}")
    args = inputs(SD1)
    ours = jax_predict(str(tmp_path), *args)  # the pipeline folder resolves unet/
    assert relative_error(ours, torch_predict(model.float(), *args)) <= 1e-4


def test_sharded_checkpoint(saved, tmp_path):
    model, _ = saved["sdxl"]
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    args = inputs(SDXL)
    assert relative_error(jax_predict(str(tmp_path), *args), torch_predict(model, *args)) <= 1e-4


def test_bf16_compute_is_close(saved):
    import jax.numpy as jnp

    model, folder = saved["sd1"]
    args = inputs(SD1)
    ours = jax_predict(folder, *args, dtype=jnp.bfloat16)
    assert relative_error(ours, torch_predict(model, *args)) <= 5e-2


def test_param_count_matches_torch(saved):
    for model, folder in saved.values():
        _, params = load_unet(folder)
        assert param_count(params) == sum(p.numel() for p in model.parameters())


def _copy(saved, tmp_path, family="sd1"):
    folder = saved[family][1]
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), tmp_path / f)
    return tmp_path


def _error(folder) -> str:
    with pytest.raises(UserError) as info:
        load_unet(str(folder))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_folder(tmp_path):
    assert "no such folder" in _error(tmp_path / "nope")


def test_error_folder_without_unet(tmp_path):
    assert "unet/" in _error(tmp_path)


def test_error_unsupported_block_type(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["down_block_types"][0] = "SimpleCrossAttnDownBlock2D"
    (folder / "config.json").write_text(json.dumps(config))
    message = _error(folder)
    assert "down_block_types" in message and "SimpleCrossAttnDownBlock2D" in message


def test_error_unsupported_config_value(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["class_embed_type"] = "timestep"
    (folder / "config.json").write_text(json.dumps(config))
    assert "class_embed_type='timestep'" in _error(folder)


def test_error_truncated_safetensors(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "not a readable safetensors file" in _error(folder)


def test_error_missing_tensor(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["mid_block.attentions.0.proj_out.weight"]
    save_file(tensors, weights)
    message = _error(folder)
    assert "1 missing tensor(s): mid_block.attentions.0.proj_out.weight" in message


def test_error_wrong_shape_and_unexpected(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
    tensors["extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, weights)
    message = _error(folder)
    assert "conv_in.weight has shape (32, 4, 5, 5), expected (32, 4, 3, 3)" in message
    assert "unexpected tensor(s): extra.weight" in message


def test_error_pickle_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert "pickle" in _error(tmp_path)


def test_error_not_a_unet(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert "_class_name='AutoencoderKL'" in _error(tmp_path)


@pytest.mark.slow
def test_full_size_sd15_parity(tmp_path):
    """The real SD1.5 UNet structure (860M parameters), random weights, 64x64 latents."""
    torch.manual_seed(0)
    model = TorchUNet(sample_size=64, cross_attention_dim=768).eval()
    model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64, 4), np.float32)
    t = np.array([500], np.int32)
    context = rng.standard_normal((1, 77, 768), np.float32)
    err = relative_error(jax_predict(str(tmp_path), x, t, context, None), torch_predict(model, x, t, context, None))
    print(f"sd15 full size: relative max abs error {err:.2e}")
    assert err <= 1e-4
