"""The README's "5-minute walkthrough (no weights)": the tiny pipeline / pairs writers, and the
walkthrough's bash block run as written (make a tiny pipeline and pairs -> prepare_data
kind=pairs -> train -> export -> load in diffusers)."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safealign_jax import tiny_pipeline
from safealign_jax.data import pairs

ROOT = Path(__file__).resolve().parents[1]


def walkthrough_block() -> str:
    """The first ```bash block after the README heading of the walkthrough."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### 5-minute walkthrough (no weights)", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)


def test_tiny_pairs_writer(tmp_path):
    table = tiny_pipeline.write_pairs(tmp_path / "pairs", 6, seed=3)
    loaded = pairs.load_table(table, "fail")
    assert [p.categories for p in loaded.pairs] == [("weapons",), ("weapons",), ("drugs",), ("drugs",),
                                                    ("weapons",), ("weapons",)]
    assert [p.prompt for p in loaded.pairs[:4]] == [prompt for _, prompt in tiny_pipeline.PROMPTS]
    for pair, chosen, rejected in pairs.pair_images(table, loaded.pairs):
        smooth, noise = (np.asarray(Image.open(io.BytesIO(data))) for data in (chosen, rejected))
        assert smooth.shape == noise.shape == (tiny_pipeline.IMAGE_SIZE,) * 2 + (3,)
        assert (np.diff(smooth.astype(int), axis=1) >= 0).all() and (smooth == smooth[:1]).all()  # a ramp per row
        assert np.abs(np.diff(noise.astype(int), axis=1)).mean() > 40  # noise
        assert chosen == (tmp_path / "pairs" / "images" / f"{int(pair.pair_id) - 2:04d}_chosen.png").read_bytes()
    assert tiny_pipeline.write_pairs(tmp_path / "again", 6, seed=3) and \
        (tmp_path / "again/pairs.csv").read_bytes() == Path(table).read_bytes()


def test_make_tiny_pipeline_refuses_bad_values(tmp_path):
    result = subprocess.run([sys.executable, "scripts/make_tiny_pipeline.py", "--config",
                             "configs/make_tiny_pipeline.py:sd15", f"--workdir={tmp_path / 'w'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --config.kind='sd15' is not one of ['sd', 'sdxl']."]
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    """About 2.5 min on 2 shared CPU cores (the training step compiles)."""
    for name in ("scripts", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough_block()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    walk = tmp_path / "walk"
    assert (walk / "pipeline/model_index.json").is_file()
    assert "data: kept 8 pair(s); left out 0 row(s); full report: " in result.stdout
    assert json.loads((walk / "cache/metadata.json").read_text())["category_index"] == {
        "weapons": [0, 1, 4, 5], "drugs": [2, 3, 6, 7]}
    steps = [json.loads(line)["step"] for line in (walk / "run/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
    assert (walk / "lora/lora.safetensors").is_file()
    image = np.asarray(Image.open(walk / "knife.png"))
    assert image.shape == (16, 16, 3)
