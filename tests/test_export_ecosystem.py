"""Exports as the ecosystem reads them: kohya files with sd-scripts' names and metadata (SDXL in
the LDM block numbering, read through diffusers' kohya converter) and `export unet` of a run
trained on a pipeline folder writing the whole pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from pipelines import build_sd, build_sdxl
from safetensors import safe_open

from safealign_jax import lora
from safealign_jax.convert import lora_files
from safealign_jax.convert.checkpoint import read_config
from safealign_jax.convert.names import DIFFUSERS_NAMES, state_dict_from_params
from safealign_jax.models import load_unet
from safealign_jax.runs import hash_folder, save_trained

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 8.0


def random_lora(params) -> dict:
    """A LoRA of every Dense layer with non-zero a and b (so every fused weight changes)."""
    tree = lora.init(jax.random.key(1), params, lora.LoRAConfig(rank=RANK))
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(jax.random.normal(k, v.shape) * 0.3)
                                                  for k, v in zip(keys, leaves, strict=True)])


def attention_only(tree: dict) -> dict:
    """The layers inside attention blocks (what the kohya format carries)."""
    return {block: {name: sub for name, sub in layers.items() if name.startswith("attentions_")}
            for block, layers in tree.items() if any(n.startswith("attentions_") for n in layers)}


def metadata_and_keys(path) -> tuple[dict, list[str]]:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), list(f.keys())


def fused_unet(folder: str, lora_path: str) -> dict[str, np.ndarray]:
    """The diffusers UNet's state dict after load_lora_weights + fuse_lora + unload."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(lora_path)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}


def assert_same_weights(theirs: dict[str, np.ndarray], params: dict, atol: float) -> None:
    ours = state_dict_from_params(params, DIFFUSERS_NAMES)
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        np.testing.assert_allclose(theirs[name], value, atol=atol, rtol=0, err_msg=name)


def test_ldm_numbering_of_the_sdxl_unet():
    # SDXL: 3 down blocks of 2 layers (downsamplers after blocks 0, 1), up blocks of 3 layers.
    names = lora_files.ldm_attention_blocks([2, 2, 2], [3, 3, 3])
    assert names["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert names["down_blocks.1.attentions.1"] == "input_blocks.5.1"
    assert names["down_blocks.2.attentions.0"] == "input_blocks.7.1"
    assert names["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert names["mid_block.attentions.0"] == "middle_block.1"
    assert names["up_blocks.0.attentions.2"] == "output_blocks.2.1"
    assert names["up_blocks.1.attentions.0"] == "output_blocks.3.1"
    assert names["up_blocks.1.attentions.2"] == "output_blocks.5.1"


def test_base_model_versions_as_sd_scripts():
    assert lora_files.base_model_version({"cross_attention_dim": 768}) == "sd_v1"
    assert lora_files.base_model_version({"cross_attention_dim": 1024}) == "sd_v2"
    assert lora_files.base_model_version({"cross_attention_dim": 1024}, "v_prediction") == "sd_v2_v"
    sdxl = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "sample_size": 128}
    assert lora_files.base_model_version(sdxl) == "sdxl_base_v1-0"
    meta = lora_files.kohya_metadata({"cross_attention_dim": 1024, "sample_size": 96}, 8, 4.0, "t", "v_prediction")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (meta["modelspec.resolution"], meta["modelspec.prediction_type"], meta["ss_v2"]) == ("768x768", "v", "True")
    assert lora_files.kohya_metadata(sdxl, 8, 4.0, "t")["modelspec.resolution"] == "1024x1024"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bases")
    return {"sd": build_sd(tmp), "sdxl": build_sdxl(tmp)}


def test_sdxl_kohya_file_has_ldm_names_and_fuses_in_diffusers(bases, tmp_path):
    folder = bases["sdxl"]
    _, params = load_unet(folder)
    tree = attention_only(random_lora(params))
    path = tmp_path / "sdxl_lora.safetensors"
    lora_files.save_kohya_lora(str(path), tree, RANK, ALPHA, unet_config=read_config(f"{folder}/unet"), title="safe xl")
    metadata, keys = metadata_and_keys(path)
    # tiny SDXL: down blocks (plain, cross-attention) of 1 layer -> its attention is input_blocks.3.1;
    # up blocks (cross-attention, plain) of 2 layers -> output_blocks.0.1 and .1.1
    blocks = {k.split("_transformer_blocks_")[0].split("_proj_")[0] for k in keys}
    assert blocks == {"lora_unet_input_blocks_3_1", "lora_unet_middle_block_1",
                      "lora_unet_output_blocks_0_1", "lora_unet_output_blocks_1_1"}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert {k: metadata[k] for k in ("ss_network_module", "ss_base_model_version", "ss_network_dim", "ss_network_alpha",
                                     "modelspec.sai_model_spec", "modelspec.architecture",
                                     "modelspec.implementation", "modelspec.title", "modelspec.resolution")} == {
        "ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "4",
        "ss_network_alpha": "8.0", "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "safe xl", "modelspec.resolution": "64x64"}
    assert_same_weights(fused_unet(folder, str(path)), lora.fold(params, tree, ALPHA / RANK), atol=1e-5)
    loaded, rank, alpha = lora_files.load_lora_file(str(path), params)  # our reader takes LDM names too
    assert (rank, alpha) == (RANK, ALPHA)
    for (p, a), (q, b) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (loaded, tree)), strict=True):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sd1_kohya_file_keeps_diffusers_names(bases, tmp_path):
    folder = bases["sd"]
    _, params = load_unet(folder)
    tree = attention_only(random_lora(params))
    path = tmp_path / "sd_lora.safetensors"
    lora_files.save_kohya_lora(str(path), tree, RANK, ALPHA, unet_config=read_config(f"{folder}/unet"))
    metadata, keys = metadata_and_keys(path)
    assert {k.split("_attentions_")[0] for k in keys} == {"lora_unet_down_blocks_0", "lora_unet_mid_block",
                                                         "lora_unet_up_blocks_1"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers" and metadata["modelspec.title"] == "sd_lora"
    assert_same_weights(fused_unet(folder, str(path)), lora.fold(params, tree, ALPHA / RANK), atol=1e-5)


def export(workdir, fmt, run, *overrides):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/export.py"), "--config", f"{ROOT / 'configs/export.py'}:{fmt}",
         "--workdir", str(workdir), f"--config.checkpoint={run}", *overrides],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def pipeline_run(bases, tmp_path_factory):
    """A LoRA run on the SD pipeline's UNet, recorded as training records it (base = its unet/)."""
    folder = bases["sd"]
    _, params = load_unet(folder)
    tree = random_lora(params)
    run = tmp_path_factory.mktemp("runs") / "safe_sd"
    unet_dir = os.path.abspath(os.path.join(folder, "unet"))
    save_trained(str(run), {"lora": tree}, {"lora": {"rank": RANK, "alpha": ALPHA}},
                 {"path": unet_dir, "sha256": hash_folder(unet_dir)}, step=7)
    return run, lora.fold(params, tree, ALPHA / RANK)


def test_export_unet_writes_the_whole_pipeline(bases, pipeline_run, tmp_path):
    run, folded = pipeline_run
    out = tmp_path / "pipe"
    result = export(out, "unet", run)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["checkpoint_step"] == 7 and summary["components"] == [
        "scheduler", "text_encoder", "tokenizer", "vae"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in Path(bases["sd"]).iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    theirs = {k: v.detach().numpy() for k, v in pipe.unet.state_dict().items()}
    assert_same_weights(theirs, folded, atol=0)
    base_vae = next((Path(bases["sd"]) / "vae").glob("*.safetensors"))
    assert (out / "vae" / base_vae.name).read_bytes() == base_vae.read_bytes()
    assert base_vae.stat().st_ino != (out / "vae" / base_vae.name).stat().st_ino  # a copy, not a link


@pytest.mark.slow
def test_export_unet_link_and_unet_only(bases, pipeline_run, tmp_path):
    run, _ = pipeline_run
    result = export(tmp_path / "linked", "unet", run, "--config.link=True")
    assert result.returncode == 0, result.stderr[-3000:]
    base_vae = next((Path(bases["sd"]) / "vae").glob("*.safetensors"))
    assert (tmp_path / "linked" / "vae" / base_vae.name).stat().st_ino == base_vae.stat().st_ino
    result = export(tmp_path / "only", "unet", run, "--config.unet_only=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["unet"]
    result = export(tmp_path / "kohya", "kohya", run)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata, _ = metadata_and_keys(tmp_path / "kohya" / "lora.safetensors")
    assert (metadata["modelspec.title"], metadata["ss_base_model_version"]) == ("safe_sd", "sd_v1")
    assert metadata["ss_network_module"] == "networks.lora"
