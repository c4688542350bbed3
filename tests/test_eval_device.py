"""The metrics' torch device (--config.metrics.device): auto picks CUDA only when torch sees it;
cuda without CUDA is one error line before anything is generated."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safealign_jax.errors import UserError
from safealign_jax.eval.device import torch_device
from safealign_jax.eval.fid import InceptionFeatures
from safealign_jax.eval.fid_inception import build_fid_inception

ROOT = Path(__file__).resolve().parents[1]


def test_auto_follows_torch_cuda(monkeypatch):
    assert torch_device("cpu") == "cpu"
    assert torch_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("auto") == "cuda" and torch_device("cuda") == "cuda"


def test_cuda_without_cuda_and_unknown_devices_are_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^--config.metrics.device=cuda but torch .* sees no CUDA device") as info:
        torch_device("cuda")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"device='tpu' is unknown \(expected one of auto, cpu, cuda\)"):
        torch_device("tpu")


def test_models_load_on_the_chosen_device(tmp_path):
    torch.save(build_fid_inception().state_dict(), tmp_path / "inception.pth")
    device = torch_device("auto")
    inception = InceptionFeatures.from_weights(tmp_path / "inception.pth", device=device, batch_size=2)
    assert {p.device.type for p in inception.model.parameters()} == {device}
    assert inception.device == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_evaluate_refuses_cuda_without_cuda(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/evaluate.py"), "--config", f"{ROOT / 'configs/evaluate.py'}:custom",
         "--workdir", str(tmp_path / "eval"), f"--config.model={tmp_path}", f"--config.prompts_file={prompts}",
         "--config.metrics.device=cuda"],
        capture_output=True, text=True, timeout=300,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --config.metrics.device=cuda but torch") and "no CUDA device" in lines[0]
    assert not (tmp_path / "eval" / "base").exists()
