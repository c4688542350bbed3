"""AutoencoderKL port parity against diffusers (encode moments, decode), latent helpers, errors."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from safetensors.numpy import load_file, save_file
from torch_reference import nchw, nhwc, randomise, relative_error

from safealign_jax import UserError
from safealign_jax.models import load_vae, param_count, sample_latent
from safealign_jax.models.vae import decode, encode

# The SD structure (quant convs, mid-block attention) at toy width, and a 3-level variant without
# quant convs or attention and with a shift factor (the options newer VAEs use).
SD = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)
PLAIN = dict(
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=False,
    scaling_factor=0.5,
    shift_factor=0.1,
)
FAMILIES = {"sd": SD, "plain": PLAIN}


def images(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def torch_encode_decode(model, x: np.ndarray):
    with torch.no_grad():
        posterior = model.encode(nchw(x)).latent_dist
        decoded = model.decode(posterior.mean).sample
    return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(decoded)


def jax_encode_decode(folder: str, x: np.ndarray, **load_kw):
    module, params = load_vae(folder, **load_kw)

    @jax.jit  # one compile instead of op-by-op dispatch: much faster on CPU
    def run(params, x):
        mean, logvar = encode(module, params, x)
        return mean, logvar, decode(module, params, mean)

    return tuple(np.asarray(a) for a in run(params, x))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{family: (torch model, folder)} of tiny random VAEs saved as safetensors."""
    out = {}
    for name, config in FAMILIES.items():
        torch.manual_seed(0)
        model = randomise(TorchVAE(**config))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, str(folder))
    return out


def assert_parity(ours, reference, tol: float = 1e-4) -> None:
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, reference, strict=True):
        assert a.shape == b.shape, name
        err = relative_error(a, b)
        print(f"  {name}: relative max abs error {err:.2e}")
        assert err <= tol, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parity_with_diffusers(saved, family):
    model, folder = saved[family]
    x = images()
    print(family)
    assert_parity(jax_encode_decode(folder, x), torch_encode_decode(model, x))


def test_param_count_matches_torch(saved):
    for model, folder in saved.values():
        _, params = load_vae(folder)
        assert param_count(params) == sum(p.numel() for p in model.parameters())


def test_bf16_compute_is_close(saved):
    import jax.numpy as jnp

    model, folder = saved["sd"]
    x = images(batch=1)
    ours = jax_encode_decode(folder, x, dtype=jnp.bfloat16)
    for a, b in zip(ours, torch_encode_decode(model, x), strict=True):
        assert a.dtype == np.float32 and relative_error(a, b) <= 5e-2


def test_latent_helpers(saved):
    module, params = load_vae(saved["plain"][1])
    cfg = module.config
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.downsample_factor) == (0.5, 0.1, 4)
    mean, logvar = jax.jit(lambda p, x: encode(module, p, x))(params, images())
    assert mean.shape == (2, 8, 8, 4)
    z = sample_latent(mean, logvar, jax.random.key(0))
    eps = jax.random.normal(jax.random.key(0), mean.shape)
    np.testing.assert_allclose(z, mean + np.exp(0.5 * np.asarray(logvar)) * eps, rtol=1e-5, atol=1e-6)
    unet_latents = cfg.latents_for_unet(z)
    np.testing.assert_allclose(unet_latents, (z - 0.1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(cfg.latents_for_decoder(unet_latents), z, rtol=1e-5, atol=1e-6)


def test_logvar_is_clipped_as_diffusers(saved, tmp_path):
    """quant_conv biases pushed far out: logvar saturates at diffusers' [-30, 20] on both sides."""
    model = copy.deepcopy(saved["sd"][0])
    with torch.no_grad():
        model.quant_conv.bias[4:6] = 100.0
        model.quant_conv.bias[6:] = -100.0
    model.save_pretrained(tmp_path)
    x = images()
    ours, reference = jax_encode_decode(str(tmp_path), x), torch_encode_decode(model, x)
    assert ours[1].max() == 20.0 and ours[1].min() == -30.0
    assert_parity(ours, reference)


def test_pipeline_folder_fp16_and_deprecated_attention_names(saved, tmp_path):
    """vae/ of a pipeline, fp16 variant, with the old query/key/value/proj_attn names of hub VAEs."""
    model = copy.deepcopy(saved["sd"][0]).half()
    model.save_pretrained(tmp_path / "vae", variant="fp16")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for name, array in load_file(weights).items():
        for new, deprecated in old.items():
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{deprecated}.")
        tensors[name] = array
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in tensors
    save_file(tensors, weights)
    (tmp_path / "model_index.json").write_text("{}")
    x = images()
    # The same fp16 weights on both sides, float32 compute.
    assert_parity(jax_encode_decode(str(tmp_path), x), torch_encode_decode(model.float(), x))


def _copy(saved, tmp_path, family="sd"):
    folder = saved[family][1]
    for f in os.listdir(folder):
        shutil.copy(os.path.join(folder, f), tmp_path / f)
    return tmp_path


def _error(folder, **kw) -> str:
    with pytest.raises(UserError) as info:
        load_vae(str(folder), **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_missing_component_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    message = _error(tmp_path)
    assert str(tmp_path) in message and "vae/" in message


def test_error_unsupported_config_value(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["down_block_types"][1] = "AttnDownEncoderBlock2D"
    (folder / "config.json").write_text(json.dumps(config))
    message = _error(folder)
    assert "down_block_types" in message and "AttnDownEncoderBlock2D" in message
    config["down_block_types"][1] = "DownEncoderBlock2D"
    config["act_fn"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    assert "act_fn='gelu'" in _error(folder)


def test_sdxl_style_latent_statistics_are_kept(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 1.1, 1.2, 1.3], force_upcast=False)
    (folder / "config.json").write_text(json.dumps(config))
    module, _ = load_vae(str(folder))
    assert module.config.latents_mean == (0.1, 0.2, 0.3, 0.4)
    assert module.config.latents_std == (1.0, 1.1, 1.2, 1.3)
