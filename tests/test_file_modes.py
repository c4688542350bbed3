"""Written files get the mode the umask gives a new file (0644 under umask 022), not mkstemp's
0600, so a ComfyUI or diffusers running as another user can read exports, PNGs and reports."""

import os
import stat

import numpy as np
import pytest

from safealign_jax.convert.checkpoint import read_config
from safealign_jax.convert.files import new_file_mode, write_safetensors
from safealign_jax.convert.unet_files import save_unet_folder
from safealign_jax.eval.fid import save_statistics
from safealign_jax.eval.judge import _write_json
from safealign_jax.images import save_png
from safealign_jax.user_embedding import save_embedding


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_file_mode_reads_the_umask(umask):
    assert new_file_mode() == {0o022: 0o644, 0o027: 0o640}[umask]
    assert os.umask(umask) == umask  # reading it left the umask as it was


def test_written_files_follow_the_umask(umask, tmp_path, tiny_unet, tiny_unet_dir):
    expected = 0o666 & ~umask
    write_safetensors(str(tmp_path / "lora.safetensors"), {"w": np.ones((2, 2), np.float32)}, {"format": "pt"})
    save_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "image.png"))
    save_embedding(str(tmp_path), "0000001", np.ones(3))
    _write_json(str(tmp_path / "judge" / "answer.json"), {"ok": True})
    save_statistics(tmp_path / "reference.npz", np.zeros(2), np.eye(2))
    save_unet_folder(str(tmp_path / "unet"), read_config(tiny_unet_dir), tiny_unet[1])
    files = ["lora.safetensors", "image.png", "0000001.npy", "judge/answer.json", "reference.npz",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert {name: oct(_mode(tmp_path / name)) for name in files} == {name: oct(expected) for name in files}
    assert oct(_mode(tmp_path / "unet")) == oct(0o777 & ~umask)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left
