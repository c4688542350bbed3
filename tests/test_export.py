"""Exports read by diffusers: LoRA (peft, kohya), folded UNet / pipeline folders, PSA as IP-Adapter."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers import UNet2DConditionModel as TorchUNet
from pipelines import build_sd, build_sdxl
from safetensors.numpy import load_file, save_file
from torch_reference import nchw, nhwc, relative_error

from safealign_jax import UserError, adapter, lora
from safealign_jax.convert import adapter_files, lora_files, unet_files
from safealign_jax.convert.checkpoint import read_config
from safealign_jax.models import load_unet
from safealign_jax.trainable import Trainable

RANK, ALPHA, EMBED = 4, 8.0, 24
CROSS = {"sd": 32, "sdxl": 64}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: (pipeline folder, flax module, params, inputs)} for the tiny SD1 and SDXL pipelines."""
    tmp = tmp_path_factory.mktemp("bases")
    out = {}
    for family, build in (("sd", build_sd), ("sdxl", build_sdxl)):
        folder = build(tmp)
        module, params = load_unet(folder)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 8, 8, 4), np.float32)
        t = np.array([3, 911], np.int32)
        context = rng.standard_normal((2, 5, CROSS[family]), np.float32)
        added = None
        if family == "sdxl":
            added = {"text_embeds": rng.standard_normal((2, 16), np.float32),
                     "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))}
        out[family] = (folder, module, params, (x, t, context, added))
    return out


def random_lora(params) -> dict:
    tree = lora.init(jax.random.key(1), params, lora.LoRAConfig(rank=RANK))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = [jax.random.normal(jax.random.key(i), v.shape) * 0.3 if p[-1].key == "b" else v
              for i, (p, v) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


def torch_predict(unet, inputs, image_embeds=None):
    x, t, context, added = inputs
    kwargs = {}
    if added is not None:
        kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
    if image_embeds is not None:
        kwargs.setdefault("added_cond_kwargs", {})["image_embeds"] = [torch.from_numpy(image_embeds)[:, None]]
    with torch.no_grad():
        return nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs).sample)


def jax_predict(module, variables, inputs, **kwargs):
    return np.asarray(module.apply(variables, *inputs, **kwargs))


def assert_trees_equal(a, b):
    fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (_, x), (_, y) in zip(fa, fb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_lora_file_loads_in_diffusers(bases, tmp_path, family, fmt):
    folder, module, params, inputs = bases[family]
    tree = random_lora(params)
    path = str(tmp_path / f"lora_{fmt}.safetensors")
    if fmt == "peft":
        summary = lora_files.save_peft_lora(path, tree, RANK, ALPHA)
    else:
        summary = lora_files.save_kohya_lora(path, tree, RANK, ALPHA, unet_config=read_config(f"{folder}/unet"))
    assert summary["scale"] == ALPHA / RANK and summary["rank"] == RANK
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(path)
    ours = jax_predict(module, {"params": params, **Trainable({"lora": tree}, {"lora": ALPHA / RANK}).collections()}, inputs)
    err = relative_error(ours, torch_predict(pipe.unet, inputs))
    print(f"{family} {fmt} lora: relative max abs error {err:.2e}")
    assert err <= 1e-4
    base = jax_predict(module, {"params": params}, inputs)
    assert relative_error(ours, base) > 1e-2  # the LoRA matters, so a wrong scale would show
    loaded, rank, alpha = lora_files.load_lora_file(path, params)
    assert (rank, alpha) == (RANK, ALPHA)
    assert_trees_equal(loaded, tree)


def test_peft_metadata_matches_diffusers(bases, tmp_path):
    _, _, params, _ = bases["sd"]
    path = str(tmp_path / "lora.safetensors")
    lora_files.save_peft_lora(path, random_lora(params), RANK, ALPHA)
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == RANK and config["unet.lora_alpha"] == ALPHA
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in config["unet.target_modules"]
    assert metadata["lora_adapter_metadata"] == json.dumps(config, indent=2, sort_keys=True)


def test_old_diffusers_lora_names(bases, tmp_path):
    _, _, params, _ = bases["sd"]
    tree = random_lora(params)
    path = str(tmp_path / "peft.safetensors")
    lora_files.save_peft_lora(path, tree, RANK, ALPHA)
    old = {}
    for key, value in load_file(path).items():
        module, _, kind = key.rpartition(".lora_")
        attn, _, proj = module.rpartition(".")
        if proj == "0":  # to_out.0
            attn, proj = attn.rpartition(".")[0], "to_out"
        direction = "down" if kind.startswith("A") else "up"
        old[f"{attn}.processor.{proj}_lora.{direction}.weight"] = value
    save_file(old, tmp_path / "old.safetensors")
    loaded, rank, alpha = lora_files.load_lora_file(str(tmp_path / "old.safetensors"), params)
    assert (rank, alpha) == (RANK, float(RANK))  # old files carry no alpha: diffusers uses scale 1
    assert_trees_equal(loaded, tree)


def test_folded_unet_and_pipeline_folders(bases, tmp_path):
    folder, module, params, inputs = bases["sdxl"]
    tree = random_lora(params)
    folded = lora.fold(params, tree, ALPHA / RANK)
    out = tmp_path / "unet"
    unet_files.save_unet_folder(str(out), read_config(f"{folder}/unet"), folded)
    unet_files.save_unet_folder(str(out), read_config(f"{folder}/unet"), folded)  # replaces atomically
    ours = jax_predict(module, {"params": params, **Trainable({"lora": tree}, {"lora": ALPHA / RANK}).collections()}, inputs)
    err = relative_error(ours, torch_predict(TorchUNet.from_pretrained(str(out)), inputs))
    print(f"folded unet: relative max abs error {err:.2e}")
    assert err <= 1e-4
    unet_files.save_pipeline_folder(folder, str(tmp_path / "pipe"), folded, fp16=True)
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), variant="fp16").to(torch.float32)
    assert relative_error(ours, torch_predict(pipe.unet, inputs)) <= 1e-2  # fp16 weights
    copied = sorted(p.name for p in (tmp_path / "pipe").iterdir())
    assert copied == sorted(p.name for p in pathlib.Path(folder).iterdir())
    assert [p.name for p in (tmp_path / "pipe" / "unet").iterdir() if p.suffix == ".safetensors"] == [
        "diffusion_pytorch_model.fp16.safetensors"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_processor_order_matches_diffusers(bases, family):
    folder, _, params, _ = bases[family]
    names = [n for n in TorchUNet.from_pretrained(folder, subfolder="unet").attn_processors if "attn2" in n]
    ours = [lora_files.module_name(p) + ".processor" for p in adapter_files.processor_order(params)]
    assert ours == names


def random_adapter(params, tokens):
    tree = adapter.init(jax.random.key(2), params, embed_dim=EMBED, num_tokens=tokens)
    tree["norm"] = {k: v + 0.1 * jax.random.normal(jax.random.key(3 + i), v.shape)
                    for i, (k, v) in enumerate(tree["norm"].items())}
    tree["attn"] = jax.tree_util.tree_map(lambda v: jax.random.normal(jax.random.key(7), v.shape) * 0.2, tree["attn"])
    return tree


@pytest.mark.parametrize("family,tokens", [("sd", 1), ("sd", 2), ("sdxl", 1), ("sdxl", 4)])
def test_ip_adapter_loads_in_diffusers(bases, tmp_path, family, tokens):
    folder, module, params, inputs = bases[family]
    tree = random_adapter(params, tokens)
    path = tmp_path / "psa.safetensors"
    summary = adapter_files.save_ip_adapter(str(path), tree, params)
    assert summary["tokens"] == tokens
    embeds = np.random.default_rng(1).standard_normal((2, EMBED), np.float32)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    ours = jax_predict(module, {"params": params, "adapter": adapter.variables(tree, 0.7)}, inputs,
                       user_tokens=adapter.user_tokens(tree, jnp.asarray(embeds)))
    err = relative_error(ours, torch_predict(pipe.unet, inputs, embeds))
    print(f"{family} N={tokens} ip-adapter: relative max abs error {err:.2e}")
    assert err <= 1e-4
    assert relative_error(ours, jax_predict(module, {"params": params}, inputs)) > 1e-2
    assert_trees_equal(adapter_files.load_ip_adapter(str(path), params), jax.device_get(tree))


def _error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_lora_file_errors(bases, tmp_path):
    folder, _, params, _ = bases["sd"]
    path = tmp_path / "lora.safetensors"
    lora_files.save_kohya_lora(str(path), random_lora(params), RANK, ALPHA, unet_config=read_config(f"{folder}/unet"))
    tensors = load_file(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    tensors[key] = np.zeros((RANK, 7), np.float32)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = np.zeros((RANK, 3), np.float32)
    save_file(tensors, path)
    message = _error(lora_files.load_lora_file, str(path), params)
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight" in message
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q has down (4, 7)" in message
    (tmp_path / "lora.bin").write_bytes(b"")
    assert "allow_pickle=True" in _error(lora_files.load_lora_file, str(tmp_path / "lora.bin"), params)


def test_lora_pickle_with_allow_pickle(bases, tmp_path):
    _, _, params, _ = bases["sd"]
    tree = random_lora(params)
    lora_files.save_peft_lora(str(tmp_path / "a.safetensors"), tree, RANK, ALPHA)
    torch.save({k: torch.from_numpy(v) for k, v in load_file(tmp_path / "a.safetensors").items()}, tmp_path / "a.bin")
    loaded, rank, alpha = lora_files.load_lora_file(str(tmp_path / "a.bin"), params, allow_pickle=True)
    assert (rank, alpha) == (RANK, float(RANK))  # a pickle has no metadata: scale 1, as in diffusers
    assert_trees_equal(loaded, tree)


def test_ip_adapter_errors(bases, tmp_path):
    _, _, params, _ = bases["sd"]
    path = tmp_path / "psa.safetensors"
    adapter_files.save_ip_adapter(str(path), random_adapter(params, 1), params)
    tensors = load_file(path)
    tensors["ip_adapter.1.to_k_ip.weight"] = np.zeros((3, 3), np.float32)
    tensors["ip_adapter.99.to_k_ip.weight"] = np.zeros((3, 3), np.float32)
    del tensors["ip_adapter.3.to_v_ip.weight"]
    save_file(tensors, path)
    message = _error(adapter_files.load_ip_adapter, str(path), params)
    assert "missing key(s): ip_adapter.3.to_v_ip.weight" in message
    assert "unexpected key(s): ip_adapter.99.to_k_ip.weight" in message
    assert "ip_adapter.1.to_k_ip.weight has shape (3, 3)" in message
    three = adapter.init(jax.random.key(0), params, embed_dim=EMBED, num_tokens=3)
    assert "only 1, 2 or 4 tokens" in _error(adapter_files.save_ip_adapter, str(path), three, params)
