"""scripts/sample.py: PNGs, manifest, contact sheet, resume, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipelines import build_sd

ROOT = Path(__file__).resolve().parents[1]


def sample(workdir, *overrides):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/sample.py"), "--config", str(ROOT / "configs/sample.py"),
         "--workdir", str(workdir), *overrides],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("sample"))


def test_generates_and_resumes(model, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('file_name,caption\na.jpg,the cat\nb.jpg,"a dog, running"\nc.jpg,the sky\n')
    out = tmp_path / "out"
    args = (f"--config.model={model}", f"--config.prompts={prompts}", "--config.steps=2", "--config.batch_size=2")
    result = sample(out, *args, "--config.limit=2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000_a.png", "00001_b.png"]
    result = sample(out, *args)
    assert result.returncode == 0, result.stderr
    assert "2 of 3 images already present" in result.stdout
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000_a.png", "00001_b.png", "00002_c.png"]
    assert records[1]["prompt"] == "a dog, running" and records[1]["seed"] == 1
    with Image.open(out / "00001_b.png") as png:  # the real size, and the settings in the PNG
        assert (records[1]["width"], records[1]["height"]) == png.size and png.text["seed"] == "1"
    assert (out / "contact_sheet.png").exists()


@pytest.mark.parametrize(
    ("content", "override", "fragment"),
    [
        ("file_name,text\na.jpg,the cat\n", "", "prompt/caption"),
        ("caption\nthe cat\n", "--config.sampler=heun", "sampler='heun' is unknown"),
    ],
)
def test_bad_input_is_one_line(model, tmp_path, content, override, fragment):
    prompts = tmp_path / "p.csv"
    prompts.write_text(content)
    result = sample(tmp_path / "out", f"--config.model={model}", f"--config.prompts={prompts}", *[o for o in [override] if o])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def run_script(name, workdir, *overrides):
    return subprocess.run(
        [sys.executable, str(ROOT / f"scripts/{name}.py"), "--config", str(ROOT / f"configs/{name}.py"),
         "--workdir", str(workdir), *overrides],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def psa_run(model, tmp_path_factory):
    """A PSA adapter + LoRA trained 3 steps by scripts/train.py on the tiny pipeline (E = 8)."""
    tmp = tmp_path_factory.mktemp("psa")
    result = run_script(
        "train", tmp / "run", f"--config.model.path={model}", "--config.psa.enable=True",
        "--config.psa.embed_dim=8", "--config.psa.train_lora=True", "--config.train.steps=3", "--config.train.checkpoint_every=3",
        "--config.train.log_every=3", "--config.data.resolution=64", "--config.data.seq_len=4",
        "--config.optim.learning_rate=0.01", "--config.train.progress_bar=False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rng = np.random.default_rng(0)
    for name, size in (("u1", 8), ("u2", 8), ("bad", 9)):
        np.save(tmp / f"{name}.npy", rng.standard_normal(size).astype(np.float32))
    (tmp / "prompts.txt").write_text("the cat\n")
    return tmp


def test_train_then_sample_two_users(psa_run):
    images = {}
    for user in ("u1", "u2"):
        out = psa_run / f"out_{user}"
        result = run_script("sample", out, f"--config.checkpoint={psa_run / 'run'}",
                            f"--config.user_embedding={psa_run / f'{user}.npy'}",
                            f"--config.prompts={psa_run / 'prompts.txt'}", "--config.steps=2")
        assert result.returncode == 0, result.stderr[-3000:]
        images[user] = np.asarray(Image.open(out / "00000.png"), np.float32)
        record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
        assert record["user_id"] == user and record["checkpoint_step"] == 3 and record["adapter_scale"] == 1.0
    assert np.abs(images["u1"] - images["u2"]).max() > 0


@pytest.mark.parametrize(
    ("user", "fragment"),
    [("", "holds a PSA adapter: the PSA adapter needs a user"),
     ("bad", "has 9 values, but the adapter expects 8"),
     ("no-checkpoint", "need a PSA --config.checkpoint")],
)
def test_adapter_user_errors_are_one_line(psa_run, user, fragment):
    extra = [f"--config.user_embedding={psa_run / f'{user}.npy'}"] if user else []
    checkpoint = [] if user == "no-checkpoint" else [f"--config.checkpoint={psa_run / 'run'}"]
    result = run_script("sample", psa_run / "err", *checkpoint,
                        f"--config.prompts={psa_run / 'prompts.txt'}", *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
