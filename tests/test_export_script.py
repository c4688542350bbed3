"""scripts/export.py on a real training checkpoint: peft and folded-unet exports load in diffusers."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util
from torch_reference import nchw, nhwc, relative_error

from safealign_jax.convert.lora_files import load_lora_file
from safealign_jax.models import load_unet
from safealign_jax.runs import read_trainable
from safealign_jax.trainable import Trainable

ROOT = Path(__file__).resolve().parents[1]


def script(name, config, workdir, *overrides):
    return subprocess.run(
        [sys.executable, str(ROOT / f"scripts/{name}.py"), "--config", str(ROOT / config),
         "--workdir", str(workdir), *overrides],
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def run(tiny_unet_dir, tmp_path_factory):
    """Two DPO steps of a LoRA on the tiny diffusers UNet (synthetic pairs)."""
    workdir = tmp_path_factory.mktemp("run")
    result = script("train", "configs/train.py:tiny", workdir, f"--config.model.path={tiny_unet_dir}",
                    "--config.train.steps=2", "--config.train.checkpoint_every=2", "--config.data.resolution=128",
                    "--config.optim.learning_rate=0.05", "--config.train.progress_bar=False")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_peft_round_trip(run, tiny_unet, tmp_path):
    result = script("export", "configs/export.py:peft", tmp_path, f"--config.checkpoint={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = read_trainable(str(run))
    tree, rank, alpha = load_lora_file(str(tmp_path / "lora.safetensors"), tiny_unet[1])
    assert (rank, alpha) == (trained["config"]["lora"]["rank"], trained["config"]["lora"]["alpha"])
    flat, expected = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(trained["trainable"]["lora"])
    assert flat.keys() == expected.keys()
    for path, value in flat.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]))


def test_folded_unet_loads_in_diffusers(run, tiny_unet_dir, tmp_path):
    result = script("export", "configs/export.py:unet", tmp_path, f"--config.checkpoint={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = read_trainable(str(run))
    module, params = load_unet(tiny_unet_dir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 4), np.float32)
    t = np.array([321])
    context = rng.standard_normal((1, 8, 32), np.float32)
    scale = trained["config"]["lora"]["alpha"] / trained["config"]["lora"]["rank"]
    ours = np.asarray(module.apply({"params": params, **Trainable({"lora": trained["trainable"]["lora"]}, {"lora": scale}).collections()}, x, t, context))
    base = np.asarray(module.apply({"params": params}, x, t, context))
    assert relative_error(ours, base) > 1e-4  # the trained LoRA changes the model
    with torch.no_grad():
        theirs = nhwc(TorchUNet.from_pretrained(tmp_path / "unet")(nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)
    assert relative_error(ours, theirs) <= 1e-4


def test_wrong_format_for_checkpoint(run, tmp_path):
    result = script("export", "configs/export.py:ip-adapter", tmp_path, f"--config.checkpoint={run}")
    assert result.returncode == 2
    assert "holds no PSA adapter" in result.stderr and len(result.stderr.strip().splitlines()) == 1
