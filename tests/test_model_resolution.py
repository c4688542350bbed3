"""Base models given as a folder, a hub id in the local Hugging Face cache, or a single-file
checkpoint converted once by scripts/convert_single_file.py; one-line errors naming what was tried."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from pipelines import build_sd
from safetensors.torch import save_file

from safealign_jax.errors import UserError
from safealign_jax.models.resolve import hub_cache, resolve_model

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def run_script(name, workdir, *overrides, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / f"scripts/{name}.py"), "--config", str(ROOT / f"configs/{name}.py"),
         "--workdir", str(workdir), *overrides],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def fake_hub_cache(cache: Path, repo_id: str, folder: str) -> Path:
    """`folder` as the huggingface_hub cache entry of `repo_id`: models--ORG--NAME/refs/main +
    snapshots/<revision>/... (files, not blob links: the lookup reads only refs and snapshots)."""
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = entry / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(pipeline folder, hub cache holding it as tiny-org/tiny-sd, its snapshot folder)."""
    tmp = tmp_path_factory.mktemp("resolve")
    folder = build_sd(tmp)
    snapshot = fake_hub_cache(tmp / "hub", "tiny-org/tiny-sd", folder)
    return folder, tmp / "hub", snapshot


def test_hub_cache_follows_the_environment(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache() == str(tmp_path / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == str(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hub_cache() == str(tmp_path / "explicit")


def test_resolves_folder_and_hub_id(tiny, monkeypatch):
    folder, cache, snapshot = tiny
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model(folder) == folder
    assert os.path.samefile(resolve_model("tiny-org/tiny-sd"), snapshot)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))  # HF_HOME/hub
    assert os.path.samefile(resolve_model("tiny-org/tiny-sd"), snapshot)


def test_unknown_hub_id_names_every_form_tried(tiny, monkeypatch):
    _, cache, _ = tiny
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(UserError) as info:
        resolve_model("tiny-org/absent", "--config.model")
    message = str(info.value)
    assert "\n" not in message and message.startswith("--config.model='tiny-org/absent' not found")
    assert "local diffusers folder" in message and str(cache) in message and "single-file" in message


def test_single_file_points_to_the_conversion_script(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not read")
    with pytest.raises(UserError, match=r"single-file checkpoint: convert it once with python scripts/convert_single_file.py"):
        resolve_model(str(path))


def test_train_and_sample_resolve_a_hub_id(tiny, tmp_path):
    cache = tiny[1]
    env = {"HF_HUB_CACHE": str(cache)}
    result = run_script("train", tmp_path / "run", "--config.model.path=tiny-org/tiny-sd", "--config.train.steps=1",
                        "--config.train.checkpoint_every=1", "--config.data.resolution=64", "--config.data.seq_len=4",
                        "--config.train.progress_bar=False", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    (tmp_path / "p.txt").write_text("the cat\n")
    result = run_script("sample", tmp_path / "out", "--config.model=tiny-org/tiny-sd", f"--config.prompts={tmp_path / 'p.txt'}",
                        "--config.steps=2", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    assert (tmp_path / "out" / record["file"]).is_file()
    result = run_script("sample", tmp_path / "out2", "--config.model=tiny-org/nope", f"--config.prompts={tmp_path / 'p.txt'}",
                        env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --config.model='tiny-org/nope' not found") and str(cache) in lines[0]


# The inverse of diffusers' LDM -> diffusers converters, for the tiny pipeline's layout (written
# here to build a single file; the round trip below checks it against diffusers' own converters).
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state, prefixes, inner):
    """Renames each key's longest matching prefix; `inner` renames the rest (and may reshape)."""
    out = {}
    for key, value in state.items():
        match = max((p for p in prefixes if key.startswith(p + ".")), key=len, default=None)
        if match is None:
            out[key] = value
            continue
        rest = key[len(match) + 1:]
        rest, value = inner(match, rest, value)
        out[f"{prefixes[match]}.{rest}"] = value
    return out


def _inner_rename(table, rest):
    head, _, tail = rest.rpartition(".")
    return f"{table.get(head, head)}.{tail}"


def unet_to_ldm(state, config):
    """A diffusers UNet state dict in the LDM single-file names (model.diffusion_model.*)."""
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    p = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    for i in range(n):
        for j in range(lpb):
            p[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{(lpb + 1) * i + j + 1}.0"
            p[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{(lpb + 1) * i + j + 1}.1"
        p[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op"
        for j in range(lpb + 1):
            p[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(lpb + 1) * i + j}.0"
            p[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(lpb + 1) * i + j}.1"
        slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        p[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{(lpb + 1) * i + lpb}.{slot}.conv"

    def inner(prefix, rest, value):
        return (_inner_rename(RESNET, rest) if ".resnets." in prefix else rest), value

    return {f"model.diffusion_model.{k}": v for k, v in _rename(state, p, inner).items()}


def vae_to_ldm(state, config):
    """A diffusers VAE state dict in the LDM names (first_stage_model.*; attention as 1x1 convs)."""
    lpb, n = config["layers_per_block"], len(config["block_out_channels"])
    p = {}
    for part in ("encoder", "decoder"):
        p |= {f"{part}.conv_norm_out": f"{part}.norm_out", f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
              f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
              f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
    for i in range(n):
        for j in range(lpb):
            p[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        p[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        for j in range(lpb + 1):
            p[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        p[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"

    def inner(prefix, rest, value):
        if prefix.endswith("attentions.0"):
            rest = _inner_rename(VAE_ATTENTION, rest)
            return rest, value[:, :, None, None] if value.ndim == 2 else value
        return (_inner_rename({"conv_shortcut": "nin_shortcut"}, rest) if "resnets" in prefix else rest), value

    return {f"first_stage_model.{k}": v for k, v in _rename(state, p, inner).items()}


def text_to_ldm(state):
    """A transformers CLIPTextModel state dict in the LDM names (cond_stage_model.transformer.*)."""
    return {"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in state.items()}


@pytest.fixture(scope="module")
def single_file(tiny, tmp_path_factory):
    """(the tiny pipeline loaded in torch, its weights as an LDM single-file .safetensors)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny[0])
    state = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config),
             **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config),
             **text_to_ldm(pipe.text_encoder.state_dict())}
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return pipe, path


def test_convert_single_file_round_trip(tiny, single_file, tmp_path):
    cache = tiny[1]
    pipe, path = single_file
    result = run_script("convert_single_file", tmp_path / "mine", f"--config.checkpoint={path}",
                        "--config.base=tiny-org/tiny-sd", env={"HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    back = StableDiffusionPipeline.from_pretrained(tmp_path / "mine")
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(ours) == set(theirs), name
        for key, value in ours.items():
            torch.testing.assert_close(theirs[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    assert resolve_model(str(tmp_path / "mine")) == str(tmp_path / "mine")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x00garbage, not a safetensors header", "not a readable safetensors file"),
        (None, "no model.diffusion_model.* tensors"),
    ],
)
def test_convert_refuses_unreadable_files_in_one_line(tiny, tmp_path, content, fragment):
    path = tmp_path / "bad.safetensors"
    if content is None:
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(content)
    result = run_script("convert_single_file", tmp_path / "out", f"--config.checkpoint={path}", f"--config.base={tiny[0]}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
