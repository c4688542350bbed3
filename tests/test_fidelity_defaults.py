"""The official defaults (issue 18 items 3, 4, 8) and the prompt file's seeds (defect 2).

- configs/train.py:sdxl is the official SDXL launcher: Adafactor, lr 1e-5 not scaled by pairs, no
  warm-up, no gradient clipping (psa_sdxl keeps PSA's lr).
- The PSA presets of configs/sample.py and configs/evaluate.py use the official PSA sampling's
  negative prompt; the other presets none.
- Seeding: per_prompt (a CSV's sd_seed column, else seed + row index) or single_stream
  (SafetyDPO: one stream seeded once, drawn prompt after prompt), in sample.py and evaluate.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from pipelines import build_sd

from safealign_jax.data.eval_prompts import PromptRow
from safealign_jax.errors import UserError
from safealign_jax.eval import generation

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_PSA_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"


def load(path: str):
    spec = importlib.util.spec_from_file_location(f"_cfg_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stream_draw(seed: int, i: int) -> int:
    """Draw i of the stream seeded with `seed`: the definition single_stream implements."""
    return int(jax.random.randint(jax.random.fold_in(jax.random.key(seed), i), (), 0, 2**31 - 1))


def test_sdxl_preset_is_the_official_launcher():
    from safealign_jax.train import state

    train = load("configs/train.py")
    sdxl = train.get_config("sdxl")
    assert (sdxl.optim.name, sdxl.optim.learning_rate) == ("adafactor", 1e-5)
    assert (sdxl.optim.scale_lr_by_pairs, sdxl.optim.warmup_steps, sdxl.optim.clip_norm) == (False, 0, 0.0)
    assert state.learning_rate(sdxl, global_pairs=128) == 1e-5  # not x 128
    schedule = state.lr_schedule(sdxl, 1e-5)
    assert float(schedule(0)) == float(schedule(1000)) == pytest.approx(1e-5)  # no warm-up
    psa = train.get_config("psa_sdxl")
    assert (psa.optim.name, psa.optim.learning_rate, psa.optim.scale_lr_by_pairs) == ("adafactor", 5e-6, False)
    sd15 = train.get_config("sd15")  # SD1.5 keeps its recipe: scaled lr, 500 warm-up, clip 1.0
    assert (sd15.optim.scale_lr_by_pairs, sd15.optim.warmup_steps, sd15.optim.clip_norm) == (True, 500, 1.0)
    assert state.learning_rate(sd15, global_pairs=128) == pytest.approx(128e-5)


def test_psa_presets_use_the_official_negative_prompt():
    sample, evaluate = load("configs/sample.py"), load("configs/evaluate.py")
    assert generation.PSA_NEGATIVE_PROMPT == OFFICIAL_PSA_NEGATIVE
    assert sample.get_config("psa").negative_prompt == OFFICIAL_PSA_NEGATIVE
    assert evaluate.get_config("psa").generation.negative_prompt == OFFICIAL_PSA_NEGATIVE
    assert sample.get_config(None).negative_prompt == ""
    for preset in (None, "safetydpo", "i2p", "sage_seen"):
        assert evaluate.get_config(preset).generation.negative_prompt == "", preset
    with pytest.raises(ValueError, match="unknown preset"):
        sample.get_config("sdxl")


def test_image_seed_modes():
    rows = [PromptRow(index=0, id="0", prompt="a", seed=1234), PromptRow(index=1, id="1", prompt="a", seed=5678),
            PromptRow(index=2, id="2", prompt="b")]
    assert [generation.image_seed(r, 0, True) for r in rows] == [1234, 5678, 2]
    assert [generation.image_seed(r, 10, False) for r in rows] == [10, 11, 12]
    stream = [generation.image_seed(r, 0, True, "single_stream") for r in rows]
    assert stream == [stream_draw(0, 0), stream_draw(0, 1), stream_draw(0, 2)]  # file seeds ignored
    assert len(set(stream)) == 3 and all(0 <= s < 2**31 - 1 for s in stream)
    assert generation.image_seed(rows[1], 1, True, "single_stream") != stream[1]  # another stream
    with pytest.raises(UserError, match="seeding 'torch'"):
        generation.image_seed(rows[0], 0, True, "torch")
    with pytest.raises(UserError, match="seeding 'torch'"):
        generation.GenerationSettings(seeding="torch").validate()


def test_evaluate_passes_its_seeding_on():
    from safealign_jax.eval.run import generation_settings

    config = load("configs/evaluate.py").get_config("safetydpo")
    assert generation_settings(config).seeding == "per_prompt"
    config.generation.seeding = "single_stream"
    assert generation_settings(config).seeding == "single_stream"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
    return build_sd(tmp_path_factory.mktemp("fidelity"))


def _sample(workdir: Path, *overrides: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/sample.py"), "--config", str(ROOT / "configs/sample.py"),
         "--workdir", str(workdir), "--config.steps=1", "--config.batch_size=2", *overrides],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "manifest.jsonl").read_text().splitlines()]


def _seeded_prompts(tmp_path: Path) -> Path:
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,sd_seed\na red star,1234\na red star,5678\n")
    return prompts


def test_sample_script_uses_the_files_seeds(pipeline, tmp_path):
    records = _sample(tmp_path / "out", f"--config.model={pipeline}", f"--config.prompts={_seeded_prompts(tmp_path)}")
    assert [r["seed"] for r in records] == [1234, 5678]
    images = [np.asarray(Image.open(tmp_path / "out" / r["file"])) for r in records]
    assert not np.array_equal(images[0], images[1])  # same prompt, the seeds reach the noise


@pytest.mark.slow
def test_single_stream_only_chooses_the_seeds(pipeline, tmp_path):
    """sample.py draws the stream; generate_run's single_stream images are those of a per_prompt
    run given the stream's seeds."""
    records = _sample(tmp_path / "sample", f"--config.model={pipeline}", f"--config.prompts={_seeded_prompts(tmp_path)}",
                      "--config.seeding=single_stream")
    assert [r["seed"] for r in records] == [stream_draw(0, 0), stream_draw(0, 1)]
    assert {r["seeding"] for r in records} == {"single_stream"}

    model = generation.load_model(pipeline)
    rows = [PromptRow(index=i, id=str(i), prompt=p) for i, p in enumerate(["a red star", "a blue cat"])]
    common = dict(steps=1, sampler="ddim", batch_size=2)
    stream = generation.GenerationSettings(seeding="single_stream", **common)
    assert generation.generate_run(model, rows, str(tmp_path / "stream"), stream, progress=False) == 2
    seeded = [PromptRow(index=r.index, id=r.id, prompt=r.prompt, seed=stream_draw(0, r.index)) for r in rows]
    per_prompt = generation.GenerationSettings(**common)
    generation.generate_run(model, seeded, str(tmp_path / "per_prompt"), per_prompt, progress=False)
    records = generation.read_manifest(str(tmp_path / "stream"))
    assert [r["seed"] for r in records] == [r.seed for r in seeded]
    np.testing.assert_array_equal(generation.load_images(str(tmp_path / "stream"), records),
                                  generation.load_images(str(tmp_path / "per_prompt"), records))
